"""The uniquified DKM on row shards: local per-weight passes, collectives on the table.

Each rank holds rows ``[start, stop)`` of a weight (``Comm.rows``). Forward::

    counts_local = edkm::bit_histogram of the local rows          (G, 65536) int32
    counts       = all_reduce(counts_local)                         exact integer sum
    table, c_T, T = edkm.dkm.unique.table_forward(counts, ...)       identical on every rank
    soft_local   = edkm::gather_table(T, local rows)                T[b_i] for its rows only

Backward, from ``dL/dsoft_local`` (the rank's rows, already summed over the ranks by the
reduce-scatter of :class:`ShardedLinear`)::

    G_local = edkm::scatter_bins(g_local, local rows)              (G, 65536) fp32
    G       = all_reduce(G_local)
    [D, H]  = edkm.dkm.unique.table_backward(table, ..., G)          identical on every rank
    dL/dw_local = edkm::unique_grad(g_local, local rows, [D, H])    g_i D[b_i] + H[b_i]

The counts are integers, so the table, the centroids and the soft weight are bitwise those of
the single-process engine; only the fp32 bin sums ``G`` are added in another order, so weight
gradients agree to float rounding. The non-finite check and the choice of the table form run on
the all-reduced counts: every rank raises, or branches, the same way.

A LUT group (``group_rows`` consecutive rows) may straddle two shards: the local rows are cut
into at most three segments (a partial group at each end, whole groups between), each run by
the custom ops with its own group count, and placed at its groups' rows of the (G, 65536) table.

:class:`ShardedLinear` is the matmul: it all-gathers the soft shards in forward, keeps only the
local shard (never the full soft weight) for backward, all-gathers again there, and
reduce-scatters the full weight gradient (averaged, as FSDP2 does) back to the rows' owners.

Example:
    >>> import torch
    >>> from edkm.shard.comm import Comm
    >>> w = torch.randn(6, 4).bfloat16()
    >>> soft, c = sharded_unique_dkm(w, torch.tensor([[-1.0, 1.0]]), tau=0.5, iters=2,
    ...                              rows=6, comm=Comm.single())
    >>> soft.shape, c.shape
    (torch.Size([6, 4]), torch.Size([1, 2]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from edkm.dkm.unique import pattern_dtype, table_backward, table_forward
from edkm.kernels._common import BINS, resolve_backend
from edkm.kernels.unique import CHUNK, bit_histogram, gather_table, scatter_bins, unique_grad
from edkm.shard.comm import Comm

__all__ = [
    "ShardedLinear",
    "ShardedUniqueDKM",
    "local_counts",
    "segments",
    "sharded_linear",
    "sharded_unique_dkm",
]

Segment = tuple[int, int, int, int]  # local row start, local row stop, first group, groups


def segments(start: int, stop: int, group_rows: int) -> list[Segment]:
    """Cut global rows ``[start, stop)`` into runs of whole LUT groups and partial ends.

    Returns ``(local start, local stop, first group, number of groups)`` per segment; a partial
    group is a segment of one group.

    Example:
        >>> segments(3, 11, 4)   # rows 3..10 with groups of 4 rows: 3 | 4..7 | 8..10
        [(0, 1, 0, 1), (1, 5, 1, 1), (5, 8, 2, 1)]
        >>> segments(4, 12, 2)
        [(0, 8, 2, 4)]
    """
    out: list[Segment] = []
    row = start
    while row < stop:
        g = row // group_rows
        g_end = (g + 1) * group_rows
        if row % group_rows or g_end > stop:  # a partial group at either end
            end = min(g_end, stop)
            out.append((row - start, end - start, g, 1))
        else:
            whole = (stop - row) // group_rows
            end = row + whole * group_rows
            out.append((row - start, end - start, g, whole))
        row = end
    return out


def local_counts(
    weight: torch.Tensor, groups: int, segs: list[Segment], **ops: Any
) -> torch.Tensor:
    """(G, 65536) int32 pattern counts of the local rows (``segs`` from :func:`segments`).

    Example:
        >>> w = torch.tensor([[1.0], [2.0], [1.0]], dtype=torch.bfloat16)
        >>> h = local_counts(w, 2, segments(1, 4, 2))  # global rows 1..3, groups of 2 rows
        >>> h[0, 0x3F80].item(), h[1, 0x4000].item(), h[1, 0x3F80].item()
        (1, 1, 1)
    """
    counts = torch.zeros(groups, BINS, dtype=torch.int32, device=weight.device)
    for a, b, g0, n in segs:
        counts[g0 : g0 + n] += bit_histogram(weight[a:b], n, **ops)
    return counts


def _rows(parts: list[torch.Tensor], like: torch.Tensor, cols: int) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return like.new_empty((0, cols))
    return torch.cat(parts)


class ShardedUniqueDKM(torch.autograd.Function):
    """Uniquified DKM of this rank's rows (module docstring). Inputs: local weight rows,
    centroids (G, K), tau (G,) fp32, iters, rows (global), start (global row of local row 0),
    group_rows (rows per LUT group), comm, compact, chunk, out_dtype, backend; outputs: the
    soft rows and c_T (G, K) fp32, the same on every rank."""

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        centroids: torch.Tensor,
        tau: torch.Tensor,
        iters: int,
        start: int,
        group_rows: int,
        comm: Comm,
        compact: bool | None,
        chunk: int,
        out_dtype: torch.dtype | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        segs = segments(start, start + weight.shape[0], group_rows)
        ops: dict[str, Any] = {"backend": backend, "chunk": chunk}
        counts = comm.all_reduce(local_counts(weight, centroids.shape[0], segs, **ops))
        c0 = centroids.detach().float()
        table, c, soft_table = table_forward(
            counts, pattern_dtype(weight), c0, tau, iters, compact=compact
        )
        del counts
        soft_table = soft_table.to(out_dtype or weight.dtype)
        parts = [
            gather_table(soft_table[g0 : g0 + n], weight[a:b], n, **ops) for a, b, g0, n in segs
        ]
        ctx.save_for_backward(weight, c0, tau)
        ctx.table, ctx.iters, ctx.ops, ctx.segs, ctx.comm = table, iters, ops, segs, comm
        return _rows(parts, soft_table, weight.shape[1]), c

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_soft: torch.Tensor | None, grad_c: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        weight, c0, tau = ctx.saved_tensors
        ops, segs, comm = ctx.ops, ctx.segs, ctx.comm
        need_w, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_bins = None
        if grad_soft is not None:
            g_bins = torch.zeros(c0.shape[0], BINS, dtype=torch.float32, device=weight.device)
            for a, b, g0, n in segs:
                g_bins[g0 : g0 + n] += scatter_bins(grad_soft[a:b], weight[a:b], n, **ops)
            comm.all_reduce(g_bins)
        grad_c0, per_row = table_backward(
            ctx.table, c0, tau, ctx.iters, g_bins, grad_c, need_w=need_w, need_c=need_c
        )
        grad_w = None
        if per_row is not None:
            if grad_soft is None:
                table = per_row.to(weight.dtype)
                parts = [
                    gather_table(table[g0 : g0 + n], weight[a:b], n, **ops) for a, b, g0, n in segs
                ]
            else:
                parts = [
                    unique_grad(grad_soft[a:b], weight[a:b], per_row[g0 : g0 + n], n, **ops)
                    for a, b, g0, n in segs
                ]
            grad_w = _rows(parts, weight, weight.shape[1])
        return grad_w, grad_c0, *([None] * 9)


def sharded_unique_dkm(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: torch.Tensor | float,
    iters: int,
    rows: int,
    comm: Comm,
    group_size: int | None = None,
    compact: bool | None = None,
    chunk: int = CHUNK,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniquified DKM of this rank's rows of a ``rows``-row weight (``comm.rows(rows)``).

    ``weight`` is the local (possibly empty) row shard; ``centroids`` (G, K) and ``tau`` are
    replicated; ``group_size`` is the LUT group's output channels (None: one LUT). Returns the
    soft rows (``out_dtype``, default the weight's) and c_T, bitwise the single-process
    engine's (:func:`edkm.dkm.unique.unique_dkm`) on every rank.
    """
    start, stop = comm.rows(rows)
    if weight.dim() != 2 or weight.shape[0] != stop - start:
        raise ValueError(
            f"rank {comm.rank} of {comm.world} holds rows {start}..{stop} of {rows}: expected a "
            f"({stop - start}, cols) shard, got {tuple(weight.shape)}"
        )
    groups = centroids.shape[0]
    group_rows = rows if group_size is None else group_size
    if group_rows * groups != rows:
        raise ValueError(f"{groups} LUT group(s) of {group_rows} rows do not make {rows} rows")
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=weight.device).expand(groups)
    resolved = resolve_backend(backend, weight)
    out: tuple[torch.Tensor, torch.Tensor] = ShardedUniqueDKM.apply(
        weight, centroids, tau_t.contiguous(), iters, start, group_rows, comm, compact, chunk,
        out_dtype, resolved,
    )  # fmt: skip
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class ShardedLinear(torch.autograd.Function):
    """``F.linear(x, all_gather(soft_rows), bias)`` that keeps only the rows for backward.

    Follows the ambient autocast as ``F.linear`` does (inputs cast to the autocast dtype).
    Backward all-gathers the rows again for ``dL/dx``, and reduce-scatters ``dL/dW`` (in the
    matmul's dtype, averaged over the ranks, as FSDP2 does by default) to the rows' owners.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        rows: torch.Tensor,
        bias: torch.Tensor | None,
        total: int,
        comm: Comm,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        full = comm.all_gather_rows(rows, total).to(dtype)
        xc = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, full, None if bias is None else bias.to(dtype))
        del full
        ctx.save_for_backward(xc, rows)
        ctx.total, ctx.comm, ctx.dtypes = total, comm, (x.dtype, bias is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, rows = ctx.saved_tensors
        x_dtype, has_bias = ctx.dtypes
        comm: Comm = ctx.comm
        g = grad.to(xc.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            full = comm.all_gather_rows(rows, ctx.total).to(xc.dtype)
            grad_x = (g @ full).to(x_dtype)
            del full
        g2, x2 = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
        grad_rows = None
        if ctx.needs_input_grad[1]:
            # reduced in the matmul's dtype, as FSDP2 reduces in the parameter dtype by default
            grad_rows = comm.reduce_scatter_rows(g2.t() @ x2).to(rows.dtype)
        grad_b = g2.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_rows, grad_b, None, None


def sharded_linear(
    x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None, *, total: int, comm: Comm
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the ``total``-row weight whose rows are sharded by ``comm``.

    Example:
        >>> w, x = torch.randn(5, 3), torch.randn(2, 3)
        >>> torch.equal(sharded_linear(x, w, None, total=5, comm=Comm.single()), x @ w.t())
        True
    """
    out: torch.Tensor = ShardedLinear.apply(x, rows, bias, total, comm)
    return out
