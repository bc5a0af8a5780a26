"""Kernel tests: Triton runs compiled on CUDA, else in its interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before the kernels' ``@triton.jit`` decorators run; the kernel
modules are imported lazily by ``edkm.kernels`` on the first Triton launch, which happens in
these tests after this file has been imported. ``tests/dkm/conftest.py`` shares these fixtures
(the DKM engine's Triton backend is tested there).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the kernels run: CUDA when present, else CPU tensors under the interpreter."""
    return DEVICE


@pytest.fixture
def triton_backend() -> str:
    """The 'triton' backend name, skipping the test cleanly when Triton is not installed."""
    pytest.importorskip("triton")
    return "triton"


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item()


def _check_rule(
    name: str, out: torch.Tensor, truth: torch.Tensor, same_precision: torch.Tensor, rel_atol: float
) -> None:
    """flash-attention's rule: |out - truth| <= 2 |same-precision reference - truth| + atol.

    ``truth`` is the fp64 reference on the same input values; ``atol`` is ``rel_atol`` times the
    largest magnitude of ``truth`` (a few ulps of fp32 for quantities computed in fp32).
    """
    assert out.shape == truth.shape, (name, out.shape, truth.shape)
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, truth)
    ref = max_err(same_precision, truth)
    atol = rel_atol * truth.double().abs().max().item()
    assert err <= 2 * ref + atol, f"{name}: error {err:.3e} > 2 * {ref:.3e} + {atol:.3e}"


@pytest.fixture
def error_rule() -> Callable[..., None]:
    return _check_rule


def _make_inputs(
    shape: tuple[int, int],
    group_size: int | None,
    bits: int,
    dtype: torch.dtype,
    seed: int,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM-like weights in ``dtype``, quantile-initialised fp32 centroids, per-group tau (G,).

    tau is 0.05 x the group's weight variance (edkm's default relative temperature).
    """
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    groups = 1 if group_size is None else shape[0] // group_size
    flat = w.double().reshape(groups, -1)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits, dtype=torch.float64)
    centroids = torch.quantile(flat, q, dim=1).T.contiguous().float()
    tau = (0.05 * flat.var(dim=1, unbiased=False)).float()
    return w.to(device), centroids.to(device), tau.to(device)


def _run_dkm(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    seed: int = 1,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(soft, c_T, dL/dweight, dL/dcentroids) of ``fn`` for a fixed random upstream gradient.

    The loss also reads c_T, so the gradient through the returned centroids is checked too.
    """
    w = weight.detach().clone().requires_grad_()
    c = centroids.detach().clone().requires_grad_()
    soft, c_t = fn(w, c, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    g_soft = torch.randn(soft.shape, generator=gen, dtype=torch.float64).to(soft.device)
    g_c = torch.randn(c_t.shape, generator=gen, dtype=torch.float64).to(soft.device)
    loss = (soft.double() * g_soft).sum() + (c_t.double() * g_c).sum() * 1e-2
    loss.backward()
    assert w.grad is not None and c.grad is not None
    return soft.detach(), c_t.detach(), w.grad, c.grad


def _reference_dkm(
    weight: torch.Tensor,
    centroids: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    iters: int,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one reference DKM (``edkm.dkm.soft.dkm_reference``) with the kernels' keywords; it
    computes in fp64 for fp64 inputs (the oracle), else in fp32 (the same-precision yardstick)."""
    from edkm.dkm.soft import dkm_reference

    groups = 1 if group_size is None else weight.shape[0] // group_size
    return dkm_reference(weight, centroids, tau, iters, groups)


@pytest.fixture
def reference_dkm() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return _reference_dkm


@pytest.fixture
def make_inputs() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return _make_inputs


@pytest.fixture
def run_dkm() -> Callable[..., tuple[torch.Tensor, ...]]:
    return _run_dkm


def structured_weights(
    kind: str, shape: tuple[int, int], dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """Weights with the value structure that stresses binning."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    if kind == "ties":  # zeros, negative zeros and a popular value among random ones
        flat = w.view(-1)
        flat[::5] = 0.0
        flat[1::7] = -0.0
        flat[2::3] = 0.0123
    elif kind == "few":  # five distinct values: huge runs inside every block
        w = torch.tensor([-0.03, -0.01, 0.0, 0.01, 0.03])[torch.randint(0, 5, shape, generator=gen)]
    elif kind == "wide":  # many distinct patterns across the exponent range
        w = torch.randn(shape, generator=gen) * torch.exp2(
            torch.randint(-12, 4, shape, generator=gen)
        )
    return w.to(dtype)
