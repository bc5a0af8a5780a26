"""Implicit-attention DKM: soft k-means that never materialises the N x K attention map.

The second DKM algorithm (the uniquified one is ``edkm.dkm.unique``): any weight dtype, grouped
LUTs, O(N + T*K) memory; the ablation's baseline kernel. Its pure-PyTorch reference is the one
reference DKM, ``edkm.dkm.soft.dkm_reference`` (plain autograd, N x K map kept for backward).
Reads top to bottom: the engine protocol (``implicit_torch.TorchEngine``, a chunked torch loop,
or the Triton kernels of ``implicit_triton``, imported only when used) -> the
``torch.autograd.Function`` whose backward recomputes A from (w, c_t) per iteration -> the
functional API ``implicit_dkm``.

The math, for one LUT group with weights w_i, centroids c_j and temperature tau:

    A_ij = softmax_j(-(w_i - c_j)^2 / tau)
    c_{t+1,j} = S1_j / S0_j, S0_j = sum_i A_ij, S1_j = sum_i A_ij w_i  (kept if S0_j <= MIN_MASS)
    what_i = sum_j A_ij c_T,j

Backward, with upstream g_i = dL/dwhat_i and gc = dL/dc_T, writing q_ij for a softmax-input
gradient times dz_ij/dc_j = 2 (w_i - c_j) / tau (dz_ij/dw_i is its negative):

    final:  q_ij = g_i A_ij (c_j - what_i) 2 (w_i - c_j) / tau
            dL/dw_i = -sum_j q_ij,  dL/dc_j += sum_i g_i A_ij + sum_i q_ij
    update: a_j = gc_{t+1,j} / S0_j, dA_ij = a_j (w_i - c_{t+1,j})
            q_ij = A_ij (dA_ij - sum_k A_ik dA_ik) 2 (w_i - c_j) / tau
            dL/dw_i += sum_j A_ij a_j - sum_j q_ij,  dL/dc_t,j = sum_i q_ij (+ gc_{t+1,j} if empty)

Only (w, c_0..c_T, S0_0..S0_{T-1}) are saved, so memory is O(N + T*K).

Example:
    >>> import torch
    >>> w = torch.randn(16, 8) * 0.02
    >>> c = torch.quantile(w.flatten(), torch.linspace(0.05, 0.95, 4)).view(1, 4)
    >>> soft, c_new = implicit_dkm(w, c, tau=0.05 * w.var().item(), iters=3)
    >>> soft.shape, c_new.shape
    (torch.Size([16, 8]), torch.Size([1, 4]))
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from edkm.kernels._common import (
    MIN_MASS,
    centroid_step,
    check_centroids,
    lut_groups,
    temperatures,
    use_triton,
)

__all__ = ["DKMEngine", "implicit_dkm", "run_implicit"]


# ----------------------------------------------------------------------------------------------
# Engines: the chunked torch loop (CPU) or the Triton kernels (CUDA / interpreter)
# ----------------------------------------------------------------------------------------------


class DKMEngine(Protocol):
    """What the autograd Function needs from an engine; see ``implicit_torch`` for semantics."""

    def sums(self, w: Tensor, c: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]: ...

    def soft(self, w: Tensor, c: Tensor, tau: Tensor, out: Tensor) -> None: ...

    def backward_final(self, w: Tensor, c: Tensor, tau: Tensor, g: Tensor, out: Tensor) -> Tensor:
        """dL/dc of ``soft`` for upstream ``g``; writes g_i * D_i in ``out``."""
        ...

    def backward_update(
        self, w: Tensor, c: Tensor, c_next: Tensor, a_coef: Tensor, tau: Tensor, acc: Tensor
    ) -> Tensor:
        """dL/dc_t of one update for ``a_coef``; adds each row's gradient to ``acc``."""
        ...


def engine_for(backend: str, tensor: Tensor) -> DKMEngine:
    """The Triton engine when ``backend`` selects it for ``tensor``, else the chunked torch one.

    Example:
        >>> type(engine_for("auto", torch.zeros(1))).__name__
        'TorchEngine'
    """
    if use_triton(backend, tensor):
        from edkm.kernels.implicit_triton import TritonEngine  # imports triton

        return TritonEngine()
    from edkm.kernels.implicit_torch import TorchEngine

    return TorchEngine()


def run_implicit(
    engine: DKMEngine, w: Tensor, c0: Tensor, tau: Tensor, iters: int
) -> tuple[Tensor, Tensor]:
    """Forward k-means iterations on (G, n) rows: returns the stacked c_0..c_T and S0_0..S0_{T-1}.

    Example:
        >>> from edkm.kernels.implicit_torch import TorchEngine
        >>> cs, s0 = run_implicit(TorchEngine(), torch.zeros(1, 4), torch.zeros(1, 2),
        ...                       torch.ones(1), 2)
        >>> cs.shape, s0.shape
        (torch.Size([3, 1, 2]), torch.Size([2, 1, 2]))
    """
    c = c0
    cs, s0s = [c], []
    for _ in range(iters):
        s0, s1 = engine.sums(w, c, tau)
        c = centroid_step(s0, s1, c)
        cs.append(c)
        s0s.append(s0)
    s0_all = torch.stack(s0s) if s0s else c0.new_zeros((0, *c0.shape))
    return torch.stack(cs), s0_all


def backward_updates(
    engine: DKMEngine, w: Tensor, cs: Tensor, s0s: Tensor, tau: Tensor, gc: Tensor, acc: Tensor
) -> Tensor:
    """Back through the T centroid updates, last first; adds per-row gradients to ``acc``.

    ``gc`` is dL/dc_T; returns dL/dc_0.
    """
    for t in range(s0s.shape[0] - 1, -1, -1):
        s0 = s0s[t]
        live = s0 > MIN_MASS
        a_coef = torch.where(live, gc / torch.where(live, s0, torch.ones_like(s0)), 0.0)
        dc = engine.backward_update(w, cs[t], cs[t + 1], a_coef, tau, acc)
        gc = dc + torch.where(live, 0.0, gc)  # an empty cluster passed its centroid through
    return gc


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------


class _ImplicitDKM(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: Tensor,
        centroids: Tensor,
        tau: Tensor,
        iters: int,
        groups: int,
        engine: DKMEngine,
    ) -> tuple[Tensor, Tensor]:
        cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.detach().contiguous().view(groups, -1)
        cs, s0s = run_implicit(engine, w, centroids.detach().to(cdt), tau, iters)
        soft = torch.empty_like(w)
        engine.soft(w, cs[-1], tau, soft)
        ctx.save_for_backward(w, cs, s0s, tau)
        ctx.engine = engine
        ctx.weight_shape = weight.shape
        ctx.centroid_dtype = centroids.dtype
        return soft.view(weight.shape), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_soft: Tensor | None, g_c: Tensor | None) -> Any:
        w, cs, s0s, tau = ctx.saved_tensors
        engine: DKMEngine = ctx.engine
        g = torch.zeros_like(w) if g_soft is None else g_soft.contiguous().view(w.shape)
        acc = torch.empty(w.shape, dtype=cs.dtype, device=w.device)
        gc = engine.backward_final(w, cs[-1], tau, g, acc)
        if g_c is not None:
            gc = gc + g_c.to(gc.dtype)
        gc = backward_updates(engine, w, cs, s0s, tau, gc, acc)
        grad_w = acc.to(w.dtype).view(ctx.weight_shape) if ctx.needs_input_grad[0] else None
        grad_c = gc.to(ctx.centroid_dtype) if ctx.needs_input_grad[1] else None
        return grad_w, grad_c, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------


def implicit_dkm(
    weight: Tensor,
    centroids: Tensor,
    *,
    tau: float | Tensor,
    iters: int,
    group_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """DKM with O(N + T*K) memory: Triton kernels on CUDA, a chunked torch loop on CPU.

    Same contract as ``edkm.dkm.soft.dkm_soft``: ``weight`` (out, in) in any float dtype,
    ``centroids`` (G, K), ``tau`` absolute (float or (G,) tensor). Returns (soft weight in the
    weight's dtype, final centroids (G, K) fp32 (fp64 for fp64 weights)); gradients flow to the
    weight and to the initial centroids through all ``iters`` iterations. ``backend`` forces
    'triton' (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or 'torch'. Callers check
    that weights are finite (``dkm_soft`` does); this function never syncs on data.

    Example:
        >>> w = torch.randn(8, 4, requires_grad=True)
        >>> soft, c = implicit_dkm(w, torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), tau=0.1, iters=2)
        >>> soft.sum().backward(); w.grad.shape
        torch.Size([8, 4])
    """
    groups = lut_groups(weight.shape, group_size)
    check_centroids(centroids, groups)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if weight.dtype == torch.float64 and use_triton(backend, weight):
        raise ValueError("the Triton kernels take fp32, bf16 or fp16 weights, got float64")
    engine = engine_for(backend, weight)
    cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    t = temperatures(tau, groups, weight.device, cdt)
    soft, c = _ImplicitDKM.apply(weight, centroids, t, int(iters), groups, engine)
    return soft, c
