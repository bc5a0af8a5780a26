"""Shared constants and argument handling of the DKM kernels: the lowest layer of edkm's DKM.

Everything that both DKM algorithms (``edkm.dkm.unique`` and :mod:`edkm.kernels.implicit`) and
their kernels agree on lives here, once: the table size ``BINS``, the empty-cluster bound
``MIN_MASS``, LUT groups, temperatures and the ``backend`` word. This package never imports
another edkm package (``edkm.dkm`` imports it, not the other way round).

Nothing here imports Triton or queries CUDA: the backend is chosen from the tensors' device and
from ``TRITON_INTERPRET`` (the Triton interpreter that runs kernels on CPU tensors in tests).

Example:
    >>> import torch
    >>> lut_groups((8, 4), 2)
    4
    >>> temperatures(0.5, 4, torch.device("cpu")).tolist()
    [0.5, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")

# Rows of one LUT group's table in the uniquified DKM: one per 16-bit pattern.
BINS = 1 << 16
# A cluster whose mass ``s0 = sum_i a_ij`` (in weights) is at most this counts as empty and
# keeps its centroid. Its update ``s1 / s0`` has derivative ``-c / s0``: for a subnormal s0 that
# overflows fp32 and backward returns NaN even for a zero upstream gradient (0 * inf), in every
# method. 2^-63 = sqrt(fp32 smallest normal) bounds 1/s0 by 2^63; such a cluster moves the soft
# weights by at most 2^-63 |c|. The same absolute bound in every compute dtype, so the fp64
# oracle of the tests follows the same rule.
MIN_MASS = 2.0**-63

# Weight dtypes whose 16-bit pattern can index a 65,536-row table.
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lut_groups(shape: tuple[int, ...] | torch.Size, group_size: int | None) -> int:
    """Number of LUT groups: 1 per tensor, or ``out // group_size`` groups of output channels.

    Example:
        >>> lut_groups((12, 5), None), lut_groups((12, 5), 3)
        (1, 4)
    """
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(shape)}")
    if group_size is None:
        return 1
    out = int(shape[0])
    if group_size <= 0 or out % group_size != 0:
        raise ValueError(
            f"group_size must divide the {out} output channels, got group_size={group_size}"
        )
    return out // group_size


def check_centroids(centroids: torch.Tensor, groups: int) -> int:
    """Validate a (G, K) centroid table for ``groups`` LUT groups and return K.

    Example:
        >>> check_centroids(torch.zeros(2, 8), 2)
        8
    """
    if centroids.dim() != 2 or centroids.shape[0] != groups or centroids.shape[1] < 1:
        raise ValueError(
            f"centroids must have shape ({groups}, K) for {groups} LUT group(s), "
            f"got {tuple(centroids.shape)}"
        )
    if not centroids.is_floating_point():
        raise ValueError(f"centroids must be floating point, got {centroids.dtype}")
    return int(centroids.shape[1])


def temperatures(
    tau: float | torch.Tensor, groups: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The absolute temperature of every LUT group as a (G,) tensor (detached: not trained).

    Example:
        >>> temperatures(torch.tensor([1.0, 2.0]), 2, torch.device("cpu")).tolist()
        [1.0, 2.0]
    """
    if isinstance(tau, torch.Tensor):
        t = tau.detach().to(device=device, dtype=dtype)
        if t.numel() == 1:
            return t.reshape(1).expand(groups).contiguous()
        if t.shape != (groups,):
            raise ValueError(f"tau must be a float or a ({groups},) tensor, got {tuple(t.shape)}")
        return t.contiguous()
    value = float(tau)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return torch.full((groups,), value, device=device, dtype=dtype)


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked without importing it).

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether ``backend`` means the Triton kernels for ``tensor``.

    ``"auto"`` picks them for CUDA tensors when triton is installed, ``"torch"`` never, and
    ``"triton"`` always (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Example:
        >>> use_triton("auto", torch.zeros(1)), use_triton("torch", torch.zeros(1))
        (False, False)
    """
    if backend == "torch":
        return False
    if backend == "triton":
        if tensor.device.type != "cuda" and not interpreting():
            raise ValueError(
                "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on CPU "
                f"in Triton's interpreter); got a tensor on {tensor.device}"
            )
        return True
    if backend == "auto":
        return tensor.device.type == "cuda" and triton_available()
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def resolve_backend(backend: str, tensor: torch.Tensor) -> Literal["torch", "triton"]:
    """``"torch"`` or ``"triton"``: what ``backend`` means for ``tensor`` (see ``use_triton``).

    Example:
        >>> resolve_backend("auto", torch.zeros(1))
        'torch'
    """
    return "triton" if use_triton(backend, tensor) else "torch"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1).

    Example:
        >>> next_pow2(5), next_pow2(8), next_pow2(0)
        (8, 8, 1)
    """
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def centroid_step(s0: torch.Tensor, s1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One k-means update ``s1 / s0`` per cluster; a cluster of mass ``s0 <= MIN_MASS`` counts
    as empty and keeps its centroid ``c``. Every DKM method updates its centroids here.

    The inner ``where`` keeps the gradient of an empty cluster finite (no 1 / 0).

    Example:
        >>> centroid_step(torch.tensor([2.0, 0.0]), torch.tensor([3.0, 1.0]), torch.zeros(2))
        tensor([1.5000, 0.0000])
    """
    live = s0 > MIN_MASS
    return torch.where(live, s1 / torch.where(live, s0, torch.ones_like(s0)), c)
