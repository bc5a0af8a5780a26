"""DKM, the math: the paper's reference, the uniquified engine, centroid initialisation.

- :mod:`edkm.dkm.soft`: ``dkm_soft``, the one entry point every layer calls (``method`` picks
  the algorithm, ``backend`` the kernels), and ``dkm_reference``, the one reference DKM
- :mod:`edkm.dkm.unique`: the uniquified DKM engine (65,536-row table per LUT group), whose
  per-weight passes are the custom ops of :mod:`edkm.kernels.unique`
- :mod:`edkm.dkm.centroids`: k-means++ / quantile initialisation and hard assignment

The implicit-attention DKM, the second algorithm, is :mod:`edkm.kernels.implicit`. Dependencies
run one way: ``edkm.dkm`` imports ``edkm.kernels``, never the reverse.

Example:
    >>> import torch
    >>> from edkm.dkm import dkm_soft
    >>> soft, c = dkm_soft(torch.zeros(4, 2), torch.tensor([[-1.0, 1.0]]), tau=1.0, iters=1)
    >>> soft.shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from edkm.dkm.soft import BACKENDS, METHODS, choose_method, dkm_reference, dkm_soft

__all__ = ["BACKENDS", "METHODS", "choose_method", "dkm_reference", "dkm_soft"]
