"""Grouped LUTs (one LUT per ``group_size`` consecutive output channels) on every DKM path.

Each fast path (uniquified DKM on the torch ops and on the Triton kernels, implicit-attention
DKM on both) is held, group by group, to the reference DKM run on that group alone: forward
soft weight, centroids after the k-means iterations, and the gradients of the weight and the
initial centroids, under the same error rule as the per-tensor tests (tests/kernels/conftest.py:
``|out - truth| <= 2 |fp32 reference - truth| + atol``, truth in fp64). The layouts include
groups that hold fewer weights than centroids and a single group spanning all output channels.

The per-weight work does not loop over groups: a whole grouped layer is one call of each
``edkm::`` custom op (the group is part of the table row), counted here at run time.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edkm.dkm.soft import dkm_reference, dkm_soft
from tests.kernels.conftest import structured_weights

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")
REL_ATOL = 2e-6  # as the per-tensor tests: ~16 fp32 ulps of the largest value

# (kind, shape, group_size, bits, dtype)
LAYOUTS = [
    ("plain", (48, 20), 1, 3, torch.bfloat16),  # 48 groups of 20 weights
    ("plain", (12, 3), 1, 3, torch.float16),  # 3 weights per group, 8 centroids: empty clusters
    ("ties", (48, 20), 6, 2, torch.float16),  # zeros, -0 and a popular value in every group
    ("wide", (40, 9), 8, 4, torch.bfloat16),
    ("plain", (32, 16), 32, 3, torch.bfloat16),  # group_size == out_features: one group
]


def _id(case: tuple) -> str:
    kind, shape, gs, bits, dtype = case
    return f"{kind}-{shape[0]}x{shape[1]}-g{gs}-b{bits}-{str(dtype).split('.')[-1]}"


def _inputs(case: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Weights, per-group quantile centroids (distinct) and per-group tau (0.05 x variance)."""
    kind, shape, gs, bits, dtype = case
    w = structured_weights(kind, shape, dtype, seed=11)
    groups = shape[0] // gs
    flat = w.double().reshape(groups, -1)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits, dtype=torch.float64)
    c = torch.quantile(flat, q, dim=1).T.contiguous().float()
    c = c + torch.arange(2**bits) * 1e-4
    var = flat.var(dim=1, unbiased=False).clamp_min(1e-8)
    return w.to(device), c.to(device), (0.05 * var).float().to(device), gs


def _per_group_reference(weight, centroids, *, tau, iters, group_size):
    """The reference DKM run on each group's slice alone, results stacked back."""
    softs, cs = [], []
    for g in range(weight.shape[0] // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        soft, c = dkm_reference(weight[rows], centroids[g : g + 1], tau[g : g + 1], iters)
        softs.append(soft)
        cs.append(c)
    return torch.cat(softs), torch.cat(cs)


def _check(run_dkm, error_rule, case, device, fn, **kw) -> None:
    w, c, tau, gs = _inputs(case, device)
    args = {"tau": tau, "iters": 3, "group_size": gs}
    truth = run_dkm(_per_group_reference, w.double(), c.double(), **{**args, "tau": tau.double()})
    same = run_dkm(_per_group_reference, w, c, **args)
    out = run_dkm(fn, w, c, **args, **kw)
    assert out[0].dtype == w.dtype and out[2].dtype == w.dtype
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, REL_ATOL)


@pytest.mark.parametrize("case", LAYOUTS, ids=_id)
@pytest.mark.parametrize("method", ["reference", "unique", "implicit"])
def test_grouped_dkm_matches_per_group_reference_torch(run_dkm, error_rule, device, case, method):
    _check(run_dkm, error_rule, case, device, dkm_soft, method=method, backend="torch")


@pytest.mark.parametrize("case", LAYOUTS, ids=_id)
@pytest.mark.parametrize("method", ["unique", "implicit"])
def test_grouped_dkm_matches_per_group_reference_triton(
    run_dkm, error_rule, device, triton_backend, case, method
):
    _check(run_dkm, error_rule, case, device, dkm_soft, method=method, backend=triton_backend)


def test_groups_are_independent(device):
    """Changing one group's weights leaves every other group's result bit for bit."""
    w, c, tau, gs = _inputs(LAYOUTS[3], device)
    kw = {"tau": tau, "iters": 3, "group_size": gs, "method": "unique", "backend": "torch"}
    soft, c_t = dkm_soft(w, c, **kw)
    w2 = w.clone()
    w2[:gs] = w2[:gs] * 2  # group 0 only
    soft2, c_t2 = dkm_soft(w2, c, **kw)
    assert torch.equal(soft[gs:], soft2[gs:]) and torch.equal(c_t[1:], c_t2[1:])
    assert not torch.equal(c_t[0], c_t2[0])


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if name.startswith("edkm."):
            self.calls[name.split(".")[1]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_weight_ops_run_once_per_layer_whatever_the_groups(device, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(64, 24, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    for group_size in (None, 32, 8, 1):
        groups = 1 if group_size is None else 64 // group_size
        w = w0.clone().requires_grad_()
        c = torch.linspace(-0.04, 0.04, 8).repeat(groups, 1).to(device).requires_grad_()
        with _OpCounter() as counter:
            soft, c_t = dkm_soft(
                w, c, tau=1e-4, iters=3, group_size=group_size, method="unique", backend=backend
            )
            (soft.float().sum() + c_t.sum()).backward()
        assert dict(counter.calls) == {
            "bit_histogram": 1,
            "gather_table": 1,
            "scatter_bins": 1,
            "unique_grad": 1,
        }, (group_size, dict(counter.calls))
