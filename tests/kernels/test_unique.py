"""Uniquified path: bin kernels bit-exact / held to references, full DKM held to reference DKM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edkm.kernels import bit_histogram, gather_table, scatter_bins, unique_dkm, unique_grad
from edkm.kernels.implicit import dkm_reference
from edkm.kernels.unique import (
    BINS,
    bit_histogram_ref,
    bit_keys,
    gather_table_ref,
    scatter_bins_ref,
    table_values,
    unique_grad_ref,
)

NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")
REL_ATOL = 2e-6


def _weights(kind: str, shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
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


BIN_CASES = [
    ("ties", (37, 53), None, torch.bfloat16),
    ("few", (64, 64), 16, torch.float16),
    ("wide", (129, 31), None, torch.float16),
    ("ties", (129, 31), 43, torch.bfloat16),
    ("few", (40, 7), None, torch.bfloat16),
]


def _bin_id(case: tuple) -> str:
    kind, shape, gs, dtype = case
    return f"{kind}-{shape[0]}x{shape[1]}-g{gs}-{str(dtype).split('.')[-1]}"


def test_bit_keys_and_table_values_decode_patterns():
    w = torch.tensor([[1.0, -2.0], [0.0, -0.0]], dtype=torch.bfloat16)
    keys = bit_keys(w, 1)
    assert keys.tolist() == [0x3F80, 0xC000, BINS + 0x0000, BINS + 0x8000]
    values = table_values(torch.bfloat16)
    assert torch.equal(values[keys % BINS].view(2, 2), w.float())
    assert values[0x7F80].item() == 0.0 and values[0x7FC0].item() == 0.0  # inf and NaN read 0
    h = table_values(torch.float16)
    patterns = torch.arange(0, BINS, 97)
    decoded = torch.where(patterns >= 1 << 15, patterns - BINS, patterns).to(torch.int16)
    expect = decoded.view(torch.float16).float()
    assert torch.equal(h[patterns], torch.where(torch.isfinite(expect), expect, 0.0))


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_histogram_bit_exact(triton_backend, device, case):
    kind, shape, gs, dtype = case
    w = _weights(kind, shape, dtype, seed=0).to(device)
    ref = bit_histogram_ref(w, gs)
    groups = 1 if gs is None else shape[0] // gs
    counted = torch.bincount(bit_keys(w, gs), minlength=groups * BINS).view(groups, BINS)
    assert torch.equal(ref, counted.to(torch.int32))  # the reference itself, independently
    out = bit_histogram(w, group_size=gs, backend=triton_backend)
    assert out.dtype == torch.int32 and out.shape == (groups, BINS)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
@pytest.mark.parametrize("table_dtype", ["weight", "float32"])
def test_gather_bit_exact(triton_backend, device, case, table_dtype):
    kind, shape, gs, dtype = case
    w = _weights(kind, shape, dtype, seed=1).to(device)
    groups = 1 if gs is None else shape[0] // gs
    gen = torch.Generator().manual_seed(2)
    tdt = dtype if table_dtype == "weight" else torch.float32
    table = torch.randn(groups, BINS, generator=gen).to(tdt).to(device)
    out = gather_table(table, w, group_size=gs, backend=triton_backend)
    ref = gather_table_ref(table, w, gs)
    assert out.dtype == tdt and out.shape == w.shape
    raw = torch.int16 if tdt != torch.float32 else torch.int32
    assert torch.equal(out.view(raw), ref.view(raw))
    # the reference is the lookup by row: spot-check it against a python loop
    flat_w = w.reshape(groups, -1).view(torch.int16).to(torch.int64) & 0xFFFF
    for g, i in ((0, 0), (groups - 1, flat_w.shape[1] - 1)):
        assert ref.reshape(groups, -1)[g, i].item() == table[g, flat_w[g, i]].item()


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_scatter_add_matches_fp64_sums(triton_backend, device, error_rule, case):
    kind, shape, gs, dtype = case
    w = _weights(kind, shape, dtype, seed=3).to(device)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    groups = 1 if gs is None else shape[0] // gs
    truth = torch.zeros(groups * BINS, dtype=torch.float64, device=device)
    truth.index_add_(0, bit_keys(w, gs), g.reshape(-1).double())
    out = scatter_bins(g, w, group_size=gs, backend=triton_backend)
    assert out.dtype == torch.float32 and out.shape == (groups, BINS)
    error_rule("scatter", out.view(-1), truth, scatter_bins_ref(g, w, gs).view(-1), 1e-7)
    assert torch.equal(out != 0, truth.view(groups, BINS) != 0)  # no bin lost or invented


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_fused_backward_matches_reference(triton_backend, device, error_rule, case):
    kind, shape, gs, dtype = case
    w = _weights(kind, shape, dtype, seed=5).to(device)
    groups = 1 if gs is None else shape[0] // gs
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    slope_path = torch.randn(groups, BINS, 2, generator=gen).to(device)
    keys = bit_keys(w, gs)
    table = slope_path.reshape(-1, 2).double()
    truth = (g.reshape(-1).double() * table[keys, 0] + table[keys, 1]).view(shape)
    out = unique_grad(g, w, slope_path, group_size=gs, backend=triton_backend)
    assert out.dtype == dtype
    error_rule("grad", out, truth, unique_grad_ref(g, w, slope_path, gs), 1e-7)


# (kind, shape, group_size, bits, dtype) for the whole uniquified DKM
DKM_CASES = [
    ("plain", (37, 53), None, 3, torch.bfloat16),
    ("ties", (64, 64), 16, 2, torch.float16),
    ("few", (129, 31), None, 4, torch.bfloat16),
    ("wide", (40, 7), 10, 1, torch.float16),
]


def _dkm_id(case: tuple) -> str:
    kind, shape, gs, bits, dtype = case
    return f"{kind}-{shape[0]}x{shape[1]}-g{gs}-b{bits}-{str(dtype).split('.')[-1]}"


def _inputs(
    case: tuple, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    kind, shape, gs, bits, dtype = case
    w = _weights(kind, shape, dtype, seed=7)
    groups = 1 if gs is None else shape[0] // gs
    flat = w.double().reshape(groups, -1)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits, dtype=torch.float64)
    c = torch.quantile(flat, q, dim=1).T.contiguous().float()
    c = c + torch.arange(2**bits) * 1e-4  # distinct centroids even when quantiles tie
    tau = (0.05 * flat.var(dim=1, unbiased=False)).float()
    return w.to(device), c.to(device), tau.to(device), gs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DKM_CASES, ids=_dkm_id)
def test_unique_dkm_matches_reference_dkm(run_dkm, error_rule, device, backend, case):
    if backend == "triton":
        pytest.importorskip("triton")
    w, c, tau, gs = _inputs(case, device)
    kw = {"iters": 3, "group_size": gs}
    truth = run_dkm(dkm_reference, w.double(), c.double(), tau=tau.double(), **kw)
    same = run_dkm(dkm_reference, w, c, tau=tau, **kw)
    out = run_dkm(unique_dkm, w, c, tau=tau, **kw, backend=backend)
    assert out[0].dtype == w.dtype and out[2].dtype == w.dtype
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, REL_ATOL)


def test_unique_dkm_eight_bits(run_dkm, error_rule, device, triton_backend):
    # K = 256 centroids over the 65,536-row table: one iteration keeps the interpreter quick
    gen = torch.Generator().manual_seed(8)
    w = (torch.randn(48, 40, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    c = torch.linspace(-0.05, 0.05, 256).view(1, 256).to(device)
    kw = {"tau": 2e-5, "iters": 1}
    truth = run_dkm(dkm_reference, w.double(), c.double(), **kw)
    same = run_dkm(dkm_reference, w, c, **kw)
    out = run_dkm(unique_dkm, w, c, **kw, backend=triton_backend)
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, REL_ATOL)


def test_saved_memory_does_not_grow_with_weights():
    # backward keeps the weight itself, the (G, 65536) histogram and O(T*K) vectors
    c = torch.linspace(-0.04, 0.04, 8).view(1, 8).requires_grad_()

    def saved_bytes(rows: int) -> int:
        w = (torch.randn(rows, 64) * 0.02).to(torch.bfloat16).requires_grad_()
        seen: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() != w.data_ptr():
                seen.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unique_dkm(w, c, tau=1e-4, iters=3, backend="torch")[0].float().sum().backward()
        return sum(seen)

    small, large = saved_bytes(16), saved_bytes(256)
    assert small == large
    assert large <= BINS * 4 + (2 * 3 + 1) * 8 * 4 + 4


def test_runs_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(256, 64, dtype=torch.bfloat16).requires_grad_()
        c = torch.empty(2, 8).requires_grad_()
        soft, c_t = unique_dkm(w, c, tau=torch.ones(2), iters=2, group_size=128, backend="torch")
        soft.float().sum().backward()
        assert soft.shape == w.shape and c_t.shape == (2, 8)
        assert w.grad is not None and c.grad is not None and c.grad.shape == (2, 8)


def test_matches_edkm_dkm_unique(run_dkm, device):
    if importlib.util.find_spec("edkm.dkm.soft") is None:
        pytest.skip("edkm.dkm.soft is not there yet")
    from edkm.dkm.soft import dkm_soft

    w, c, tau, gs = _inputs(DKM_CASES[0], device)
    ref = run_dkm(dkm_soft, w, c, tau=tau, iters=3, group_size=gs, method="reference")
    out = run_dkm(unique_dkm, w, c, tau=tau, iters=3, group_size=gs, backend="torch")
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-5, msg=name)


def test_rejects_non_16bit_weights():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        bit_histogram(w)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        unique_dkm(w, torch.zeros(1, 2), tau=1.0, iters=1)
    with pytest.raises(ValueError, match="shape"):
        gather_table(torch.zeros(2, BINS), w.to(torch.bfloat16))
