"""The uniquified DKM engine: DKM over the at most 65,536 bit patterns of each LUT group.

A 16-bit weight takes one of 65,536 bit patterns, so DKM's sums over N weights become sums over
the pattern table weighted by its histogram ``n_u`` (DESIGN.md section 3). The pattern of a
weight IS its row in the table: nothing N-sized is kept for backward but the weight itself.

Per LUT group, with ``u`` the value of pattern ``u``::

    A_uj = softmax_j(-(u - c_j)^2 / tau)
    c_j  <- sum_u n_u A_uj u / sum_u n_u A_uj                 (iters times, from the warm start)
    T_u  = sum_j A_uj c_T,j ;  soft_weight_i = T[b_i]           (a gather)

Backward, with upstream ``g``: ``G_u`` = scatter-add of ``g`` into the bins; the small table graph
is rebuilt under ``enable_grad`` with ``u`` as the leaf feeding the k-means iterations (the leaf
feeding the final soft assignment is a constant there: its derivative is the closed-form local
slope ``D_u = dT_u/du`` at fixed ``c_T``), differentiated with upstream ``G`` (and the upstream of
``c_T``); ``H_u`` = (dL/du through the centroid path) / n_u; then ``dL/dw_i = g_i * D[b_i] +
H[b_i]``. Every weight keeps its own ``g_i``; only the centroid path is shared by equal weights,
so the gradient equals the reference DKM's to float rounding.

Why by hand: no library implements uniquified DKM. coremltools' ``DKMPalettizer`` and the
paper's code materialise the N x K attention (the reference method here); PyTorch's
``torch.unique`` has a data-dependent output shape and no gradient for the pattern counts, and
a histogram + gather + scatter-add with this exact per-weight gradient is no op that autograd,
``torch.compile`` or a kernel library provides. So the engine is one ``torch.autograd.Function``
whose four per-weight passes are the ``torch.library`` custom ops of
:mod:`edkm.kernels.unique` (``edkm::bit_histogram``, ``edkm::gather_table``,
``edkm::scatter_bins``, ``edkm::unique_grad``), and whose table math is plain torch.

The per-weight passes run on ``backend``: ``"torch"`` (chunked PyTorch ops: memory beyond the
output is O(chunk + table)), ``"triton"`` (the Triton kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), or ``"auto"`` (Triton for CUDA tensors when triton is installed). Both
give the same histogram and gather bit for bit; sums agree to float rounding.

Table forms:
- fixed: 65,536 rows per group, absent rows given value 0 and count 0 (their pattern may be inf
  or NaN; 0 keeps every sum finite). No data-dependent shape: works under ``FakeTensorMode``
  and ``torch.compile``.
- compact: per group, only the patterns present, padded to the largest group's count. Cheaper
  whenever that count is well below 65,536 (small layers, narrow weight distributions, many
  groups); ``compact=None`` picks it when ``groups * rows <= COMPACT_RATIO * groups * 65536``
  and shapes may depend on data.

Cost of grouped LUTs (one LUT per ``group_size`` consecutive output channels, as Core ML
iOS18 stores them): the group is part of a weight's table row (``g * 65536 + pattern``), so
each of the four per-weight passes is ONE custom-op call for the whole layer, whatever G is
(one kernel launch on Triton; on torch, blocks of about ``chunk`` weights, a block never
spanning a partial group, so at most ``N / chunk + G`` blocks). There is no loop over groups
on the weights. Only the table work grows with G: the (G, rows) table, the k-means iterations
on it and its backward, O(G * rows * K * iters) with rows <= 65,536 (compact: the most
patterns any group holds). tests/dkm/test_grouped.py counts the op calls.

Example:
    >>> import torch
    >>> w = torch.randn(64, 32).bfloat16()
    >>> c = torch.linspace(-2, 2, 4)[None]
    >>> soft, c_new = unique_dkm(w, c, tau=0.1, iters=2)
    >>> soft.dtype, tuple(c_new.shape)
    (torch.bfloat16, (1, 4))
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from edkm.kernels._common import BINS, centroid_step, resolve_backend
from edkm.kernels.unique import CHUNK, bit_histogram, gather_table, scatter_bins, unique_grad

# Compact the table when (groups x padded rows) is at most this share of the fixed table.
COMPACT_RATIO = 0.5


def is_symbolic(t: torch.Tensor) -> bool:
    """True for FakeTensors and while compiling: no data-dependent shapes or checks allowed.

    Example:
        >>> is_symbolic(torch.zeros(2))
        False
    """
    if torch.compiler.is_compiling():  # first: dynamo does not trace into is_fake
        return True
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t))


def pattern_dtype(weight: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype whose bit pattern indexes the table: fp16 for fp16 weights, else bf16.

    Example:
        >>> pattern_dtype(torch.zeros(1))
        torch.bfloat16
    """
    return torch.float16 if weight.dtype == torch.float16 else torch.bfloat16


def pattern_values(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """(65536,) fp32: the value of every 16-bit pattern of ``dtype`` (inf/NaN included).

    The one value table of the uniquified DKM (``build_table`` zeroes the rows no weight has).

    Example:
        >>> pattern_values(torch.bfloat16)[0x3F80].item()
        1.0
    """
    # built on the fly (65,536 elements): a cached tensor would leak between real and fake modes
    patterns = torch.arange(BINS, dtype=torch.int32, device=device).to(torch.int16)
    return patterns.view(dtype).float()


def nonfinite_patterns(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """(65536,) bool: the patterns that encode inf or NaN (all-ones exponent).

    Example:
        >>> int(nonfinite_patterns(torch.float16).sum())
        2048
    """
    return ~torch.isfinite(pattern_values(dtype, device))


# ---- the small table graph: O(groups * rows * K * iters) ---------------------------------------


def soft_assign(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(G, R, K) attention ``softmax_j(-(u - c_j)^2 / tau)`` for (G, R) rows, (G, K) centroids.

    Example:
        >>> soft_assign(torch.zeros(1, 1), torch.tensor([[-1.0, 1.0]]), torch.ones(1)).tolist()
        [[[0.5, 0.5]]]
    """
    # Computed as (G, K, R) with the softmax over K, then viewed as (G, R, K): PyTorch's CPU
    # softmax along a short last dim (K <= 256) is ~10x slower than along a middle one.
    d = (u.unsqueeze(1) - c.unsqueeze(-1)).square()
    return torch.softmax(d / (-tau.view(-1, 1, 1)), dim=1).transpose(1, 2)


def centroid_update(a: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One k-means update ``sum_i a_ij x_i / sum_i a_ij`` over dim 1; an empty cluster
    (``sum_i a_ij <= MIN_MASS``, e.g. underflow) keeps its centroid (``centroid_step``).

    Example:
        >>> a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
        >>> centroid_update(a, torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 9.0]])).tolist()
        [[2.0, 9.0]]
    """
    return centroid_step(a.sum(1), (a * x.unsqueeze(-1)).sum(1), c)


def table_iterations(
    u: torch.Tensor, n: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, iters: int
) -> torch.Tensor:
    """``iters`` k-means updates on the table (rows ``u`` weighted by counts ``n``)."""
    for _ in range(iters):
        c = centroid_update(soft_assign(u, c, tau) * n.unsqueeze(-1), u, c)
    return c


def table_output(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(G, R) soft value of every row: ``T_u = sum_j A_uj c_j``."""
    return (soft_assign(u, c, tau) * c.unsqueeze(1)).sum(-1)


def local_slope(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(G, R) ``D_u = dT_u/du`` at fixed centroids.

    With ``z_j = -(u - c_j)^2 / tau``: ``D = sum_j A_j (c_j - T) dz_j/du``, in the same order
    as autograd's softmax backward (the centred form avoids the cancellation of
    ``E[c dz] - E[c] E[dz]`` at small tau).
    """
    a = soft_assign(u, c, tau)
    t = (a * c.unsqueeze(1)).sum(-1, keepdim=True)
    dz = (u.unsqueeze(-1) - c.unsqueeze(1)) * (-2.0 / tau.view(-1, 1, 1))
    return (a * (c.unsqueeze(1) - t) * dz).sum(-1)


# ---- table construction ------------------------------------------------------------------------


class Table:
    """The weighted rows of one call: values ``u`` (G, R), counts ``n`` (G, R) fp32, and for a
    compact table the map between full rows (``g * 65536 + pattern``) and compact slots."""

    def __init__(
        self,
        u: torch.Tensor,
        n: torch.Tensor,
        full_rows: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> None:
        self.u, self.n = u, n
        self.full_rows, self.slots = full_rows, slots

    @property
    def compact(self) -> bool:
        return self.full_rows is not None

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """(G, R) per-row values -> (G, 65536) full table (0 in absent rows)."""
        if self.full_rows is None or self.slots is None:
            return values
        groups = values.shape[0]
        full = torch.zeros(groups * BINS, dtype=values.dtype, device=values.device)
        full[self.full_rows] = values.reshape(-1)[self.slots]
        return full.view(groups, BINS)

    def reduce(self, full: torch.Tensor) -> torch.Tensor:
        """(G, 65536) full-table values -> (G, R) per-row values."""
        if self.full_rows is None or self.slots is None:
            return full
        out = torch.zeros(self.u.numel(), dtype=full.dtype, device=full.device)
        out[self.slots] = full.reshape(-1)[self.full_rows]
        return out.view(self.u.shape)


def build_table(counts: torch.Tensor, dtype: torch.dtype, *, compact: bool | None = None) -> Table:
    """Rows of the table from (G, 65536) counts; see the module docstring for the two forms.

    ``compact=None`` decides by size (never when shapes are symbolic); True/False force it
    (True needs concrete shapes).

    Example:
        >>> counts = torch.zeros(1, 65536, dtype=torch.int32); counts[0, 0x3F80] = 3
        >>> t = build_table(counts, torch.bfloat16, compact=True)
        >>> t.u.tolist(), t.n.tolist()
        ([[1.0]], [[3.0]])
    """
    values = pattern_values(dtype, counts.device)
    symbolic = is_symbolic(counts)
    if compact and symbolic:
        raise ValueError("a compact table needs concrete shapes (not FakeTensor / compile)")
    if compact is False or symbolic:
        return _fixed_table(counts, values)
    present = counts > 0
    per_group = present.sum(1)
    width = max(int(per_group.max()), 1)
    groups = counts.shape[0]
    if compact is None and groups * width > COMPACT_RATIO * counts.numel():
        return _fixed_table(counts, values)
    group, pattern = present.nonzero(as_tuple=True)  # group-major, so slots count up per group
    starts = per_group.cumsum(0) - per_group
    slot = torch.arange(group.numel(), device=counts.device) - starts[group]
    slots = group * width + slot
    full_rows = group * BINS + pattern
    u = torch.zeros(groups * width, device=counts.device)
    n = torch.zeros(groups * width, device=counts.device)
    u[slots] = values[pattern]
    n[slots] = counts.reshape(-1)[full_rows].float()
    return Table(u.view(groups, width), n.view(groups, width), full_rows, slots)


def _fixed_table(counts: torch.Tensor, values: torch.Tensor) -> Table:
    u = torch.where(counts > 0, values.unsqueeze(0), torch.zeros((), device=counts.device))
    return Table(u, counts.float())


def check_finite_patterns(counts: torch.Tensor, dtype: torch.dtype) -> None:
    """ValueError when a weight's 16-bit pattern is inf/NaN (no-op on symbolic shapes)."""
    if is_symbolic(counts):
        return
    bad = int(counts[:, nonfinite_patterns(dtype, counts.device)].sum())
    if bad:
        raise ValueError(
            f"weight has {bad} non-finite value(s) (NaN/inf, or beyond the 16-bit range after "
            "rounding); DKM cannot cluster them"
        )


# ---- the table passes: everything between the per-weight passes ---------------------------------
# ``UniqueDKM`` calls them with the histogram / bin sums of the whole weight; the sharded engine
# (``edkm.shard.engine``) calls the very same functions with sums all-reduced over the ranks'
# shards, so both paths run identical table math.


def table_forward(
    counts: torch.Tensor,
    dtype: torch.dtype,
    c0: torch.Tensor,
    tau: torch.Tensor,
    iters: int,
    *,
    compact: bool | None = None,
) -> tuple[Table, torch.Tensor, torch.Tensor]:
    """From (G, 65536) pattern counts: ``(table, c_T, soft table (G, 65536) fp32)``.

    Checks the counts for non-finite patterns first (``ValueError``), then builds the table
    (form chosen from the counts), runs the k-means iterations from ``c0`` and evaluates
    ``T_u`` on every row.

    Example:
        >>> counts = torch.zeros(1, 65536, dtype=torch.int32); counts[0, 0x3F80] = 2
        >>> _, c, soft = table_forward(counts, torch.bfloat16, torch.tensor([[0.0, 2.0]]),
        ...                            torch.ones(1), 1)
        >>> soft.shape, round(soft[0, 0x3F80].item(), 4)
        (torch.Size([1, 65536]), 1.0)
    """
    check_finite_patterns(counts, dtype)
    table = build_table(counts, dtype, compact=compact)
    c = table_iterations(table.u, table.n, c0, tau, iters)
    # the caller casts the table once (<= G * 128 KiB): the gather then writes final values
    return table, c, table.expand(table_output(table.u, c, tau))


def table_backward(
    table: Table,
    c0: torch.Tensor,
    tau: torch.Tensor,
    iters: int,
    g_bins: torch.Tensor | None,
    grad_c: torch.Tensor | None,
    *,
    need_w: bool,
    need_c: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward through the table: ``(dL/dc0 or None, per-row table or None)``.

    ``g_bins`` is the (G, 65536) fp32 sum of the upstream gradient over each pattern's weights
    (``G_u``), or None when the soft weight got no gradient. The per-row table (only when
    ``need_w``) is the interleaved (G, 65536, 2) ``[D, H]`` for ``edkm::unique_grad`` when
    ``g_bins`` is given, else the (G, 65536) ``H`` alone (gathered as the weight gradient).
    """
    g_rows = None if g_bins is None else table.reduce(g_bins)
    with torch.enable_grad():
        # u feeds the k-means iterations as a leaf; the final soft assignment sees u as a
        # constant (its derivative is the closed-form local slope below).
        u_iter = table.u.detach().requires_grad_(need_w)
        c_start = c0.detach().requires_grad_(need_c)
        c_t = table_iterations(u_iter, table.n, c_start, tau, iters)
        loss = torch.zeros((), device=c0.device)
        if g_rows is not None:
            loss = loss + (table_output(table.u, c_t, tau) * g_rows).sum()
        if grad_c is not None:
            loss = loss + (c_t * grad_c).sum()
        leaves = [t for t, need in ((u_iter, need_w), (c_start, need_c)) if need]
        grads = list(torch.autograd.grad(loss, leaves, allow_unused=True)) if leaves else []
    grad_c0 = per_row = None
    if need_c:
        grad_c0 = grads.pop()
        if grad_c0 is None:
            grad_c0 = torch.zeros_like(c0)
    if need_w:
        d_u = grads.pop()
        n = table.n
        shared = torch.zeros_like(n) if d_u is None else d_u / torch.where(n > 0, n, 1.0)
        per_row = table.expand(torch.where(n > 0, shared, 0.0))
        if g_rows is not None:
            slope = table.expand(local_slope(table.u, c_t.detach(), tau))
            per_row = torch.stack([slope, per_row], dim=-1)
    return grad_c0, per_row


# ---- the autograd function ----------------------------------------------------------------------


class UniqueDKM(torch.autograd.Function):
    """Uniquified DKM (module docstring). Inputs: weight, centroids (G, K) fp32, tau (G,) fp32,
    iters, groups, compact, chunk, out_dtype, backend ("torch" or "triton"); outputs: soft
    weight (``out_dtype``, default the weight's dtype), c_T (G, K) fp32."""

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        centroids: torch.Tensor,
        tau: torch.Tensor,
        iters: int,
        groups: int,
        compact: bool | None,
        chunk: int,
        out_dtype: torch.dtype | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = pattern_dtype(weight)
        ops: dict[str, Any] = {"groups": groups, "backend": backend, "chunk": chunk}
        counts = bit_histogram(weight, **ops)
        c0 = centroids.detach().float()
        table, c, soft_table = table_forward(counts, dtype, c0, tau, iters, compact=compact)
        del counts
        soft = gather_table(soft_table.to(out_dtype or weight.dtype), weight, **ops)
        # Nothing N-sized beyond the weight itself (which the layer holds anyway): the rows
        # are recomputed from it in backward.
        ctx.save_for_backward(weight, c0, tau)
        ctx.table, ctx.iters, ctx.ops = table, iters, ops
        return soft, c

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_soft: torch.Tensor | None, grad_c: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        weight, c0, tau = ctx.saved_tensors
        table: Table = ctx.table
        ops: dict[str, Any] = ctx.ops
        need_w, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_bins = None if grad_soft is None else scatter_bins(grad_soft, weight, **ops)
        grad_c0, per_row = table_backward(
            table, c0, tau, ctx.iters, g_bins, grad_c, need_w=need_w, need_c=need_c
        )
        grad_w = None
        if per_row is not None:
            if grad_soft is None:  # only c_T received a gradient: H[b_i]
                grad_w = gather_table(per_row.to(weight.dtype), weight, **ops)
            else:
                grad_w = unique_grad(grad_soft, weight, per_row, **ops)
        return grad_w, grad_c0, None, None, None, None, None, None, None


def unique_dkm(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: torch.Tensor | float,
    iters: int,
    groups: int = 1,
    compact: bool | None = None,
    chunk: int = CHUNK,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniquified DKM of a weight split into ``groups`` LUT groups of consecutive rows.

    Inputs are assumed validated (``edkm.dkm.soft.dkm_soft`` does it); non-finite weights raise
    ``ValueError`` here too (from the histogram, no extra pass). ``compact=None`` picks the
    table form by size; ``chunk`` is the block size of the torch per-weight passes;
    ``out_dtype`` is the soft weight's dtype (default: the weight's), e.g. bf16 under autocast,
    which saves the cast; ``backend`` runs the per-weight passes with torch ops or the Triton
    kernels (module docstring).

    Example:
        >>> w = torch.tensor([[0.0, 1.0], [1.0, 4.0]])
        >>> soft, c = unique_dkm(w, torch.tensor([[0.0, 4.0]]), tau=1e-3, iters=1)
        >>> c.tolist()
        [[0.6666666865348816, 4.0]]
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=weight.device).expand(groups)
    resolved = resolve_backend(backend, weight)
    out: tuple[torch.Tensor, torch.Tensor] = UniqueDKM.apply(
        weight, centroids, tau_t.contiguous(), iters, groups, compact, chunk, out_dtype, resolved
    )
    return out
