"""Uniquified DKM for 16-bit weights: a 65,536-row table per LUT group instead of N rows.

Reads top to bottom: pure-PyTorch references of the four per-weight operations (histogram of
bit patterns, gather of the soft-value table, scatter-add of gradients into bins, and the
per-weight backward ``g*D[b] + H[b]``) -> the engines (these references on CPU, the Triton
kernels of ``unique_triton`` on CUDA, imported only when used) -> the ``torch.autograd.Function``
-> the functional API.

A bf16/fp16 weight's bit pattern b_i is its row in the table, so no index is stored. Per group,
with n_u the histogram of the patterns and u the value of pattern u, DKM runs on the table rows
weighted by n_u (the same implicit-attention engine as ``implicit``, with multiplicities):

    c_{t+1,j} = sum_u n_u A_uj u / sum_u n_u A_uj,   T_u = sum_j A_uj c_T,j,   what_i = T[b_i]

Backward, with upstream g_i: G_u = sum_{b_i=u} g_i (scatter-add); the table backward with
upstream G gives dL/dc_0, the local slope D_u = dT_u/du at fixed c, and the per-copy gradient
H_u through the centroid updates; then dL/dw_i = g_i D[b_i] + H[b_i]. H needs all of G first
(through dL/dc), so the backward reads g twice: the scatter pass, then the fused
``g*D[b] + H[b]`` pass that also casts to the weight dtype.

Example:
    >>> import torch
    >>> w = (torch.randn(32, 16) * 0.02).to(torch.bfloat16)
    >>> bit_histogram(w).sum().item()
    512
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.autograd.function import once_differentiable

from edkm.kernels._common import (
    SIXTEEN_BIT,
    Backend,
    check_centroids,
    lut_groups,
    temperatures,
    use_triton,
)
from edkm.kernels.implicit import DKMEngine, backward_updates, engine_for, run_implicit

__all__ = [
    "BINS",
    "bit_histogram",
    "bit_keys",
    "gather_table",
    "scatter_bins",
    "table_values",
    "unique_dkm",
    "unique_grad",
]

BINS = 1 << 16  # rows of one group's table: every 16-bit pattern


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch references
# ----------------------------------------------------------------------------------------------


def _check_16bit(weight: torch.Tensor) -> None:
    if weight.dtype not in SIXTEEN_BIT:
        raise ValueError(
            f"the uniquified path needs bf16 or fp16 weights (a 16-bit pattern per weight), "
            f"got {weight.dtype}"
        )


def bit_keys(weight: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Flat int64 table row of every weight: group * 65536 + its 16-bit pattern.

    Example:
        >>> bit_keys(torch.tensor([[1.0], [-0.0]], dtype=torch.bfloat16), 1).tolist()
        [16256, 98304]
    """
    _check_16bit(weight)
    groups = lut_groups(weight.shape, group_size)
    bits = weight.contiguous().view(torch.int16).reshape(groups, -1).to(torch.int64) & 0xFFFF
    offset = torch.arange(groups, device=weight.device).unsqueeze(1) * BINS
    return (bits + offset).reshape(-1)


def table_values(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 value of each of the 65,536 patterns of ``dtype``; NaN/Inf patterns read 0.

    Non-finite patterns never occur in a weight (the callers reject them), and a 0 there keeps
    0 * value finite in the weighted sums.

    Example:
        >>> table_values(torch.bfloat16)[0x3F80].item()
        1.0
    """
    if dtype not in SIXTEEN_BIT:
        raise ValueError(f"table_values needs bf16 or fp16, got {dtype}")
    bits = torch.arange(BINS, dtype=torch.int32, device=device)
    bits = torch.where(bits >= BINS // 2, bits - BINS, bits).to(torch.int16)
    values = bits.view(dtype).float()
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def bit_histogram_ref(weight: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Reference histogram: (G, 65536) int32 count of each bit pattern in each group."""
    groups = lut_groups(weight.shape, group_size)
    keys = bit_keys(weight, group_size)
    counts = torch.zeros(groups * BINS, dtype=torch.int32, device=weight.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    return counts.view(groups, BINS)


def gather_table_ref(
    table: torch.Tensor, weight: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """Reference gather: ``table.view(-1)[keys]`` shaped like the weight, in table's dtype."""
    return table.reshape(-1)[bit_keys(weight, group_size)].view(weight.shape)


def scatter_bins_ref(
    grad: torch.Tensor, weight: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """Reference scatter-add: (G, 65536) fp32 sum of ``grad`` over each bit pattern's weights."""
    groups = lut_groups(weight.shape, group_size)
    out = torch.zeros(groups * BINS, dtype=torch.float32, device=weight.device)
    out.index_add_(0, bit_keys(weight, group_size), grad.reshape(-1).float())
    return out.view(groups, BINS)


def unique_grad_ref(
    grad: torch.Tensor,
    weight: torch.Tensor,
    slope_path: torch.Tensor,
    group_size: int | None = None,
) -> torch.Tensor:
    """Reference per-weight backward ``g*D[b] + H[b]`` from a (G, 65536, 2) [D, H] table."""
    keys = bit_keys(weight, group_size)
    table = slope_path.reshape(-1, 2)
    dw = grad.reshape(-1).float() * table[keys, 0] + table[keys, 1]
    return dw.view(weight.shape).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Engines: the references above on CPU, the Triton kernels on CUDA / under the interpreter
# ----------------------------------------------------------------------------------------------


class BinEngine(Protocol):
    """The four per-weight operations of the uniquified path."""

    def histogram(self, weight: torch.Tensor, group_size: int | None) -> torch.Tensor: ...

    def gather(
        self, table: torch.Tensor, weight: torch.Tensor, group_size: int | None
    ) -> torch.Tensor: ...

    def scatter(
        self, grad: torch.Tensor, weight: torch.Tensor, group_size: int | None
    ) -> torch.Tensor: ...

    def grad(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        slope_path: torch.Tensor,
        group_size: int | None,
    ) -> torch.Tensor: ...


class TorchBinEngine:
    """The references as an engine (fixed shapes: runs under FakeTensorMode too)."""

    def histogram(self, weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
        return bit_histogram_ref(weight, group_size)

    def gather(
        self, table: torch.Tensor, weight: torch.Tensor, group_size: int | None
    ) -> torch.Tensor:
        return gather_table_ref(table, weight, group_size)

    def scatter(
        self, grad: torch.Tensor, weight: torch.Tensor, group_size: int | None
    ) -> torch.Tensor:
        return scatter_bins_ref(grad, weight, group_size)

    def grad(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        slope_path: torch.Tensor,
        group_size: int | None,
    ) -> torch.Tensor:
        return unique_grad_ref(grad, weight, slope_path, group_size)


def bin_engine_for(backend: Backend, tensor: torch.Tensor) -> BinEngine:
    """The Triton bin kernels when ``backend`` selects them for ``tensor``, else the references.

    Example:
        >>> type(bin_engine_for("torch", torch.zeros(1))).__name__
        'TorchBinEngine'
    """
    if use_triton(backend, tensor):
        from edkm.kernels.unique_triton import TritonBinEngine  # imports triton

        return TritonBinEngine()
    return TorchBinEngine()


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------


def _present_values(dtype: torch.dtype, counts: torch.Tensor) -> torch.Tensor:
    """(G, 65536) table rows: each pattern's value where it occurs in the group, else 0.

    Absent patterns carry no weight (count 0), but bf16 patterns reach 3e38, whose squared
    distance to a centroid overflows and would turn 0 * inf into NaN in the weighted sums.
    """
    values = table_values(dtype, counts.device)
    return torch.where(counts > 0, values, torch.zeros_like(values))


class _UniqueDKM(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: torch.Tensor,
        centroids: torch.Tensor,
        tau: torch.Tensor,
        iters: int,
        group_size: int | None,
        engine: DKMEngine,
        bins: BinEngine,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups = centroids.shape[0]
        w = weight.detach().contiguous()
        counts = bins.histogram(w, group_size)  # (G, 65536): the only O(N) pass of the k-means
        values = _present_values(w.dtype, counts)
        cs, s0s = run_implicit(engine, values, counts, centroids.detach().float(), tau, iters)
        table = torch.empty((groups, BINS), dtype=w.dtype, device=w.device)
        engine.soft(values, cs[-1], tau, table)  # T_u, rounded once to the weight dtype
        soft = bins.gather(table, w, group_size)
        ctx.save_for_backward(w, counts, cs, s0s, tau)
        ctx.engines = (engine, bins)
        ctx.group_size = group_size
        ctx.centroid_dtype = centroids.dtype
        return soft, cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_soft: torch.Tensor | None, g_c: torch.Tensor | None) -> Any:
        w, counts, cs, s0s, tau = ctx.saved_tensors
        engine, bins = ctx.engines
        groups = cs.shape[1]
        g = torch.zeros_like(w) if g_soft is None else g_soft.contiguous()
        binned = bins.scatter(g, w, ctx.group_size)  # G_u, (G, 65536) fp32
        values = _present_values(w.dtype, counts)
        slope = torch.empty((groups, BINS), dtype=torch.float32, device=w.device)
        gc = engine.backward_final(values, cs[-1], tau, binned, slope, False)
        if g_c is not None:
            gc = gc + g_c.float()
        path = torch.zeros((groups, BINS), dtype=torch.float32, device=w.device)
        gc = backward_updates(engine, values, counts, cs, s0s, tau, gc, path)
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = bins.grad(g, w, torch.stack((slope, path), -1), ctx.group_size)
        grad_c = gc.to(ctx.centroid_dtype) if ctx.needs_input_grad[1] else None
        return grad_w, grad_c, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------


def bit_histogram(
    weight: torch.Tensor, *, group_size: int | None = None, backend: Backend = "auto"
) -> torch.Tensor:
    """(G, 65536) int32 histogram of the bf16/fp16 bit patterns of each LUT group's weights.

    Example:
        >>> w = torch.tensor([[1.0, 1.0], [2.0, 1.0]], dtype=torch.float16)
        >>> h = bit_histogram(w)
        >>> h[0, 0x3C00].item(), h[0, 0x4000].item()
        (3, 1)
    """
    _check_16bit(weight)
    return bin_engine_for(backend, weight).histogram(weight.detach().contiguous(), group_size)


def gather_table(
    table: torch.Tensor,
    weight: torch.Tensor,
    *,
    group_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``table[group, bits(w)]`` for every weight: (G, 65536) table -> weight's shape, table dtype.

    Example:
        >>> w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
        >>> t = table_values(torch.bfloat16).view(1, -1) * 10
        >>> gather_table(t, w).tolist()
        [[10.0, 20.0]]
    """
    _check_16bit(weight)
    groups = lut_groups(weight.shape, group_size)
    if table.shape != (groups, BINS):
        raise ValueError(f"table must have shape ({groups}, {BINS}), got {tuple(table.shape)}")
    engine = bin_engine_for(backend, weight)
    return engine.gather(table.contiguous(), weight.detach().contiguous(), group_size)


def scatter_bins(
    grad: torch.Tensor,
    weight: torch.Tensor,
    *,
    group_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """(G, 65536) fp32 sums of ``grad`` over the weights of each bit pattern (G_u).

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.bfloat16)
        >>> scatter_bins(torch.tensor([[1.0, 2.0, 4.0]]), w)[0, 0x3F80].item()
        3.0
    """
    _check_16bit(weight)
    if grad.shape != weight.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    engine = bin_engine_for(backend, weight)
    return engine.scatter(grad.contiguous(), weight.detach().contiguous(), group_size)


def unique_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    slope_path: torch.Tensor,
    *,
    group_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """The fused per-weight backward ``g*D[b] + H[b]`` in the weight's dtype.

    ``slope_path`` is (G, 65536, 2): D (local slope) and H (per-copy centroid-path gradient) of
    every table row, interleaved so that one 8-byte gather fetches both.

    Example:
        >>> w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
        >>> dh = torch.zeros(1, 65536, 2); dh[0, 0x3F80] = torch.tensor([2.0, 1.0])
        >>> unique_grad(torch.tensor([[3.0, 3.0]]), w, dh).tolist()
        [[7.0, 0.0]]
    """
    _check_16bit(weight)
    groups = lut_groups(weight.shape, group_size)
    if slope_path.shape != (groups, BINS, 2) or slope_path.dtype != torch.float32:
        raise ValueError(f"slope_path must be fp32 of shape ({groups}, {BINS}, 2)")
    if grad.shape != weight.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    engine = bin_engine_for(backend, weight)
    return engine.grad(
        grad.contiguous(), weight.detach().contiguous(), slope_path.contiguous(), group_size
    )


def unique_dkm(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    group_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniquified DKM of bf16/fp16 weights: cost of the k-means independent of N.

    Same contract as ``edkm.dkm.soft.dkm_soft`` (soft weight in the weight's dtype, final centroids
    (G, K) fp32, gradients to the weight and the initial centroids). Memory saved for backward:
    the (G, 65536) histogram and O(T*K) centroids, besides the weight itself. Callers check that
    weights are finite (``dkm_soft_triton`` does).

    Example:
        >>> w = (torch.randn(64, 32) * 0.02).to(torch.bfloat16).requires_grad_()
        >>> c = torch.tensor([[-0.02, 0.0, 0.02, 0.04]])
        >>> soft, c_new = unique_dkm(w, c, tau=4e-5, iters=2)
        >>> soft.dtype, c_new.dtype
        (torch.bfloat16, torch.float32)
    """
    _check_16bit(weight)
    groups = lut_groups(weight.shape, group_size)
    check_centroids(centroids, groups)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if groups * BINS >= 1 << 31:
        raise ValueError(f"too many LUT groups for 32-bit table rows: {groups}")
    engine = engine_for(backend, weight)
    bins = bin_engine_for(backend, weight)
    t = temperatures(tau, groups, weight.device)
    soft, c = _UniqueDKM.apply(weight, centroids, t, int(iters), group_size, engine, bins)
    return soft, c
