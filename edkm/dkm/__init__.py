"""DKM, the math: the paper's reference, the uniquified engine, centroid initialisation.

- :mod:`edkm.dkm.soft`: ``dkm_soft``, the one entry point every layer calls, and the reference
- :mod:`edkm.dkm.unique`: the uniquified DKM engine (65,536-row table per LUT group)
- :mod:`edkm.dkm.centroids`: k-means++ / quantile initialisation and hard assignment

Example:
    >>> import torch
    >>> from edkm.dkm import dkm_soft
    >>> soft, c = dkm_soft(torch.zeros(4, 2), torch.tensor([[-1.0, 1.0]]), tau=1.0, iters=1)
    >>> soft.shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from edkm.dkm.soft import METHODS, dkm_reference, dkm_soft

__all__ = ["METHODS", "dkm_reference", "dkm_soft"]
