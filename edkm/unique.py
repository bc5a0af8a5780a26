"""Uniquified DKM: the weight–centroid attention over at most 65,536 bit patterns per LUT group.

A 16-bit weight takes one of 65,536 bit patterns, so DKM's sums over N weights become sums over
the pattern table weighted by its histogram ``n_u`` (DESIGN.md section 3). The pattern of a
weight IS its row in the table: nothing N-sized is stored for backward but the weight itself.

Per LUT group, with ``u`` the value of pattern ``u``:

    A_uj = softmax_j(-(u - c_j)^2 / tau)
    c_j  <- sum_u n_u A_uj u / sum_u n_u A_uj                  (iters times, from the warm start)
    T_u  = sum_j A_uj c_T,j ;  soft_weight_i = T[b_i]            (a gather)

Backward, with upstream ``g``: ``G_u`` = scatter-add of ``g`` into the bins; the small table graph
is rebuilt with two leaves for ``u`` (one feeding the final soft assignment, one feeding the
k-means iterations) and differentiated with upstream ``G``; ``D_u`` = dT_u/du at fixed ``c_T``
(closed form), ``H_u`` = (dL/du through the centroid path) / n_u; then
``dL/dw_i = g_i * D[b_i] + H[b_i]`` — every weight keeps its own ``g_i``, only the centroid
path is shared by equal weights, so the gradient equals the reference DKM's to float rounding.

Table forms: the fixed 65,536-row table (no data-dependent shape: works under FakeTensorMode and
``torch.compile``) or, outside those, a compacted table of the rows present in the weight
(cheaper for small layers and for many centroids). The N-sized passes (pattern -> row index,
histogram, gather, scatter-add, per-weight gradient) are plain PyTorch here; on CPU they can run
as fused loops compiled by ``torch.compile`` (``edkm.unique_fused``), held to these by tests.

Example:
    >>> import torch
    >>> w = torch.randn(64, 32).bfloat16()
    >>> c = torch.linspace(-2, 2, 4)[None]
    >>> soft, c_new = unique_dkm(w, c, tau=0.1, iters=2)
    >>> soft.dtype, tuple(c_new.shape)
    (torch.bfloat16, (1, 4))
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BINS = 1 << 16
# compact the table when the present rows are fewer than this share of the fixed table
COMPACT_BELOW = 0.5


def is_symbolic(t: torch.Tensor) -> bool:
    """True for FakeTensors and while compiling: no data-dependent shapes or checks allowed."""
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t)) or torch.compiler.is_compiling()


def pattern_dtype(weight: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype whose bit pattern indexes the table: fp16 for fp16 weights, else bf16."""
    return torch.float16 if weight.dtype == torch.float16 else torch.bfloat16


@functools.lru_cache(maxsize=4)
def _pattern_values_cpu(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(BINS, dtype=torch.int32).to(torch.int16).view(dtype).float()


def pattern_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(65536,) fp32: the value of every 16-bit pattern of ``dtype`` (inf/NaN included)."""
    return _pattern_values_cpu(dtype).to(device)


def nonfinite_rows(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(65536,) bool: patterns that encode inf or NaN (all-ones exponent)."""
    return ~torch.isfinite(pattern_values(dtype, device))


def row_index(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Flat int64 row of every weight: ``group * 65536 + pattern`` (weight rounded to 16 bits)."""
    w16 = weight if weight.dtype in (torch.bfloat16, torch.float16) else weight.to(torch.bfloat16)
    idx = w16.reshape(groups, -1).view(torch.int16).to(torch.int64) & 0xFFFF
    if groups > 1:
        idx = idx + torch.arange(groups, device=idx.device).unsqueeze(1) * BINS
    return idx.reshape(-1)


def histogram(idx: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, 65536) fp32 counts by scatter-add into zeros (fixed shape)."""
    ones = torch.ones((), dtype=torch.float32, device=idx.device).expand(idx.numel())
    counts = torch.zeros(groups * BINS, dtype=torch.float32, device=idx.device)
    return counts.index_add_(0, idx, ones).view(groups, BINS)


def scatter_bins(idx: torch.Tensor, grad: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, 65536) fp32: sum of ``grad`` over the weights of each row."""
    out = torch.zeros(groups * BINS, dtype=torch.float32, device=idx.device)
    return out.index_add_(0, idx, grad.reshape(-1).float()).view(groups, BINS)


def gather_rows(table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``table.flatten()[idx]`` cast to ``dtype`` (the soft weights)."""
    return table.reshape(-1).to(dtype).index_select(0, idx)


def weight_grad(
    grad: torch.Tensor, idx: torch.Tensor, slope: torch.Tensor, shared: torch.Tensor
) -> torch.Tensor:
    """fp32 ``g_i * D[b_i] + H[b_i]`` (flat)."""
    return torch.addcmul(
        shared.reshape(-1).index_select(0, idx),
        grad.reshape(-1).float(),
        slope.reshape(-1).index_select(0, idx),
    )


# ---- the small table graph (O(rows * K * iters)) ------------------------------------------------


def soft_assign(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(G, R, K) attention ``softmax_j(-(u - c_j)^2 / tau)`` for (G, R) rows, (G, K) centroids."""
    d = (u.unsqueeze(-1) - c.unsqueeze(1)).square()
    return torch.softmax(d / (-tau.view(-1, 1, 1)), dim=-1)


def table_iterations(
    u: torch.Tensor, n: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, iters: int
) -> torch.Tensor:
    """k-means updates on the weighted table; an empty cluster keeps its centroid."""
    for _ in range(iters):
        a = soft_assign(u, c, tau) * n.unsqueeze(-1)
        s0 = a.sum(1)
        s1 = (a * u.unsqueeze(-1)).sum(1)
        c = torch.where(s0 > 0, s1 / torch.where(s0 > 0, s0, torch.ones_like(s0)), c)
    return c


def table_output(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(G, R) soft value of every row: ``T_u = sum_j A_uj c_j``."""
    return (soft_assign(u, c, tau) * c.unsqueeze(1)).sum(-1)


def local_slope(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(G, R) ``D_u = dT_u/du`` at fixed centroids: Cov_A(c, dz) with dz_j = -2 (u - c_j) / tau."""
    a = soft_assign(u, c, tau)
    dz = (u.unsqueeze(-1) - c.unsqueeze(1)) * (-2.0 / tau.view(-1, 1, 1))
    cbar = (a * c.unsqueeze(1)).sum(-1)
    return (a * c.unsqueeze(1) * dz).sum(-1) - cbar * (a * dz).sum(-1)


def build_table(
    idx: torch.Tensor, groups: int, dtype: torch.dtype, *, compact: bool | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Histogram and row values: ``(u (G,R), n (G,R), rows or None)``.

    ``rows`` lists the kept table rows when compacted (None for the fixed table). Values of
    rows absent from a group are set to 0 there, so no inf/huge value can turn a sum into NaN.
    """
    counts = histogram(idx, groups)
    values = pattern_values(dtype, idx.device)
    symbolic = is_symbolic(idx)
    if not symbolic:
        bad = counts[:, nonfinite_rows(dtype, idx.device)].sum()
        if bool(bad > 0):
            raise ValueError(
                f"weight has {int(bad)} non-finite value(s) (NaN/inf, or beyond the 16-bit "
                "range after rounding); DKM cannot cluster them"
            )
    rows = None
    if compact is None:
        compact = not symbolic
    if compact and not symbolic:
        present = (counts > 0).any(0)
        if int(present.sum()) < COMPACT_BELOW * BINS:
            rows = present.nonzero().squeeze(1)
            counts = counts[:, rows]
            values = values[rows]
    u = torch.where(counts > 0, values.unsqueeze(0), torch.zeros((), device=idx.device))
    return u, counts, rows


def _expand_rows(table: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    if rows is None:
        return table
    full = torch.zeros(table.shape[0], BINS, dtype=table.dtype, device=table.device)
    full[:, rows] = table
    return full


class UniqueDKM(torch.autograd.Function):
    """Uniquified DKM (module docstring). Inputs: weight (out, in), centroids (G, K) fp32,
    tau (G,) fp32, iters, groups, compact; outputs: soft weight (weight dtype), c_T (G, K)."""

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        centroids: torch.Tensor,
        tau: torch.Tensor,
        iters: int,
        groups: int,
        compact: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = pattern_dtype(weight)
        idx = row_index(weight, groups)
        u, n, rows = build_table(idx, groups, dtype, compact=compact)
        c = table_iterations(u, n, centroids.float(), tau, iters)
        table = _expand_rows(table_output(u, c, tau), rows)
        soft = gather_rows(table, idx, weight.dtype).view(weight.shape)
        # Nothing N-sized beyond the weight itself: the row index is recomputed in backward.
        ctx.save_for_backward(weight, centroids, tau, u, n, c)
        ctx.rows = rows
        ctx.iters, ctx.groups = iters, groups
        return soft, c

    @staticmethod
    def backward(
        ctx: Any, grad_soft: torch.Tensor | None, grad_c: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        weight, centroids, tau, u, n, c_final = ctx.saved_tensors
        rows, groups = ctx.rows, ctx.groups
        idx = row_index(weight, groups)
        if grad_soft is None:
            grad_soft = torch.zeros_like(weight)
        g_bins = scatter_bins(idx, grad_soft, groups)
        if rows is not None:
            g_bins = g_bins[:, rows]
        need_c = ctx.needs_input_grad[1]
        with torch.enable_grad():
            u_cent = u.detach().requires_grad_(True)
            c0 = centroids.detach().float().requires_grad_(need_c)
            c_t = table_iterations(u_cent, n, c0, tau, ctx.iters)
            table = table_output(u.detach(), c_t, tau)
            loss = (table * g_bins).sum()
            if grad_c is not None:
                loss = loss + (c_t * grad_c).sum()
            inputs = [u_cent, c0] if need_c else [u_cent]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        d_u = grads[0] if grads[0] is not None else torch.zeros_like(u)
        shared = torch.where(n > 0, d_u / torch.where(n > 0, n, torch.ones_like(n)), 0.0)
        slope = local_slope(u, c_final, tau)
        grad_w = weight_grad(grad_soft, idx, _expand_rows(slope, rows), _expand_rows(shared, rows))
        grad_c0 = grads[1] if need_c else None
        return grad_w.view(weight.shape).to(weight.dtype), grad_c0, None, None, None, None


def unique_dkm(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: torch.Tensor | float,
    iters: int,
    groups: int = 1,
    compact: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniquified DKM on a weight split into ``groups`` LUT groups of consecutive rows.

    ``compact=None`` compacts the table when it can (not under FakeTensor/compile) and it is
    smaller; True/False force it where allowed.
    """
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=weight.device).expand(groups)
    return UniqueDKM.apply(weight, centroids, tau_t.contiguous(), iters, groups, compact)
