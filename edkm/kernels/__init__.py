"""DKM kernels: uniquified (16-bit bit-pattern tables) and implicit-attention paths.

Each path has a pure-PyTorch reference beside its fast code, and chooses Triton kernels (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or plain torch by the tensors' device.
Importing this package imports neither Triton nor the kernel modules and never queries CUDA:
the names below load on first use, and the ``@triton.jit`` modules (``implicit_triton``,
``unique_triton``, ``triton_ops``) only when a Triton launch needs them.

Public API:
    dkm_soft_triton(weight, centroids, *, tau, iters, group_size=None, path="auto")
    implicit_dkm(weight, centroids, *, tau, iters, group_size=None, backend="auto")
    unique_dkm(weight, centroids, *, tau, iters, group_size=None, backend="auto")
    bit_histogram(weight, *, group_size=None, backend="auto")
    gather_table(table, weight, *, group_size=None, backend="auto")
    scatter_bins(grad, weight, *, group_size=None, backend="auto")
    unique_grad(grad, weight, slope_path, *, group_size=None, backend="auto")
    dkm_reference(weight, centroids, *, tau, iters, group_size=None)

Example:
    >>> import torch, edkm.kernels as K
    >>> w = torch.randn(16, 8)
    >>> soft, c = K.implicit_dkm(w, torch.tensor([[-1.0, 1.0]]), tau=0.5, iters=2)
    >>> soft.shape
    torch.Size([16, 8])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "dkm_soft_triton": "edkm.kernels.dispatch",
    "implicit_dkm": "edkm.kernels.implicit",
    "dkm_reference": "edkm.kernels.implicit",
    "unique_dkm": "edkm.kernels.unique",
    "bit_histogram": "edkm.kernels.unique",
    "gather_table": "edkm.kernels.unique",
    "scatter_bins": "edkm.kernels.unique",
    "unique_grad": "edkm.kernels.unique",
}

__all__ = [
    "bit_histogram",
    "dkm_reference",
    "dkm_soft_triton",
    "gather_table",
    "implicit_dkm",
    "scatter_bins",
    "unique_dkm",
    "unique_grad",
]
assert sorted(_EXPORTS) == __all__

if TYPE_CHECKING:  # pragma: no cover
    from edkm.kernels.dispatch import dkm_soft_triton
    from edkm.kernels.implicit import dkm_reference, implicit_dkm
    from edkm.kernels.unique import (
        bit_histogram,
        gather_table,
        scatter_bins,
        unique_dkm,
        unique_grad,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edkm.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
