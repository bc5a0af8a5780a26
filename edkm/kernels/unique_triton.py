"""Triton kernels of the uniquified path: histogram, gather, scatter-add and fused backward.

Imported only when the Triton bin engine is used (``unique.bin_engine_for``), so that
``TRITON_INTERPRET`` can be set before these ``@triton.jit`` decorators run. The pure-PyTorch
references are in ``unique`` (``bit_histogram_ref``, ``gather_table_ref``, ``scatter_bins_ref``,
``unique_grad_ref``); read them first.

Every kernel reads each weight's 16-bit pattern as int16 (2 B/weight) and turns it into the table
row ``group * 65536 + bits``. The histogram and the scatter-add aggregate inside a block before
touching global memory, so a popular bin (zero, or a weight repeated all over the tensor) costs
one atomic per block rather than one per weight: the block's rows are sorted (bitonic network in
registers), equal rows form runs, a ``tl.histogram`` over run ids counts each run (a block-local
partial histogram), and only the first (or last) lane of each run issues the global atomic.

Example:
    >>> import torch
    >>> w = torch.randn(64, 64, device="cuda").to(torch.bfloat16)  # doctest: +SKIP
    >>> TritonBinEngine().histogram(w, None).sum().item()  # doctest: +SKIP
    4096
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edkm.kernels._common import interpreting, lut_groups, next_pow2
from edkm.kernels.triton_ops import cast_rne, check_launchable, sort_ascending

BINS = 1 << 16


@triton.jit
def _table_rows(bits_ptr, offs, mask, group_elems):
    """Table row of each weight: group * 65536 + its 16-bit pattern (2 B/weight read)."""
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    return (offs // group_elems).to(tl.int32) * 65536 + bits


@triton.jit
def _runs(sorted_rows, BLOCK: tl.constexpr):
    """Run structure of a sorted tile: head-of-run mask, run id, run length, run start."""
    lane = tl.arange(0, BLOCK)
    prev = tl.gather(sorted_rows, tl.maximum(lane - 1, 0), 0)
    head = (lane == 0) | (sorted_rows != prev)
    run = tl.cumsum(head.to(tl.int32), 0) - 1
    length = tl.histogram(run, BLOCK)  # block-local partial histogram over the runs
    start = tl.cumsum(length, 0) - length
    return head, run, tl.gather(length, run, 0), tl.gather(start, run, 0)


@triton.jit
def _histogram_kernel(
    bits_ptr, hist_ptr, n, group_elems, n_rows, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = tl.where(mask, _table_rows(bits_ptr, offs, mask, group_elems), n_rows)
    rows = sort_ascending(rows.to(tl.int64), LOG_BLOCK).to(tl.int32)  # padding sorts last
    head, _run, length, _start = _runs(rows, BLOCK)
    # one 4 B atomic per distinct row in the block
    tl.atomic_add(hist_ptr + rows, length, mask=head & (rows < n_rows))


@triton.jit
def _scatter_kernel(
    bits_ptr, g_ptr, out_ptr, n, group_elems, n_rows, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    offs = base + lane
    mask = offs < n
    rows = tl.where(mask, _table_rows(bits_ptr, offs, mask, group_elems), n_rows)
    # sort (row, lane) pairs together: the low bits remember where each row came from
    packed = sort_ascending((rows.to(tl.int64) << LOG_BLOCK) | lane, LOG_BLOCK)
    rows = (packed >> LOG_BLOCK).to(tl.int32)
    src = (packed & (BLOCK - 1)).to(tl.int32)
    valid = rows < n_rows
    # 2-4 B/weight read of g, permuted within this block's own (cached) lines
    g = tl.load(g_ptr + base + src, mask=valid, other=0.0).to(tl.float64)
    _head, _run, length, start = _runs(rows, BLOCK)
    # run sums as differences of an fp64 prefix sum: exact enough that cancellation between
    # runs never shows in the fp32 result
    prefix = tl.cumsum(g, 0)
    before = tl.gather(prefix - g, start, 0)
    last = lane == start + length - 1
    tl.atomic_add(out_ptr + rows, (prefix - before).to(tl.float32), mask=last & valid)


@triton.jit
def _gather_kernel(bits_ptr, table_ptr, out_ptr, n, group_elems, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = _table_rows(bits_ptr, offs, mask, group_elems)
    # 2 B/weight gathered from a 128 KiB-per-group bf16 table (L2-resident), 2 B/weight written;
    # moved as raw integers so the copy is bit-exact whatever the value
    tl.store(out_ptr + offs, tl.load(table_ptr + rows, mask=mask, other=0), mask=mask)


@triton.jit
def _grad_kernel(
    bits_ptr, g_ptr, dh_ptr, dw_ptr, n, group_elems, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = _table_rows(bits_ptr, offs, mask, group_elems).to(tl.int64)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 2-4 B/weight read
    # one 8 B gather of the interleaved [D, H] row (both halves in the same sector)
    slope = tl.load(dh_ptr + 2 * rows, mask=mask, other=0.0)
    path = tl.load(dh_ptr + 2 * rows + 1, mask=mask, other=0.0)
    dw = cast_rne(g * slope + path, dw_ptr.dtype.element_ty, BF16_BY_BITS)
    tl.store(dw_ptr + offs, dw, mask=mask)  # 2-4 B/weight written


def sort_block() -> int:
    """Weights per program of the sorting kernels (histogram, scatter-add)."""
    return 4096 if interpreting() else 1024


def stream_block(n: int) -> int:
    """Weights per program of the streaming kernels (gather, fused backward)."""
    return max(16, min(next_pow2(n), 1 << 16 if interpreting() else 1024))


class TritonBinEngine:
    """Launchers of the kernels above; same API as ``unique.TorchBinEngine``."""

    @staticmethod
    def _layout(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int, int]:
        check_launchable(_gather_kernel, weight)
        groups = lut_groups(weight.shape, group_size)
        if not weight.is_contiguous():
            raise ValueError("the Triton bin kernels need a contiguous weight")
        n = weight.numel()
        return weight.view(torch.int16), n, max(1, n // groups)

    def histogram(self, weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
        bits, n, group_elems = self._layout(weight, group_size)
        groups = lut_groups(weight.shape, group_size)
        hist = torch.zeros((groups, BINS), dtype=torch.int32, device=weight.device)
        block = sort_block()
        _histogram_kernel[(triton.cdiv(n, block),)](
            bits, hist, n, group_elems, groups * BINS,
            BLOCK=block, LOG_BLOCK=block.bit_length() - 1, num_warps=8,
        )  # fmt: skip
        return hist

    def scatter(
        self, grad: torch.Tensor, weight: torch.Tensor, group_size: int | None
    ) -> torch.Tensor:
        bits, n, group_elems = self._layout(weight, group_size)
        groups = lut_groups(weight.shape, group_size)
        out = torch.zeros((groups, BINS), dtype=torch.float32, device=weight.device)
        block = sort_block()
        _scatter_kernel[(triton.cdiv(n, block),)](
            bits, grad.contiguous(), out, n, group_elems, groups * BINS,
            BLOCK=block, LOG_BLOCK=block.bit_length() - 1, num_warps=8,
        )  # fmt: skip
        return out

    def gather(
        self, table: torch.Tensor, weight: torch.Tensor, group_size: int | None
    ) -> torch.Tensor:
        bits, n, group_elems = self._layout(weight, group_size)
        raw = {2: torch.int16, 4: torch.int32}.get(table.element_size())
        if raw is None:
            raise ValueError(f"the Triton gather moves 16- or 32-bit values, got {table.dtype}")
        out = torch.empty(weight.shape, dtype=table.dtype, device=weight.device)
        block = stream_block(n)
        _gather_kernel[(triton.cdiv(n, block),)](
            bits, table.contiguous().view(raw), out.view(raw), n, group_elems,
            BLOCK=block, num_warps=4,
        )  # fmt: skip
        return out

    def grad(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        slope_path: torch.Tensor,
        group_size: int | None,
    ) -> torch.Tensor:
        bits, n, group_elems = self._layout(weight, group_size)
        dw = torch.empty_like(weight)
        block = stream_block(n)
        _grad_kernel[(triton.cdiv(n, block),)](
            bits, grad.contiguous(), slope_path.contiguous(), dw, n, group_elems,
            BLOCK=block, BF16_BY_BITS=interpreting(), num_warps=4,
        )  # fmt: skip
        return dw
