"""DKM: differentiable soft k-means of a weight onto a 2^b-entry lookup table.

``dkm_soft`` is the functional core that every layer calls, and ``dkm_reference`` the one
reference DKM that every fast path is tested against. Notation per LUT group (the whole tensor,
or ``group_size`` consecutive output channels): weights ``w_i``, centroids ``c_j`` (K = 2**bits),
absolute temperature ``tau``. Starting from ``c_0 = centroids`` (the caller's warm start)::

    A_t,ij  = softmax_j(-(w_i - c_t,j)^2 / tau)                          t = 0 .. iters-1
    c_t+1,j = sum_i A_t,ij w_i / sum_i A_t,ij      (an empty cluster, sum_i A_t,ij <= 2^-63
                                                    (edkm.kernels._common.MIN_MASS), keeps its
                                                    centroid, in every method)
    soft_i  = sum_j softmax_j(-(w_i - c_T,j)^2 / tau) c_T,j

and returns ``(soft weight in the weight's dtype and shape, c_T as (G, K) fp32)``. Backward
flows through all iterations, to the weight and to the initial centroids when they require
grad. Arithmetic is fp32.

Two orthogonal words pick the implementation. ``method``, the algorithm:

- ``"reference"``: the paper's DKM in plain autograd. It materializes the N x K attention per
  iteration and keeps it for backward: the memory-hungry baseline every fast path is held to.
- ``"unique"``: uniquified DKM (:mod:`edkm.dkm.unique`), exact: sums over the at most 65,536 bit
  patterns of the 16-bit weights, weighted by their counts. The clustering sees each weight
  rounded to its 16-bit pattern (fp16 for fp16 weights, bf16 otherwise). For weights already
  representable in that dtype the result equals the reference; for other fp32 weights it equals
  the reference applied to the rounded weight, and the gradient flows straight through the
  rounding (d rounded / d w = 1).
- ``"implicit"``: implicit-attention DKM (:mod:`edkm.kernels.implicit`): the reference's math
  on the weights themselves (any dtype, no rounding), never materialising N x K; the ablation's
  baseline kernel.
- ``"auto"``: ``"implicit"`` when the kernels are Triton's and the weight is not 16-bit or its
  groups hold fewer than 65,536 weights each (the implicit pass over the weights then costs less
  than the table); ``"unique"`` otherwise, so always ``"unique"`` with torch kernels (CPU).

``backend``, the kernels of ``"unique"`` and ``"implicit"`` (``"reference"`` ignores it):
``"torch"`` (PyTorch ops), ``"triton"`` (Triton kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"auto"`` (Triton for CUDA tensors when triton is installed, else
torch).

Example:
    >>> import torch
    >>> w = torch.randn(16, 8).bfloat16().float()
    >>> c = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    >>> soft, c_new = dkm_soft(w, c, tau=0.1, iters=3, method="unique")
    >>> ref, c_ref = dkm_soft(w, c, tau=0.1, iters=3, method="reference")
    >>> bool(torch.allclose(soft, ref, atol=1e-5)), bool(torch.allclose(c_new, c_ref, atol=1e-5))
    (True, True)
"""

from __future__ import annotations

import torch

from edkm.dkm.unique import centroid_update, is_symbolic, soft_assign, unique_dkm
from edkm.kernels._common import BACKENDS, BINS, SIXTEEN_BIT, check_centroids, resolve_backend
from edkm.kernels.implicit import implicit_dkm

__all__ = ["BACKENDS", "METHODS", "choose_method", "dkm_reference", "dkm_soft"]

METHODS = ("auto", "reference", "unique", "implicit")


def _validate(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    tau: float | torch.Tensor,
    iters: int,
    group_size: int | None,
) -> tuple[int, torch.Tensor]:
    if not weight.is_floating_point() or weight.dim() not in (1, 2):
        raise ValueError(
            f"weight must be a 1-D or 2-D float tensor, got {weight.dim()}-D {weight.dtype}"
        )
    if group_size is None:
        groups = 1
    else:
        if group_size < 1 or weight.shape[0] % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide the {weight.shape[0]} output channels"
            )
        groups = weight.shape[0] // group_size
    k = check_centroids(centroids, groups)
    if k < 2 or k > 256 or k & (k - 1):
        raise ValueError(f"K = {k} centroids: bits must be in 1..8 (K a power of two, 2..256)")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=weight.device).detach()
    if tau_t.dim() == 0:
        tau_t = tau_t.expand(groups)
    if tau_t.shape != (groups,):
        raise ValueError(f"tau must be a number or a ({groups},) tensor, got {tuple(tau_t.shape)}")
    if not is_symbolic(tau_t) and not bool((tau_t > 0).all() & torch.isfinite(tau_t).all()):
        raise ValueError(f"tau must be finite and > 0, got {tau_t.tolist()}")
    return groups, tau_t.contiguous()


def _check_finite(weight: torch.Tensor) -> None:
    # detached: isfinite decomposes into ops that autograd would record (saving the weight)
    if not is_symbolic(weight) and not bool(torch.isfinite(weight.detach()).all()):
        raise ValueError("weight has non-finite values (NaN/inf); DKM cannot cluster them")


def choose_method(
    weight: torch.Tensor, groups: int, method: str = "auto", backend: str = "torch"
) -> str:
    """The algorithm ``method`` means for ``weight`` in ``groups`` LUT groups, given the
    resolved ``backend`` ("torch" or "triton"): ``"reference"``, ``"unique"`` or ``"implicit"``.

    Example:
        >>> big = torch.zeros(4096, 4096, dtype=torch.bfloat16)
        >>> choose_method(big, 1, backend="triton"), choose_method(big[:8], 1, backend="triton")
        ('unique', 'implicit')
        >>> choose_method(big[:8], 1, backend="torch")
        'unique'
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    if backend == "triton" and (weight.dtype not in SIXTEEN_BIT or weight.numel() // groups < BINS):
        return "implicit"
    return "unique"


def dkm_reference(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    tau: float | torch.Tensor,
    iters: int,
    groups: int = 1,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's DKM in plain autograd: materializes the N x K attention per iteration.

    The one reference DKM: ``dkm_soft(method="reference")`` runs it, and the tests hold every
    fast path (uniquified, implicit attention, torch or Triton) to it. ``tau`` is a number or a
    (G,) tensor; inputs are assumed validated (``dkm_soft`` does it). ``compute_dtype`` defaults
    to fp64 for fp64 weights (the tests' oracle) and fp32 otherwise, as the contract says.
    Returns (soft weight in the weight's dtype, c_T (G, K) in fp32, or fp64 when computed so).

    Example:
        >>> w = torch.tensor([0.0, 1.0, 3.0])
        >>> soft, c = dkm_reference(w, torch.tensor([[0.0, 3.0]]), torch.ones(1), 1)
        >>> c.shape
        torch.Size([1, 2])
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(compute_dtype).reshape(groups, -1)
    t = torch.as_tensor(tau, dtype=compute_dtype, device=weight.device).detach().expand(groups)
    c = centroids.to(compute_dtype)
    for _ in range(iters):
        c = centroid_update(soft_assign(w, c, t), w, c)
    soft = (soft_assign(w, c, t) * c.unsqueeze(1)).sum(-1)
    c_out = c if compute_dtype == torch.float64 else c.float()
    return soft.reshape(weight.shape).to(weight.dtype), c_out


def dkm_soft(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    method: str = "reference",
    backend: str = "auto",
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-cluster ``weight`` onto ``centroids`` with DKM (module docstring).

    Args:
        weight: (out_features, in_features) or 1-D, fp32/bf16/fp16.
        centroids: (G, K) with K = 2**bits; G = 1, or out_features // group_size.
        tau: absolute temperature, a number or one per group (G,).
        iters: k-means iterations (>= 0).
        method: the algorithm: "auto", "reference", "unique" or "implicit".
        backend: the kernels: "auto", "torch" or "triton" (ignored by "reference").
        group_size: output channels per LUT group (None: one LUT for the tensor).
        out_dtype: dtype of the soft weight (default: the weight's). Under bf16 autocast a
            bf16 soft weight equals the fp32 one cast by autocast, without the extra pass.

    Returns:
        (soft weight, same shape as ``weight`` in ``out_dtype``; new centroids (G, K) fp32).

    Raises:
        ValueError: bad shapes, bits outside 1..8, tau <= 0, iters < 0, non-finite weights, an
            unknown method or backend, ``backend="triton"`` on CPU tensors without
            ``TRITON_INTERPRET=1``, fp64 weights on the Triton kernels.

    With ``method="unique"`` the clustering sees the weight rounded to its 16-bit pattern
    (bf16; fp16 for fp16 weights): for weights already representable there the result equals
    the reference; otherwise it equals the reference applied to the rounded weight, and the
    gradient flows straight through the rounding.

    Example:
        >>> w = torch.randn(8, 4)
        >>> soft, c = dkm_soft(w, torch.tensor([[-1.0, 1.0]]), tau=0.5, iters=1)
        >>> soft.shape, c.shape
        (torch.Size([8, 4]), torch.Size([1, 2]))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    groups, tau_t = _validate(weight, centroids, tau, iters, group_size)
    resolved = "torch" if method == "reference" else resolve_backend(backend, weight)
    method = choose_method(weight, groups, method, resolved)
    if method == "unique":
        return unique_dkm(
            weight,
            centroids,
            tau=tau_t,
            iters=iters,
            groups=groups,
            out_dtype=out_dtype,
            backend=resolved,
        )
    _check_finite(weight)
    if method == "reference":
        soft, c = dkm_reference(
            weight, centroids, tau_t, iters, groups, compute_dtype=torch.float32
        )
    else:  # implicit: (G, n) rows, one LUT group per row
        soft, c = implicit_dkm(
            weight.reshape(groups, -1),
            centroids,
            tau=tau_t,
            iters=iters,
            group_size=1,
            backend=resolved,
        )
        soft, c = soft.view(weight.shape), c.float()
    return soft if out_dtype is None else soft.to(out_dtype), c
