"""Small ``@triton.jit`` building blocks shared by the kernels: casts and an in-register sort.

Imported only by the Triton kernel modules (never by ``import edkm.kernels``), so that
``TRITON_INTERPRET`` can be set before these decorators run.

Example:
    >>> import triton, triton.language as tl  # doctest: +SKIP
    >>> @triton.jit  # doctest: +SKIP
    ... def k(x_ptr, y_ptr):
    ...     tl.store(y_ptr, cast_rne(tl.load(x_ptr), tl.bfloat16, False))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even.

    With BF16_BY_BITS the bf16 rounding is done on the bit pattern (add half an ulp, ties to
    even, keep the top 16 bits): Triton's interpreter truncates in its own fp32 -> bf16 cast,
    while a GPU's native conversion already rounds to nearest even (the launchers set the flag
    only under the interpreter). Inputs are finite.
    """
    if BF16_BY_BITS and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _axis_bit(n_dims: tl.constexpr, axis: tl.constexpr):
    """0/1 along one axis of a [2] * n_dims hypercube (axis counted from the innermost)."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - axis - 1) + [2] + [1] * axis)


@triton.jit
def sort_ascending(x, LOG_N: tl.constexpr):
    """Bitonic sort of a 2**LOG_N int64 tile held in registers.

    The tile is viewed as a [2] * LOG_N hypercube; a compare-and-swap along one axis finds each
    lane's partner as (sum of the pair) - itself, which needs only a plain sum reduction (the
    callers' values are < 2**50, so a pair sum cannot overflow).
    """
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:
            flip = _axis_bit(LOG_N, stage)  # alternate directions of the bitonic subsequences
        else:
            flip = tl.zeros([1] * LOG_N, tl.int32)  # last merge: everything ascending
        # the loop variable is the constexpr (compiled Triton refuses to reassign a constexpr)
        for axis in tl.static_range(stage - 1, -1, -1):
            partner = tl.sum(h, axis=LOG_N - 1 - axis, keep_dims=True) - h
            right = _axis_bit(LOG_N, axis)
            h = tl.where((h > partner) != ((flip ^ right) != 0), partner, h)
    return tl.reshape(h, x.shape)


@triton.jit
def column_sum(x, ROWS: tl.constexpr, COLS: tl.constexpr, TREE: tl.constexpr):
    """Sum of a (ROWS, COLS) tile over its rows (ROWS a power of two).

    A GPU reduces a tile as a tree already. Triton's interpreter hands the reduction to numpy,
    which adds the rows of a tile one after another (error growing with ROWS); TREE (set by
    the launchers only there) adds the two halves of the tile pairwise until one row is left.
    """
    if TREE:
        half: tl.constexpr = ROWS // 2
        if half >= 1:
            top = tl.reshape(x, [2, half, COLS])
            x = column_sum(tl.sum(top, 0), half, COLS, TREE)
            return x
        else:
            return tl.sum(x, 0)
    else:
        return tl.sum(x, 0)


def check_launchable(kernel: object, tensor: torch.Tensor) -> None:
    """Fail clearly when CPU tensors meet kernels compiled for a GPU.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` once, when the kernel module is imported; a
    module imported before the variable was set cannot run on CPU tensors.
    """
    if tensor.device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before the first "
            "edkm.kernels Triton launch in this process"
        )
