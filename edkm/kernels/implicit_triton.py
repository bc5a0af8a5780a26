"""Triton kernels of the implicit-attention DKM (FlashAttention-style: A never leaves registers).

Imported only when the Triton engine is used (``implicit.engine_for``), so that
``TRITON_INTERPRET`` can be set before these ``@triton.jit`` decorators run. The pure-PyTorch
reference is ``edkm.dkm.soft.dkm_reference`` and the chunked torch engine ``implicit_torch``
computes the same quantities; read them first.

Every kernel runs on a (blocks, G) grid: program (b, g) loads BLOCK rows of group g (one read of
the weights), its group's K centroids and temperature, and builds the BLOCK x K attention tile
in registers. Reductions over rows (S0, S1, dL/dc) leave each program as one K-vector partial in
a (G, blocks, K) buffer that torch sums afterwards: deterministic, no atomics, O(N/BLOCK * K)
extra memory. Values are upcast to fp32 right after every load (also what the interpreter
needs: its bf16 arithmetic is wrong).

Example:
    >>> import torch
    >>> w = torch.randn(1, 64, device="cuda")  # doctest: +SKIP
    >>> s0, s1 = TritonEngine().sums(w, torch.zeros(1, 4, device="cuda"),
    ...                              torch.ones(1, device="cuda"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from edkm.kernels._common import interpreting, next_pow2
from edkm.kernels.triton_ops import cast_rne, check_launchable, column_sum


@triton.jit
def _attention_tile(w_ptr, n, c_ptr, tau_ptr, K, BLOCK: tl.constexpr, KP: tl.constexpr):
    """This program's block of group ``grp``: rows, row mask, w (BLOCK,), c (KP,), tau,
    A (BLOCK, KP), d = w - c, the group's row offset, and its slot in the partials buffer."""
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    base = grp.to(tl.int64) * n
    # 2-4 B/row read of the weights, upcast to fp32 at once
    w = tl.load(w_ptr + base + rows, mask=rmask, other=0.0).to(tl.float32)
    cols = tl.arange(0, KP)
    cmask = cols < K
    c = tl.load(c_ptr + grp * K + cols, mask=cmask, other=0.0).to(tl.float32)  # K floats, cached
    tau = tl.load(tau_ptr + grp).to(tl.float32)
    d = w[:, None] - c[None, :]
    z = -(d * d) / tau
    z = tl.where(cmask[None, :], z, float("-inf"))  # padded centroids get zero weight
    e = tl.exp(z - tl.max(z, 1)[:, None])
    a = e / tl.sum(e, 1)[:, None]
    part = (grp * tl.num_programs(0) + pid) * KP + cols  # one K-vector partial per program
    return rows, rmask, w, c, tau, a, d, base, part


# Signatures: (weights, centroids, temperatures, the kernel's own tensors, n, K, constexprs).


@triton.jit
def _sums_kernel(
    w_ptr, c_ptr, tau_ptr, s0_ptr, s1_ptr, n, K,
    BLOCK: tl.constexpr, KP: tl.constexpr, TREE: tl.constexpr,
):  # fmt: skip
    _, rmask, w, _, _, a, _, _, part = _attention_tile(w_ptr, n, c_ptr, tau_ptr, K, BLOCK, KP)
    a = a * rmask.to(tl.float32)[:, None]  # padded rows count for nothing
    tl.store(s0_ptr + part, column_sum(a, BLOCK, KP, TREE))  # 2 K-vectors per program written
    tl.store(s1_ptr + part, column_sum(a * w[:, None], BLOCK, KP, TREE))


@triton.jit
def _soft_kernel(
    w_ptr, c_ptr, tau_ptr, out_ptr, n, K,
    BLOCK: tl.constexpr, KP: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):  # fmt: skip
    rows, rmask, _, c, _, a, _, base, _ = _attention_tile(w_ptr, n, c_ptr, tau_ptr, K, BLOCK, KP)
    soft = tl.sum(a * c[None, :], 1)
    # 2-4 B/row written in the output dtype
    out = cast_rne(soft, out_ptr.dtype.element_ty, BF16_BY_BITS)
    tl.store(out_ptr + base + rows, out, mask=rmask)


@triton.jit
def _final_backward_kernel(
    w_ptr, c_ptr, tau_ptr, g_ptr, out_ptr, dc_ptr, n, K,
    BLOCK: tl.constexpr, KP: tl.constexpr, TREE: tl.constexpr,
):  # fmt: skip
    rows, rmask, _, c, tau, a, d, base, part = _attention_tile(
        w_ptr, n, c_ptr, tau_ptr, K, BLOCK, KP
    )
    g = tl.load(g_ptr + base + rows, mask=rmask, other=0.0).to(tl.float32)  # 2-4 B/row read
    soft = tl.sum(a * c[None, :], 1)
    # softmax backward per unit upstream, times dz/dc = 2 (w - c) / tau
    q = a * (c[None, :] - soft[:, None]) * d * (2.0 / tau)
    slope = -tl.sum(q, 1)
    tl.store(dc_ptr + part, column_sum(g[:, None] * (a + q), BLOCK, KP, TREE))
    tl.store(out_ptr + base + rows, slope * g, mask=rmask)  # 4 B/row written (fp32 accumulator)


@triton.jit
def _update_backward_kernel(
    w_ptr, c_ptr, tau_ptr, cn_ptr, a_ptr, acc_ptr, dc_ptr, n, K,
    BLOCK: tl.constexpr, KP: tl.constexpr, TREE: tl.constexpr,
):  # fmt: skip
    rows, rmask, w, _, tau, a, d, base, part = _attention_tile(
        w_ptr, n, c_ptr, tau_ptr, K, BLOCK, KP
    )
    grp = tl.program_id(1)
    cols = tl.arange(0, KP)
    cmask = cols < K
    coef = tl.load(a_ptr + grp * K + cols, mask=cmask, other=0.0)  # dL/dc_{t+1} / S0
    cn = tl.load(cn_ptr + grp * K + cols, mask=cmask, other=0.0)
    da = coef[None, :] * (w[:, None] - cn[None, :])
    dz = a * (da - tl.sum(a * da, 1)[:, None])
    q = dz * d * (2.0 / tau)
    h = tl.sum(a * coef[None, :], 1) - tl.sum(q, 1)
    q = q * rmask.to(tl.float32)[:, None]  # padded rows count for nothing
    tl.store(dc_ptr + part, column_sum(q, BLOCK, KP, TREE))
    ptrs = acc_ptr + base + rows
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


def _launch(kernel: Any, w: Tensor, c: Tensor, tau: Tensor, *args: Tensor, **meta: Any) -> Tensor:
    """Run ``kernel(w, c, tau, *args, [partials,] n, K, ...)`` on a (blocks, G) grid.

    ``meta`` holds the kernel's flags; with ``partials=True`` the kernel writes one K-vector
    per program into a (G, blocks, KP) buffer, and the column sums over the blocks, (G, K) in
    ``c``'s dtype, are returned (else an empty tensor).
    """
    check_launchable(kernel, w)
    for t in (w, *args):
        if not t.is_contiguous():
            raise ValueError("the Triton DKM kernels need contiguous (G, n) tensors")
    groups, n = w.shape
    k = c.shape[1]
    block, kp, warps = block_rows(n, k)
    nb = triton.cdiv(n, block)
    parts = [
        torch.empty((groups, nb, kp), dtype=torch.float32, device=w.device)
        for _ in range(meta.pop("partials", 0))
    ]
    kernel[(nb, groups)](
        w, c.float().contiguous(), tau.float(), *args, *parts, n, k,
        BLOCK=block, KP=kp, num_warps=warps, **meta,
    )  # fmt: skip
    if not parts:
        return c.new_empty(0)
    sums = [p.sum(1)[:, :k].to(c.dtype) for p in parts]
    return torch.stack(sums) if len(sums) > 1 else sums[0]


def _check_fp32(acc: Tensor) -> None:
    if acc.dtype != torch.float32:
        raise ValueError("the backward accumulator must be fp32")


class TritonEngine:
    """Launchers of the kernels above; same API as ``implicit_torch.TorchEngine``."""

    def sums(self, w: Tensor, c: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        s0, s1 = _launch(_sums_kernel, w, c, tau, partials=2, TREE=interpreting())
        return s0, s1

    def soft(self, w: Tensor, c: Tensor, tau: Tensor, out: Tensor) -> None:
        _launch(_soft_kernel, w, c, tau, out, BF16_BY_BITS=interpreting())

    def backward_final(self, w: Tensor, c: Tensor, tau: Tensor, g: Tensor, out: Tensor) -> Tensor:
        _check_fp32(out)
        return _launch(
            _final_backward_kernel, w, c, tau, g.contiguous(), out, partials=1, TREE=interpreting()
        )

    def backward_update(
        self, w: Tensor, c: Tensor, c_next: Tensor, a_coef: Tensor, tau: Tensor, acc: Tensor
    ) -> Tensor:
        _check_fp32(acc)
        cn, coef = c_next.float().contiguous(), a_coef.float().contiguous()
        return _launch(
            _update_backward_kernel, w, c, tau, cn, coef, acc, partials=1, TREE=interpreting()
        )
