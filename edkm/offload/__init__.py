"""Offload of saved tensors to host memory without redundant copies (eDKM's marshaling).

Public API:
    SavedTensorOffload(*, min_bytes=1 << 20, host="cpu", device=None, pin_memory=None,
                       keep=(), offload_parameters=False, prefetch=2)
        a context manager (and ``.attach(module, keep_inputs=False)``) on ``saved_tensors_hooks``
    OffloadStats: bytes packed, bytes moved, copies avoided, peak host and device bytes

Importing this package imports torch only, and never queries CUDA.

Example:
    >>> import torch
    >>> from edkm.offload import SavedTensorOffload
    >>> w = torch.randn(512, 512, requires_grad=True)
    >>> with SavedTensorOffload(min_bytes=0) as off:
    ...     loss = (w.sigmoid() * w).sum()
    >>> loss.backward()
    >>> off.stats.bytes_to_host == off.stats.bytes_to_device
    True
"""

from __future__ import annotations

from edkm.offload.marshal import SavedTensorOffload
from edkm.offload.stats import OffloadStats

__all__ = ["OffloadStats", "SavedTensorOffload"]
