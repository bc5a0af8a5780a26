"""``dkm_soft_triton``: full DKM on the Triton kernels, uniquified or implicit-attention.

``edkm.dkm.soft.dkm_soft(method="triton")`` lands here. The uniquified kernels serve 16-bit weights
whenever a group's 65,536-row table is no larger than the group's own weights (its k-means then
costs less than the implicit pass over the weights); otherwise, and for fp32 weights, the
implicit-attention kernels run. ``path`` forces either.

Example:
    >>> import torch
    >>> w = torch.randn(4096, 64, device="cuda").to(torch.bfloat16)  # doctest: +SKIP
    >>> c = torch.linspace(-2, 2, 8, device="cuda").view(1, 8)  # doctest: +SKIP
    >>> soft, c_new = dkm_soft_triton(w, c, tau=0.05, iters=3)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Literal

import torch

from edkm.kernels._common import KERNEL_DTYPES, SIXTEEN_BIT, check_centroids, lut_groups
from edkm.kernels.implicit import implicit_dkm
from edkm.kernels.unique import BINS, unique_dkm

__all__ = ["choose_path", "dkm_soft_triton"]

Path = Literal["auto", "unique", "implicit"]


def choose_path(weight: torch.Tensor, groups: int, path: Path = "auto") -> str:
    """'unique' or 'implicit' for ``weight`` split into ``groups`` LUT groups.

    Example:
        >>> choose_path(torch.zeros(4096, 4096, dtype=torch.bfloat16), 1)
        'unique'
        >>> choose_path(torch.zeros(64, 64, dtype=torch.bfloat16), 1)
        'implicit'
    """
    if path == "unique":
        if weight.dtype not in SIXTEEN_BIT:
            raise ValueError(f"path='unique' needs bf16 or fp16 weights, got {weight.dtype}")
        return "unique"
    if path == "implicit":
        return "implicit"
    if path != "auto":
        raise ValueError(f"path must be 'auto', 'unique' or 'implicit', got {path!r}")
    if weight.dtype in SIXTEEN_BIT and weight.numel() // groups >= BINS:
        return "unique"
    return "implicit"


def dkm_soft_triton(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    group_size: int | None = None,
    path: Path = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKM soft weights and new centroids computed by the Triton kernels.

    ``weight`` (out, in) in fp32/bf16/fp16 on CUDA (or on CPU under TRITON_INTERPRET=1);
    ``centroids`` (G, K) with G = 1 or out // group_size; ``tau`` absolute (float or (G,)).
    Returns (soft weight in the weight's dtype, final centroids (G, K) fp32); gradients reach
    the weight and the initial centroids through all iterations. Non-finite weights raise
    ``ValueError`` (this check syncs with the device once per call).

    Example:
        >>> w = torch.randn(64, 64, device="cuda", requires_grad=True)  # doctest: +SKIP
        >>> soft, c = dkm_soft_triton(w, torch.zeros(1, 4, device="cuda"), tau=0.1, iters=2)
        ... # doctest: +SKIP
    """
    groups = lut_groups(weight.shape, group_size)
    check_centroids(centroids, groups)
    if weight.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton DKM takes fp32, bf16 or fp16 weights, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values (NaN or Inf); DKM cannot cluster them")
    if choose_path(weight, groups, path) == "unique":
        return unique_dkm(
            weight, centroids, tau=tau, iters=iters, group_size=group_size, backend="triton"
        )
    return implicit_dkm(
        weight, centroids, tau=tau, iters=iters, group_size=group_size, backend="triton"
    )
