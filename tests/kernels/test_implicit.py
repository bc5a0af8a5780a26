"""Implicit-attention DKM: chunked torch engine and Triton kernels held to the reference."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from edkm.kernels import implicit_dkm
from edkm.kernels._common import use_triton
from edkm.kernels.implicit_torch import TorchEngine, chunk_rows

# (shape, group_size, bits, dtype): irregular and round shapes, per-tensor and grouped LUTs
CASES = [
    ((37, 53), None, 3, torch.float32),
    ((37, 53), None, 1, torch.bfloat16),
    ((64, 64), 16, 2, torch.float16),
    ((64, 64), 8, 4, torch.float32),
    ((129, 31), None, 8, torch.bfloat16),
    ((129, 31), 43, 5, torch.float32),
    ((129, 31), None, 6, torch.float16),
    ((20, 17), 5, 7, torch.bfloat16),
]
NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")
REL_ATOL = 2e-6  # ~16 fp32 ulps of the largest value, for quantities computed in fp32


def _case_id(case: tuple) -> str:
    shape, gs, bits, dtype = case
    return f"{shape[0]}x{shape[1]}-g{gs}-b{bits}-{str(dtype).split('.')[-1]}"


def _check_against_reference(
    make_inputs, run_dkm, error_rule, reference_dkm, case, seed, **kwargs
) -> None:
    shape, gs, bits, dtype = case
    w, c, tau = make_inputs(shape, gs, bits, dtype, seed)
    truth = run_dkm(reference_dkm, w.double(), c.double(), tau=tau.double(), iters=3, group_size=gs)
    same = run_dkm(reference_dkm, w, c, tau=tau, iters=3, group_size=gs)
    out = run_dkm(implicit_dkm, w, c, tau=tau, iters=3, group_size=gs, **kwargs)
    assert out[0].dtype == dtype and out[2].dtype == dtype
    assert out[1].dtype == torch.float32 and out[3].dtype == torch.float32
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, REL_ATOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_engine_matches_reference(make_inputs, run_dkm, error_rule, reference_dkm, case):
    _check_against_reference(
        make_inputs, run_dkm, error_rule, reference_dkm, case, seed=0, backend="torch"
    )


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_kernels_match_reference(
    make_inputs, run_dkm, error_rule, reference_dkm, triton_backend, case
):
    _check_against_reference(
        make_inputs, run_dkm, error_rule, reference_dkm, case, seed=1, backend=triton_backend
    )


def test_chunked_engine_matches_one_chunk(make_inputs, run_dkm, error_rule, reference_dkm):
    # a tile of 256 elements forces 37*53*8/256 ~ 62 chunks, the last one ragged
    w, c, tau = make_inputs((37, 53), None, 3, torch.float32, seed=2)
    assert chunk_rows(1, w.numel(), 8, tile_elements=256) == 32
    from edkm.kernels.implicit import _ImplicitDKM

    def chunked(weight, centroids, *, tau, iters):
        return _ImplicitDKM.apply(weight, centroids, tau, iters, 1, TorchEngine(tile_elements=256))

    truth = run_dkm(reference_dkm, w.double(), c.double(), tau=tau.double(), iters=3)
    one = run_dkm(implicit_dkm, w, c, tau=tau, iters=3, backend="torch")
    many = run_dkm(chunked, w, c, tau=tau, iters=3)
    for name, a, b, t in zip(NAMES, many, one, truth):
        error_rule(name, a, t, b, REL_ATOL)


def test_empty_cluster_keeps_centroid_and_passes_gradient(
    run_dkm, reference_dkm, triton_backend, device
):
    # a centroid far from every weight gets exactly zero assignment (exp underflows), so it is
    # kept; its gradient then only comes through the returned c_T
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(24, 10, generator=gen) * 0.02).to(device)
    c = torch.tensor([[-0.02, 0.0, 0.02, 5.0]], device=device)
    tau = 1e-5
    ref = run_dkm(reference_dkm, w, c, tau=tau, iters=3)
    assert ref[1][0, 3].item() == 5.0
    for backend in ("torch", triton_backend):
        out = run_dkm(implicit_dkm, w, c, tau=tau, iters=3, backend=backend)
        assert out[1][0, 3].item() == 5.0
        for name, a, b in zip(NAMES, out, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_iterations_is_soft_assignment_only(
    make_inputs, run_dkm, error_rule, reference_dkm, backend
):
    if backend == "triton":
        pytest.importorskip("triton")
    w, c, tau = make_inputs((16, 12), 4, 2, torch.float32, seed=4)
    kw = {"tau": tau, "iters": 0, "group_size": 4}
    truth = run_dkm(reference_dkm, w.double(), c.double(), **{**kw, "tau": tau.double()})
    ref = run_dkm(reference_dkm, w, c, **kw)
    out = run_dkm(implicit_dkm, w, c, **kw, backend=backend)
    assert torch.equal(out[1], c)  # no update: c_T is c_0
    for name, a, b, t in zip(NAMES, out, ref, truth):
        error_rule(name, a, t, b, REL_ATOL)


def test_saved_memory_is_weight_plus_centroids(reference_dkm):
    # O(N + T*K): the backward keeps the weight (no copy) and per-iteration K-vectors only,
    # while the reference keeps several N x K maps per iteration
    w = (torch.randn(64, 48) * 0.02).requires_grad_()
    c = torch.linspace(-0.04, 0.04, 8).view(1, 8).requires_grad_()
    iters = 4

    def saved_bytes(fn) -> int:
        seen: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(w, c, tau=1e-4, iters=iters)[0].sum().backward()
        return sum(seen)

    lean = saved_bytes(lambda *a, **k: implicit_dkm(*a, **k, backend="torch"))
    k_vectors = (2 * iters + 1) * 8 * 4 + 4  # c_0..c_T, S0_0..S0_{T-1}, tau
    assert lean <= w.numel() * 4 + k_vectors
    assert saved_bytes(reference_dkm) > iters * w.numel() * 8 * 4


def test_runs_under_fake_tensor_mode():
    # the ablation benchmark measures this path with FakeTensorMode: no data-dependent shapes
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(512, 256, dtype=torch.bfloat16).requires_grad_()
        c = torch.empty(4, 8).requires_grad_()
        soft, c_t = implicit_dkm(w, c, tau=torch.ones(4), iters=3, group_size=128)
        soft.float().sum().backward()
        assert soft.shape == w.shape and soft.dtype == torch.bfloat16
        assert c_t.shape == (4, 8) and w.grad is not None and w.grad.shape == w.shape
        assert c.grad is not None and c.grad.shape == (4, 8)


def test_matches_edkm_dkm_reference(make_inputs, run_dkm):
    if importlib.util.find_spec("edkm.dkm.soft") is None:
        pytest.skip("edkm.dkm.soft is not there yet")
    from edkm.dkm.soft import dkm_soft

    w, c, tau = make_inputs((37, 53), 37, 3, torch.bfloat16, seed=5)
    ref = run_dkm(dkm_soft, w, c, tau=tau, iters=3, group_size=37, method="reference")
    out = run_dkm(implicit_dkm, w, c, tau=tau, iters=3, group_size=37, backend="torch")
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-5, msg=name)


def test_rejects_bad_arguments():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="group_size"):
        implicit_dkm(w, torch.zeros(1, 2), tau=1.0, iters=1, group_size=4)
    with pytest.raises(ValueError, match="centroids"):
        implicit_dkm(w, torch.zeros(2, 2), tau=1.0, iters=1)
    with pytest.raises(ValueError, match="tau"):
        implicit_dkm(w, torch.zeros(1, 2), tau=-1.0, iters=1)


def test_backend_choice_by_device(monkeypatch):
    cpu = torch.zeros(1)
    assert use_triton("auto", cpu) is False
    assert use_triton("torch", cpu) is False
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        use_triton("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", cpu) is True


def test_kernels_imported_before_interpreter_fail_clearly(triton_backend):
    # @triton.jit reads TRITON_INTERPRET at import: a late setting must not crash obscurely
    if torch.cuda.is_available():
        pytest.skip("CPU tensors only")
    probe = (
        "import os, torch\n"
        "import edkm.kernels.implicit_triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from edkm.kernels import implicit_dkm\n"
        "try:\n"
        "    implicit_dkm(torch.randn(4, 4), torch.zeros(1, 2), tau=1.0, iters=1, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    print('RAISED', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "RAISED" in out and "TRITON_INTERPRET=1" in out, out
