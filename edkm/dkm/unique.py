"""Uniquified DKM: the weight–centroid attention over at most 65,536 bit patterns per LUT group.

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

Table forms:
- fixed: 65,536 rows per group, absent rows given value 0 and count 0 (their pattern may be inf
  or NaN; 0 keeps every sum finite). No data-dependent shape: works under ``FakeTensorMode``
  and ``torch.compile``.
- compact: per group, only the patterns present, padded to the largest group's count. Cheaper
  whenever that count is well below 65,536 (small layers, narrow weight distributions, many
  groups); ``compact=None`` picks it when ``groups * rows <= COMPACT_RATIO * groups * 65536``
  and shapes may depend on data.

N-sized passes (pattern -> row, histogram, gather, scatter-add, per-weight gradient) run over
blocks of about ``CHUNK`` weights, so their temporaries (int32 rows, fp32 gradients) stay
cache-sized instead of N-sized: memory beyond the output is O(CHUNK + table).

Example:
    >>> import torch
    >>> w = torch.randn(64, 32).bfloat16()
    >>> c = torch.linspace(-2, 2, 4)[None]
    >>> soft, c_new = unique_dkm(w, c, tau=0.1, iters=2)
    >>> soft.dtype, tuple(c_new.shape)
    (torch.bfloat16, (1, 4))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

BINS = 1 << 16
# Compact the table when (groups x padded rows) is at most this share of the fixed table.
COMPACT_RATIO = 0.5
# Weights per block in the N-sized passes: 2^18 keeps one block's int32 rows and fp32
# gradients (1 MiB each) in L2, so each pass reads the weight once from memory.
CHUNK = 1 << 18
# A cluster whose mass ``s0 = sum_i a_ij`` (in weights) is at most this counts as empty and
# keeps its centroid. Its update ``s1 / s0`` has derivative ``-c / s0``: for a subnormal s0 that
# overflows fp32 and backward returns NaN even for a zero upstream gradient (0 * inf), in every
# method. 2^-63 = sqrt(fp32 smallest normal) bounds 1/s0 by 2^63; such a cluster moves the soft
# weights by at most 2^-63 |c|. The same absolute bound in every compute dtype, so the fp64
# oracle of the tests follows the same rule.
MIN_MASS = 2.0**-63


def is_symbolic(t: torch.Tensor) -> bool:
    """True for FakeTensors and while compiling: no data-dependent shapes or checks allowed.

    Example:
        >>> is_symbolic(torch.zeros(2))
        False
    """
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t)) or torch.compiler.is_compiling()


def pattern_dtype(weight: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype whose bit pattern indexes the table: fp16 for fp16 weights, else bf16.

    Example:
        >>> pattern_dtype(torch.zeros(1))
        torch.bfloat16
    """
    return torch.float16 if weight.dtype == torch.float16 else torch.bfloat16


def pattern_values(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """(65536,) fp32: the value of every 16-bit pattern of ``dtype`` (inf/NaN included).

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


# ---- N-sized passes, block by block -------------------------------------------------------------


def _blocks(groups: int, per_group: int, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks ``(g0, g1, m0, m1)`` of a (groups, per_group) view, about ``chunk`` weights each.

    Several whole groups per block when groups are small, else a slice of one group, so a
    block's rows are ``pattern + g * BINS`` with one broadcast offset per group.
    """
    if per_group >= chunk:
        for g in range(groups):
            for m0 in range(0, per_group, chunk):
                yield g, g + 1, m0, min(m0 + chunk, per_group)
    else:
        step = max(1, chunk // max(per_group, 1))
        for g0 in range(0, groups, step):
            yield g0, min(g0 + step, groups), 0, per_group


def block_rows(block: torch.Tensor, g0: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Table row ``g * 65536 + pattern`` of every weight in a (groups, m) block, int32.

    fp32 weights are rounded to bf16 first (the pattern the clustering sees). ``out`` is a
    reusable buffer of the block's shape (int64 when rows reach 2^31, beyond 32,767 groups).

    Example:
        >>> block_rows(torch.tensor([[1.0, -2.0]]).bfloat16(), 0).tolist()
        [[16256, 49152]]
    """
    if block.dtype not in (torch.bfloat16, torch.float16):
        block = block.to(torch.bfloat16)
    if out is None:
        big = (g0 + block.shape[0]) * BINS > torch.iinfo(torch.int32).max
        out = torch.empty(
            block.shape, dtype=torch.int64 if big else torch.int32, device=block.device
        )
    # Widen the signed int16 view and mask: a uint16 source has no vectorized copy on CPU
    # (measured ~10x slower); both steps stay in cache when the block does.
    rows = out.copy_(block.view(torch.int16)).bitwise_and_(0xFFFF)
    if g0 or block.shape[0] > 1:
        offsets = torch.arange(g0, g0 + block.shape[0], device=block.device, dtype=rows.dtype)
        rows.add_(offsets.mul_(BINS).unsqueeze(1))
    return rows


class _Blocks:
    """Blocks of a weight viewed as (groups, per_group), with one scratch buffer for the rows
    (and one for bf16 rounding of fp32 weights) reused by every block: fresh N- or block-sized
    allocations cost page faults that dominate these cheap passes. One block while compiling
    (graphs stay small); FakeTensors keep the real block size, so that memory measured under
    FakeTensorMode equals the real run's (N-sized scratch would inflate it)."""

    def __init__(self, weight: torch.Tensor, groups: int, chunk: int) -> None:
        self.w = weight.detach().reshape(groups, -1)
        self.groups, self.per_group = groups, self.w.shape[1]
        if torch.compiler.is_compiling():
            chunk = max(weight.numel(), 1)
        self.spans = list(_blocks(groups, self.per_group, chunk))
        self.size = max(((g1 - g0) * (m1 - m0) for g0, g1, m0, m1 in self.spans), default=0)
        big = groups * BINS > torch.iinfo(torch.int32).max
        dev = weight.device
        self._rows = torch.empty(self.size, dtype=torch.int64 if big else torch.int32, device=dev)
        self._w16 = None
        if self.w.dtype not in (torch.bfloat16, torch.float16):
            self._w16 = torch.empty(self.size, dtype=torch.bfloat16, device=dev)

    def scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """A block-sized buffer for a pass's own temporaries."""
        return torch.empty(self.size, dtype=dtype, device=self.w.device)

    def __iter__(self) -> Iterator[tuple[slice, tuple[slice, slice], torch.Tensor]]:
        """``(flat slice, (group slice, column slice), rows)``; ``rows`` (flat, int) is
        overwritten by the next block: use it before advancing."""
        for g0, g1, m0, m1 in self.spans:
            shape = (g1 - g0, m1 - m0)
            n = shape[0] * shape[1]
            block = self.w[g0:g1, m0:m1]
            if self._w16 is not None:
                block = self._w16[:n].view(shape).copy_(block)  # round to nearest even
            rows = block_rows(block, g0, self._rows[:n].view(shape))
            start = g0 * self.per_group + m0
            yield slice(start, start + n), (slice(g0, g1), slice(m0, m1)), rows.view(-1)


def histogram(weight: torch.Tensor, groups: int, *, chunk: int = CHUNK) -> torch.Tensor:
    """(G, 65536) int32 pattern counts per group, by scatter-add into zeros (fixed shape).

    int32, not fp32: fp32 stops counting at 2^24, and one value (zeros of a pruned layer) can
    occur more often than that.

    Example:
        >>> histogram(torch.tensor([1.0, 1.0, 2.0]), 1)[0, 0x3F80].item()
        2
    """
    counts = torch.zeros(groups * BINS, dtype=torch.int32, device=weight.device)
    blocks = _Blocks(weight, groups, chunk)
    one = torch.ones((), dtype=torch.int32, device=weight.device).expand(blocks.size)
    for _, _, rows in blocks:
        counts.index_add_(0, rows, one[: rows.numel()])
    return counts.view(groups, BINS)


def gather_table(
    table: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    *,
    chunk: int = CHUNK,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``table.flatten()[rows(weight)]`` in the weight's shape and dtype (or ``dtype``).

    Example:
        >>> t = torch.zeros(1, 65536); t[0, 0x3F80] = 5.0
        >>> gather_table(t, torch.tensor([1.0, 2.0]), 1).tolist()
        [5.0, 0.0]
    """
    # cast the table once (<= G * 128 KiB): the gather then writes final values, 2 B a weight
    dtype = weight.dtype if dtype is None else dtype
    flat_table = table.reshape(-1).to(dtype)
    out = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
    for part, _, rows in _Blocks(weight, groups, chunk):
        torch.index_select(flat_table, 0, rows, out=out[part])
    return out.view(weight.shape)


def _grad_block(grad2d: torch.Tensor, span: tuple[slice, slice], buf: torch.Tensor) -> torch.Tensor:
    """The fp32 flat upstream gradient of one block (a view when it already is one)."""
    block = grad2d[span]
    if block.dtype == torch.float32 and block.is_contiguous():
        return block.reshape(-1)
    return buf[: block.numel()].view(block.shape).copy_(block).view(-1)


def scatter_bins(
    grad: torch.Tensor, weight: torch.Tensor, groups: int, *, chunk: int = CHUNK
) -> torch.Tensor:
    """(G, 65536) fp32: the sum of ``grad`` over the weights of each table row.

    Example:
        >>> scatter_bins(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]), 1)[0, 0x4040].item()
        3.0
    """
    out = torch.zeros(groups * BINS, dtype=torch.float32, device=weight.device)
    blocks = _Blocks(weight, groups, chunk)
    grad2d, buf = grad.reshape(groups, -1), blocks.scratch(torch.float32)
    for _, span, rows in blocks:
        out.index_add_(0, rows, _grad_block(grad2d, span, buf))
    return out.view(groups, BINS)


def weight_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    slope: torch.Tensor,
    shared: torch.Tensor,
    groups: int,
    *,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``g_i * D[b_i] + H[b_i]`` in fp32, cast to the weight's dtype and shape.

    Example:
        >>> d = torch.full((1, 65536), 2.0); h = torch.ones(1, 65536)
        >>> weight_grad(torch.tensor([3.0]), torch.tensor([0.5]), d, h, 1).tolist()
        [7.0]
    """
    # D and H side by side: one 8-byte gather per weight instead of two 4-byte ones.
    pair = torch.stack([slope.reshape(-1), shared.reshape(-1)], dim=1).contiguous()
    pair64 = pair.view(torch.float64).view(-1)
    out = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
    blocks = _Blocks(weight, groups, chunk)
    grad2d, gbuf = grad.reshape(groups, -1), blocks.scratch(torch.float32)
    dh_buf = blocks.scratch(torch.float64)
    vbuf = None if weight.dtype == torch.float32 else blocks.scratch(torch.float32)
    for part, span, rows in blocks:
        n = rows.numel()
        g = _grad_block(grad2d, span, gbuf)
        dh = torch.index_select(pair64, 0, rows, out=dh_buf[:n]).view(torch.float32).view(n, 2)
        if vbuf is None:
            torch.addcmul(dh[:, 1], g, dh[:, 0], out=out[part])
        else:
            out[part].copy_(torch.addcmul(dh[:, 1], g, dh[:, 0], out=vbuf[:n]))
    return out.view(weight.shape)


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
    (``sum_i a_ij <= MIN_MASS``, e.g. underflow) keeps its centroid. Shared by every method.

    Example:
        >>> a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
        >>> centroid_update(a, torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 9.0]])).tolist()
        [[2.0, 9.0]]
    """
    s0 = a.sum(1)
    s1 = (a * x.unsqueeze(-1)).sum(1)
    present = s0 > MIN_MASS
    return torch.where(present, s1 / torch.where(present, s0, torch.ones_like(s0)), c)


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


# ---- the autograd function ----------------------------------------------------------------------


class UniqueDKM(torch.autograd.Function):
    """Uniquified DKM (module docstring). Inputs: weight, centroids (G, K) fp32, tau (G,) fp32,
    iters, groups, compact, chunk, out_dtype; outputs: soft weight (``out_dtype``, default the
    weight's dtype), c_T (G, K) fp32."""

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
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = pattern_dtype(weight)
        counts = histogram(weight, groups, chunk=chunk)
        check_finite_patterns(counts, dtype)
        table = build_table(counts, dtype, compact=compact)
        del counts
        c0 = centroids.detach().float()
        c = table_iterations(table.u, table.n, c0, tau, iters)
        soft = gather_table(
            table.expand(table_output(table.u, c, tau)),
            weight,
            groups,
            chunk=chunk,
            dtype=out_dtype,
        )
        # Nothing N-sized beyond the weight itself (which the layer holds anyway): the rows
        # are recomputed from it in backward.
        ctx.save_for_backward(weight, c0, tau)
        ctx.table, ctx.iters, ctx.groups, ctx.chunk = table, iters, groups, chunk
        return soft, c

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_soft: torch.Tensor | None, grad_c: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        weight, c0, tau = ctx.saved_tensors
        table: Table = ctx.table
        groups, chunk = ctx.groups, ctx.chunk
        need_w, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_rows = None
        if grad_soft is not None:
            g_rows = table.reduce(scatter_bins(grad_soft, weight, groups, chunk=chunk))
        with torch.enable_grad():
            # u feeds the k-means iterations as a leaf; the final soft assignment sees u as a
            # constant (its derivative is the closed-form local slope below).
            u_iter = table.u.detach().requires_grad_(need_w)
            c_start = c0.detach().requires_grad_(need_c)
            c_t = table_iterations(u_iter, table.n, c_start, tau, ctx.iters)
            loss = torch.zeros((), device=c0.device)
            if g_rows is not None:
                loss = loss + (table_output(table.u, c_t, tau) * g_rows).sum()
            if grad_c is not None:
                loss = loss + (c_t * grad_c).sum()
            leaves = [t for t, need in ((u_iter, need_w), (c_start, need_c)) if need]
            grads = list(torch.autograd.grad(loss, leaves, allow_unused=True)) if leaves else []
        grad_w = grad_c0 = None
        if need_c:
            grad_c0 = grads.pop()
            if grad_c0 is None:
                grad_c0 = torch.zeros_like(c0)
        if need_w:
            d_u = grads.pop()
            n = table.n
            shared = torch.zeros_like(n) if d_u is None else d_u / torch.where(n > 0, n, 1.0)
            shared = torch.where(n > 0, shared, 0.0)
            if grad_soft is None:
                grad_w = table_gather_shared(table.expand(shared), weight, groups, chunk)
            else:
                slope = local_slope(table.u, c_t.detach(), tau)
                grad_w = weight_grad(
                    grad_soft,
                    weight,
                    table.expand(slope),
                    table.expand(shared),
                    groups,
                    chunk=chunk,
                )
        return grad_w, grad_c0, None, None, None, None, None, None


def table_gather_shared(
    shared: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int
) -> torch.Tensor:
    """Weight gradient when only ``c_T`` received a gradient: ``H[b_i]`` (fp32 table)."""
    flat_table = shared.reshape(-1).to(weight.dtype)
    out = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
    for part, _, rows in _Blocks(weight, groups, chunk):
        torch.index_select(flat_table, 0, rows, out=out[part])
    return out.view(weight.shape)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniquified DKM of a weight split into ``groups`` LUT groups of consecutive rows.

    Inputs are assumed validated (``edkm.dkm.soft.dkm_soft`` does it); non-finite weights raise
    ``ValueError`` here too (from the histogram, no extra pass). ``compact=None`` picks the
    table form by size; ``chunk`` is the block size of the N-sized passes; ``out_dtype`` is the
    soft weight's dtype (default: the weight's), e.g. bf16 under autocast, which saves the cast.

    Example:
        >>> w = torch.tensor([[0.0, 1.0], [1.0, 4.0]])
        >>> soft, c = unique_dkm(w, torch.tensor([[0.0, 4.0]]), tau=1e-3, iters=1)
        >>> c.tolist()
        [[0.6666666865348816, 4.0]]
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=weight.device).expand(groups)
    out: tuple[torch.Tensor, torch.Tensor] = UniqueDKM.apply(
        weight, centroids, tau_t.contiguous(), iters, groups, compact, chunk, out_dtype
    )
    return out
