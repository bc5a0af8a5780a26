"""Triton kernels of the uniquified DKM's per-weight ops: histogram, gather, scatter-add, fused
backward.

Imported only when an op runs with ``backend="triton"`` (``unique.bins_for``), so that
``TRITON_INTERPRET`` can be set before these ``@triton.jit`` decorators run. The pure-PyTorch
implementation they are held to is ``unique.TorchBins``; read it first.

Every kernel reads each weight's bit pattern and turns it into the table row
``group * 65536 + pattern``: 2 B/weight for bf16/fp16 weights, 4 B/weight for fp32 weights,
rounded in registers to their bf16 pattern (to nearest even, as ``Tensor.to(torch.bfloat16)``
does), so an fp32 weight never needs a bf16 copy.

The histogram and the scatter-add have several implementations, picked by ``HISTOGRAM`` and
``SCATTER`` below (docs/histogram_kernels.md): "sorted" aggregates inside a block before
touching global memory (the block's rows are sorted by a bitonic network in registers, equal
rows form runs, a ``tl.histogram`` over run ids counts each run, and only the first (or last)
lane of each run issues the global atomic); "atomic" issues one relaxed global atomic per
weight; "window" runs the shared-memory kernels of :mod:`edkm.kernels.unique_cuda`. "sorted" is
the default (the only one timed on a GPU so far); ``EDKM_BINS_KERNEL`` picks another.

Example:
    >>> import torch
    >>> w = torch.randn(64, 64, device="cuda").to(torch.bfloat16)  # doctest: +SKIP
    >>> TritonBins().histogram(w, 1, 0).sum().item()  # doctest: +SKIP
    4096
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import triton
import triton.language as tl

from edkm.kernels._common import BINS, interpreting, next_pow2
from edkm.kernels.triton_ops import cast_rne, check_launchable, sort_ascending


@triton.jit
def _table_rows(w_ptr, offs, mask, group_elems, FP32: tl.constexpr):
    """Table row of each weight: group * 65536 + its 16-bit pattern.

    With FP32 the weight is read as its int32 bit pattern (4 B/weight) and rounded to bf16 on
    the bits: add half an ulp (ties to even) and keep the top 16 bits, in int64 so that no
    pattern overflows; NaN becomes the canonical bf16 NaN 0x7FC0, as in PyTorch's cast.
    """
    if FP32:
        x = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
        rounded = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
        bits = tl.where((x & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded).to(tl.int32)
    else:
        bits = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
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


# Signatures: (weight bits, the kernel's own tensors, n, weights per group, table rows, constexprs).


@triton.jit
def _histogram_kernel(
    w_ptr, hist_ptr, n, group_elems, n_rows,
    FP32: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = tl.where(mask, _table_rows(w_ptr, offs, mask, group_elems, FP32), n_rows)
    rows = sort_ascending(rows.to(tl.int64), LOG_BLOCK).to(tl.int32)  # padding sorts last
    head, _run, length, _start = _runs(rows, BLOCK)
    # one 4 B atomic per distinct row in the block
    tl.atomic_add(hist_ptr + rows, length, mask=head & (rows < n_rows))


@triton.jit
def _scatter_kernel(
    w_ptr, g_ptr, out_ptr, n, group_elems, n_rows,
    FP32: tl.constexpr, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr,
):  # fmt: skip
    base = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    offs = base + lane
    mask = offs < n
    rows = tl.where(mask, _table_rows(w_ptr, offs, mask, group_elems, FP32), n_rows)
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
def _histogram_atomic_kernel(
    w_ptr, hist_ptr, n, group_elems, n_rows,
    FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = _table_rows(w_ptr, offs, mask, group_elems, FP32)
    # one relaxed 4 B reduction per weight, straight into L2: no aggregation at all
    tl.atomic_add(hist_ptr + rows, tl.full([BLOCK], 1, tl.int32), mask=mask, sem="relaxed")


@triton.jit
def _scatter_atomic_kernel(
    w_ptr, g_ptr, out_ptr, n, group_elems, n_rows,
    FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = _table_rows(w_ptr, offs, mask, group_elems, FP32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + rows, g, mask=mask, sem="relaxed")


@triton.jit
def _gather_kernel(
    w_ptr, table_ptr, out_ptr, n, group_elems, n_rows, FP32: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = _table_rows(w_ptr, offs, mask, group_elems, FP32)
    # 2 B/weight gathered from a 128 KiB-per-group bf16 table (L2-resident), 2 B/weight written;
    # moved as raw integers so the copy is bit-exact whatever the value
    tl.store(out_ptr + offs, tl.load(table_ptr + rows, mask=mask, other=0), mask=mask)


@triton.jit
def _grad_kernel(
    w_ptr, g_ptr, dh_ptr, dw_ptr, n, group_elems, n_rows,
    FP32: tl.constexpr, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    rows = _table_rows(w_ptr, offs, mask, group_elems, FP32).to(tl.int64)
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


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as 16- or 32-bit integers (the kernels read bit patterns)."""
    raw = {2: torch.int16, 4: torch.int32}.get(t.element_size())
    if raw is None:
        raise ValueError(f"the Triton kernels move 16- or 32-bit values, got {t.dtype}")
    return t.view(raw)


def _launch(
    kernel: Any, block: int, weight: torch.Tensor, groups: int, *args: Any, **meta: Any
) -> None:
    """Launch ``kernel(weight bits, *args, n, group_elems, n_rows, ...)`` over weight blocks."""
    check_launchable(kernel, weight)
    if groups * BINS >= 1 << 31:
        raise ValueError(f"too many LUT groups for 32-bit table rows: {groups}")
    w = weight.contiguous()
    n = w.numel()
    kernel[(triton.cdiv(n, block),)](
        _raw(w), *args, n, max(1, n // groups), groups * BINS,
        FP32=w.dtype == torch.float32, BLOCK=block, **meta,
    )  # fmt: skip


# The histogram and scatter-add passes have several implementations; ``HISTOGRAM`` and
# ``SCATTER`` pick the one ``TritonBins`` (the "triton" backend) uses. All are exact (histograms
# bit for bit, sums to fp32 rounding); they differ in speed only (benchmarks/dkm_kernels.py checks
# and times them side by side):
# - "sorted": in-register bitonic sort of 1,024 weights, one atomic per distinct row per block;
# - "atomic": one relaxed global atomic per weight (L2 absorbs the contention);
# - "window": CUDA C, a block-private window of the table in shared memory
#   (:mod:`edkm.kernels.unique_cuda`): shared-memory atomics, one global atomic per occupied
#   row per block. Used on CUDA tensors once its self-check passed on the device (NVRTC found,
#   results equal to torch's), for LUT groups of at least ``unique_cuda.MIN_GROUP`` weights;
#   anything else runs "atomic" (CPU tensors under the interpreter included).
#
# The default is "sorted", the only one of the three that has run compiled on a GPU (H100, H200:
# 25.6 and 47.9 GB/s, benchmarks/results/kernels_nvidia-h200_before.json). "atomic" and
# "window" are correct under the interpreter and compile for sm_90 but have not been timed on a
# GPU yet: opt in with ``EDKM_BINS_KERNEL=window`` (or ``atomic``) and run benchmarks/dkm_kernels.py.
METHODS = ("sorted", "atomic", "window")


def _default_method() -> str:
    chosen = os.environ.get("EDKM_BINS_KERNEL", "sorted")
    if chosen not in METHODS:
        raise ValueError(f"EDKM_BINS_KERNEL must be one of {METHODS}, got {chosen!r}")
    return chosen


HISTOGRAM = _default_method()
SCATTER = HISTOGRAM


def window_usable(weight: torch.Tensor, groups: int) -> bool:
    """Whether the "window" method runs the shared-memory kernels for this weight."""
    if weight.device.type != "cuda" or weight.numel() // groups < _min_group():
        return False
    from edkm.kernels import unique_cuda

    if not unique_cuda.available(weight.device):
        return False
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    failure = unique_cuda.self_check(index)
    if failure and index not in _WARNED:
        _WARNED.add(index)
        warnings.warn(f"edkm: shared-memory histogram kernels disabled: {failure}", stacklevel=3)
    return not failure


_WARNED: set[int] = set()


def _min_group() -> int:
    from edkm.kernels.unique_cuda import MIN_GROUP

    return MIN_GROUP


def histogram(weight: torch.Tensor, groups: int, method: str | None = None) -> torch.Tensor:
    """(G, 65536) int32 histogram of the patterns by ``method`` (default ``HISTOGRAM``)."""
    method = method or HISTOGRAM
    if method == "window" and window_usable(weight, groups):
        from edkm.kernels import unique_cuda

        return unique_cuda.histogram(weight, groups)
    hist = torch.zeros((groups, BINS), dtype=torch.int32, device=weight.device)
    if method == "sorted":
        block = sort_block()
        _launch(
            _histogram_kernel, block, weight, groups, hist,
            LOG_BLOCK=block.bit_length() - 1, num_warps=8,
        )  # fmt: skip
    elif method in ("atomic", "window"):
        block = stream_block(weight.numel())
        _launch(_histogram_atomic_kernel, block, weight, groups, hist, num_warps=4)
    else:
        raise ValueError(f"histogram method must be one of {METHODS}, got {method!r}")
    return hist


def scatter(
    grad: torch.Tensor, weight: torch.Tensor, groups: int, method: str | None = None
) -> torch.Tensor:
    """(G, 65536) fp32 scatter-add of ``grad`` into the patterns' rows by ``method`` (default
    ``SCATTER``)."""
    method = method or SCATTER
    if method == "window" and window_usable(weight, groups):
        from edkm.kernels import unique_cuda

        return unique_cuda.scatter(grad, weight, groups)
    out = torch.zeros((groups, BINS), dtype=torch.float32, device=weight.device)
    if method == "sorted":
        block = sort_block()
        _launch(
            _scatter_kernel, block, weight, groups, grad.contiguous(), out,
            LOG_BLOCK=block.bit_length() - 1, num_warps=8,
        )  # fmt: skip
    elif method in ("atomic", "window"):
        block = stream_block(weight.numel())
        _launch(_scatter_atomic_kernel, block, weight, groups, grad.contiguous(), out, num_warps=4)
    else:
        raise ValueError(f"scatter method must be one of {METHODS}, got {method!r}")
    return out


class TritonBins:
    """Launchers of the kernels above; same API as ``unique.TorchBins`` (``chunk`` unused)."""

    @staticmethod
    def histogram(weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
        return histogram(weight, groups)

    @staticmethod
    def scatter(grad: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
        return scatter(grad, weight, groups)

    @staticmethod
    def gather(table: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
        out = torch.empty(weight.shape, dtype=table.dtype, device=weight.device)
        block = stream_block(weight.numel())
        _launch(
            _gather_kernel, block, weight, groups, _raw(table.contiguous()), _raw(out),
            num_warps=4,
        )  # fmt: skip
        return out

    @staticmethod
    def grad(
        grad: torch.Tensor, weight: torch.Tensor, slope_path: torch.Tensor, groups: int, chunk: int
    ) -> torch.Tensor:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        block = stream_block(weight.numel())
        _launch(
            _grad_kernel, block, weight, groups, grad.contiguous(), slope_path.contiguous(), dw,
            BF16_BY_BITS=interpreting(), num_warps=4,
        )  # fmt: skip
        return dw
