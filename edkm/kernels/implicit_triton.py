"""Triton kernels of the implicit-attention DKM (FlashAttention-style: A never leaves registers).

Imported only when the Triton engine is used (``implicit.engine_for``), so that
``TRITON_INTERPRET`` can be set before these ``@triton.jit`` decorators run. The pure-PyTorch
reference is ``implicit.dkm_reference`` and the chunked torch engine ``implicit_torch`` computes
the same quantities; read them first.

Every kernel runs on a (blocks, G) grid: program (b, g) loads BLOCK rows of group g (one read of
the weights), its group's K centroids and temperature, and builds the BLOCK x K attention tile
in registers. Reductions over rows (S0, S1, dL/dc) leave each program as one K-vector partial in
a (G, blocks, K) buffer that torch sums afterwards: deterministic, no atomics, O(N/BLOCK * K)
extra memory. Values are upcast to fp32 right after every load (also what the interpreter
needs: its bf16 arithmetic is wrong).

Example:
    >>> import torch
    >>> w = torch.randn(1, 64, device="cuda")  # doctest: +SKIP
    >>> s0, s1 = TritonEngine().sums(w, None, torch.zeros(1, 4, device="cuda"),
    ...                              torch.ones(1, device="cuda"))  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edkm.kernels._common import interpreting, next_pow2
from edkm.kernels.triton_ops import cast_rne, check_launchable, column_sum


@triton.jit
def _attention_tile(
    w_ptr, row0, n, w_gstride, c_ptr, tau_ptr, grp, K, BLOCK: tl.constexpr, KP: tl.constexpr
):
    """Rows, row mask, w (BLOCK,), c (KP,), tau, A (BLOCK, KP) and d = w - c for one block."""
    rows = row0 + tl.arange(0, BLOCK)
    rmask = rows < n
    # 2-4 B/row read of the weights (or table values), upcast to fp32 at once
    w = tl.load(w_ptr + grp.to(tl.int64) * w_gstride + rows, mask=rmask, other=0.0).to(tl.float32)
    cols = tl.arange(0, KP)
    cmask = cols < K
    c = tl.load(c_ptr + grp * K + cols, mask=cmask, other=0.0).to(tl.float32)  # K floats, cached
    tau = tl.load(tau_ptr + grp).to(tl.float32)
    d = w[:, None] - c[None, :]
    z = -(d * d) / tau
    z = tl.where(cmask[None, :], z, float("-inf"))  # padded centroids get zero weight
    e = tl.exp(z - tl.max(z, 1)[:, None])
    a = e / tl.sum(e, 1)[:, None]
    return rows, rmask, w, c, tau, a, d


@triton.jit
def _row_weights(m_ptr, grp, n, rows, rmask, HAS_MULT: tl.constexpr):
    """Multiplicity of each row: the histogram count for a table row, 1 for a weight, 0 if padded."""
    if HAS_MULT:
        # 4 B/row read of the counts
        m = tl.load(m_ptr + grp.to(tl.int64) * n + rows, mask=rmask, other=0).to(tl.float32)
    else:
        m = rmask.to(tl.float32)
    return m


@triton.jit
def _sums_kernel(
    w_ptr,
    m_ptr,
    c_ptr,
    tau_ptr,
    s0_ptr,
    s1_ptr,
    n,
    w_gstride,
    K,
    HAS_MULT: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
    TREE: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    rows, rmask, w, _c, _tau, a, _d = _attention_tile(
        w_ptr, pid * BLOCK, n, w_gstride, c_ptr, tau_ptr, grp, K, BLOCK, KP
    )
    a = a * _row_weights(m_ptr, grp, n, rows, rmask, HAS_MULT)[:, None]
    part = (grp * tl.num_programs(0) + pid) * KP + tl.arange(0, KP)
    tl.store(s0_ptr + part, column_sum(a, BLOCK, KP, TREE))  # 2 K-vectors per program written
    tl.store(s1_ptr + part, column_sum(a * w[:, None], BLOCK, KP, TREE))


@triton.jit
def _soft_kernel(
    w_ptr,
    c_ptr,
    tau_ptr,
    out_ptr,
    n,
    w_gstride,
    K,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    rows, rmask, _w, c, _tau, a, _d = _attention_tile(
        w_ptr, pid * BLOCK, n, w_gstride, c_ptr, tau_ptr, grp, K, BLOCK, KP
    )
    soft = tl.sum(a * c[None, :], 1)
    # 2-4 B/row written in the output dtype
    out = cast_rne(soft, out_ptr.dtype.element_ty, BF16_BY_BITS)
    tl.store(out_ptr + grp.to(tl.int64) * n + rows, out, mask=rmask)


@triton.jit
def _final_backward_kernel(
    w_ptr,
    c_ptr,
    tau_ptr,
    g_ptr,
    out_ptr,
    dc_ptr,
    n,
    w_gstride,
    K,
    SCALE_BY_G: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
    TREE: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    rows, rmask, _w, c, tau, a, d = _attention_tile(
        w_ptr, pid * BLOCK, n, w_gstride, c_ptr, tau_ptr, grp, K, BLOCK, KP
    )
    base = grp.to(tl.int64) * n
    g = tl.load(g_ptr + base + rows, mask=rmask, other=0.0).to(tl.float32)  # 2-4 B/row read
    soft = tl.sum(a * c[None, :], 1)
    # softmax backward per unit upstream, times dz/dc = 2 (w - c) / tau
    q = a * (c[None, :] - soft[:, None]) * d * (2.0 / tau)
    slope = -tl.sum(q, 1)
    part = (grp * tl.num_programs(0) + pid) * KP + tl.arange(0, KP)
    tl.store(dc_ptr + part, column_sum(g[:, None] * (a + q), BLOCK, KP, TREE))
    if SCALE_BY_G:
        slope = slope * g
    tl.store(out_ptr + base + rows, slope, mask=rmask)  # 4 B/row written (fp32 accumulator)


@triton.jit
def _update_backward_kernel(
    w_ptr,
    m_ptr,
    c_ptr,
    cn_ptr,
    a_ptr,
    tau_ptr,
    acc_ptr,
    dc_ptr,
    n,
    w_gstride,
    K,
    HAS_MULT: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
    TREE: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    rows, rmask, w, _c, tau, a, d = _attention_tile(
        w_ptr, pid * BLOCK, n, w_gstride, c_ptr, tau_ptr, grp, K, BLOCK, KP
    )
    cols = tl.arange(0, KP)
    cmask = cols < K
    coef = tl.load(a_ptr + grp * K + cols, mask=cmask, other=0.0)  # dL/dc_{t+1} / S0
    cn = tl.load(cn_ptr + grp * K + cols, mask=cmask, other=0.0)
    da = coef[None, :] * (w[:, None] - cn[None, :])
    dz = a * (da - tl.sum(a * da, 1)[:, None])
    q = dz * d * (2.0 / tau)
    h = tl.sum(a * coef[None, :], 1) - tl.sum(q, 1)
    q = q * _row_weights(m_ptr, grp, n, rows, rmask, HAS_MULT)[:, None]
    part = (grp * tl.num_programs(0) + pid) * KP + cols
    tl.store(dc_ptr + part, column_sum(q, BLOCK, KP, TREE))
    ptrs = acc_ptr + grp.to(tl.int64) * n + rows
    # 8 B/row: read-modify-write of this block's own accumulator rows, no atomics needed
    tl.store(ptrs, tl.load(ptrs, mask=rmask, other=0.0) + h, mask=rmask)


def block_rows(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK, KP, num_warps): a BLOCK x KP register tile of ~4K fp32 on a GPU.

    The interpreter runs one program at a time with numpy, so there a bigger tile means fewer
    programs and a faster test.
    """
    kp = max(2, next_pow2(k))
    budget = 1 << 16 if interpreting() else 1 << 12
    block = max(16, min(budget // kp, next_pow2(n)))
    return block, kp, 4 if block * kp <= 4096 else 8


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the Triton DKM kernels need contiguous (G, n) tensors")


class TritonEngine:
    """Launchers of the kernels above; same API as ``implicit_torch.TorchEngine``."""

    @staticmethod
    def _grid(w: torch.Tensor, k: int) -> tuple[tuple[int, int], int, int, int, int]:
        check_launchable(_sums_kernel, w)
        groups, n = w.shape
        block, kp, warps = block_rows(n, k)
        nb = triton.cdiv(n, block)
        return (nb, groups), nb, block, kp, warps

    @staticmethod
    def _gstride(w: torch.Tensor) -> int:
        # an expanded (G, n) view of one shared table has group stride 0
        if w.stride(-1) != 1:
            raise ValueError("the Triton DKM kernels need rows with unit stride")
        return w.stride(0)

    def sums(
        self, w: torch.Tensor, mult: torch.Tensor | None, c: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups, n = w.shape
        k = c.shape[1]
        grid, nb, block, kp, warps = self._grid(w, k)
        s0 = torch.empty((groups, nb, kp), dtype=torch.float32, device=w.device)
        s1 = torch.empty_like(s0)
        m = mult.contiguous() if mult is not None else s0  # placeholder pointer when unused
        _sums_kernel[grid](
            w,
            m,
            c.float().contiguous(),
            tau.float(),
            s0,
            s1,
            n,
            self._gstride(w),
            k,
            HAS_MULT=mult is not None,
            BLOCK=block,
            KP=kp,
            TREE=interpreting(),
            num_warps=warps,
        )
        return s0.sum(1)[:, :k].to(c.dtype), s1.sum(1)[:, :k].to(c.dtype)

    def soft(self, w: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, out: torch.Tensor) -> None:
        _check(out)
        k = c.shape[1]
        grid, _, block, kp, warps = self._grid(w, k)
        _soft_kernel[grid](
            w,
            c.float().contiguous(),
            tau.float(),
            out,
            w.shape[1],
            self._gstride(w),
            k,
            BLOCK=block,
            KP=kp,
            BF16_BY_BITS=interpreting(),
            num_warps=warps,
        )

    def backward_final(
        self,
        w: torch.Tensor,
        c: torch.Tensor,
        tau: torch.Tensor,
        g: torch.Tensor,
        out: torch.Tensor,
        scale_by_g: bool,
    ) -> torch.Tensor:
        groups, n = w.shape
        k = c.shape[1]
        grid, nb, block, kp, warps = self._grid(w, k)
        _check(g, out)
        if out.dtype != torch.float32:
            raise ValueError("the backward accumulator must be fp32")
        dc = torch.empty((groups, nb, kp), dtype=torch.float32, device=w.device)
        _final_backward_kernel[grid](
            w,
            c.float().contiguous(),
            tau.float(),
            g.contiguous(),
            out,
            dc,
            n,
            self._gstride(w),
            k,
            SCALE_BY_G=scale_by_g,
            BLOCK=block,
            KP=kp,
            TREE=interpreting(),
            num_warps=warps,
        )
        return dc.sum(1)[:, :k].to(c.dtype)

    def backward_update(
        self,
        w: torch.Tensor,
        mult: torch.Tensor | None,
        c: torch.Tensor,
        c_next: torch.Tensor,
        a_coef: torch.Tensor,
        tau: torch.Tensor,
        acc: torch.Tensor,
    ) -> torch.Tensor:
        groups, n = w.shape
        k = c.shape[1]
        grid, nb, block, kp, warps = self._grid(w, k)
        _check(acc)
        if acc.dtype != torch.float32:
            raise ValueError("the backward accumulator must be fp32")
        dc = torch.empty((groups, nb, kp), dtype=torch.float32, device=w.device)
        m = mult.contiguous() if mult is not None else dc
        _update_backward_kernel[grid](
            w,
            m,
            c.float().contiguous(),
            c_next.float().contiguous(),
            a_coef.float().contiguous(),
            tau.float(),
            acc,
            dc,
            n,
            self._gstride(w),
            k,
            HAS_MULT=mult is not None,
            BLOCK=block,
            KP=kp,
            TREE=interpreting(),
            num_warps=warps,
        )
        return dc.sum(1)[:, :k].to(c.dtype)
