"""dkm_soft_triton: path choice, input checks, and both paths held to reference DKM."""

from __future__ import annotations

import pytest
import torch

from edkm.kernels import dkm_soft_triton
from edkm.kernels.dispatch import choose_path
from edkm.kernels.implicit import dkm_reference

NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")


def test_choose_path():
    big = torch.empty(512, 256, dtype=torch.bfloat16)  # 131,072 weights per tensor
    assert choose_path(big, 1) == "unique"
    assert choose_path(big, 4) == "implicit"  # 32,768 weights per group < 65,536 table rows
    assert choose_path(big.float(), 1) == "implicit"
    assert choose_path(big, 4, "unique") == "unique"
    assert choose_path(big, 1, "implicit") == "implicit"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        choose_path(big.float(), 1, "unique")
    with pytest.raises(ValueError, match="path"):
        choose_path(big, 1, "fast")  # type: ignore[arg-type]


def test_rejects_non_finite_and_unsupported_dtypes(device, triton_backend):
    w = torch.randn(8, 8, device=device)
    c = torch.zeros(1, 4, device=device)
    w[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dkm_soft_triton(w, c, tau=1.0, iters=1)
    w[3, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        dkm_soft_triton(w.to(torch.bfloat16), c, tau=1.0, iters=1, path="unique")
    with pytest.raises(ValueError, match="float64"):
        dkm_soft_triton(torch.zeros(8, 8, dtype=torch.float64, device=device), c, tau=1.0, iters=1)


@pytest.mark.parametrize("path", ["unique", "implicit"])
def test_paths_match_reference(make_inputs, run_dkm, error_rule, triton_backend, path):
    w, c, tau = make_inputs((48, 33), 12, 3, torch.bfloat16, seed=11)
    kw = {"iters": 2, "group_size": 12}
    truth = run_dkm(dkm_reference, w.double(), c.double(), tau=tau.double(), **kw)
    same = run_dkm(dkm_reference, w, c, tau=tau, **kw)
    out = run_dkm(dkm_soft_triton, w, c, tau=tau, **kw, path=path)
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, 2e-6)


def test_auto_path_on_fp32_weights(make_inputs, run_dkm, error_rule, triton_backend):
    w, c, tau = make_inputs((31, 29), None, 2, torch.float32, seed=12)
    truth = run_dkm(dkm_reference, w.double(), c.double(), tau=tau.double(), iters=3)
    same = run_dkm(dkm_reference, w, c, tau=tau, iters=3)
    out = run_dkm(dkm_soft_triton, w, c, tau=float(tau), iters=3)
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, 2e-6)
