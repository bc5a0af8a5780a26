"""edkm.dkm.unique: the uniquified DKM engine. The pattern table and its two forms, the
closed-form local slope held to autograd, the engine's edge cases, and the engine on both
backends held to the reference DKM (the per-weight ops themselves: tests/kernels/test_unique.py).
"""

from __future__ import annotations

import pytest
import torch

import edkm.dkm.unique as U
from edkm.dkm.soft import dkm_soft
from edkm.kernels._common import BINS
from tests.kernels.conftest import structured_weights

# one intra-op thread (tests/conftest.py): small tensors on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def patterns(w: torch.Tensor) -> torch.Tensor:
    """Plain reference: the unsigned 16-bit pattern of each weight (bf16 unless fp16), int64."""
    w16 = w if w.dtype == torch.float16 else w.to(torch.bfloat16)
    return w16.view(torch.int16).to(torch.int64) & 0xFFFF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pattern_values_and_nonfinite_patterns(dtype):
    values = U.pattern_values(dtype)
    some = torch.tensor([0.5, -3.0, 65504.0 if dtype == torch.float16 else 1e30]).to(dtype)
    assert torch.equal(values[patterns(some)], some.float())
    bad = U.nonfinite_patterns(dtype)
    assert torch.equal(bad, ~torch.isfinite(values))
    assert bool(bad[patterns(torch.tensor([float("inf"), float("nan")]).to(dtype))].all())


def _counts(values: list[list[float]], dtype=torch.bfloat16) -> torch.Tensor:
    counts = torch.zeros(len(values), BINS, dtype=torch.int32)
    for g, vals in enumerate(values):
        pat = patterns(torch.tensor(vals).to(dtype))
        counts[g].index_add_(0, pat, torch.ones_like(pat, dtype=torch.int32))
    return counts


def test_compact_and_fixed_tables_agree():
    counts = _counts([[1.0, 1.0, 2.0, -0.5], [3.0]])
    fixed = U.build_table(counts, torch.bfloat16, compact=False)
    compact = U.build_table(counts, torch.bfloat16, compact=True)
    assert not fixed.compact and compact.compact
    assert compact.u.shape == (2, 3)  # padded to the largest group
    # per group: same multiset of (value, count) for present rows; padding has n = 0
    for g in range(2):
        f = sorted(zip(fixed.u[g][fixed.n[g] > 0].tolist(), fixed.n[g][fixed.n[g] > 0].tolist()))
        c = sorted(
            zip(compact.u[g][compact.n[g] > 0].tolist(), compact.n[g][compact.n[g] > 0].tolist())
        )
        assert f == c
    values = torch.randn(2, 3)
    full = compact.expand(values)
    assert full.shape == (2, BINS)
    assert torch.equal(compact.reduce(full), torch.where(compact.n > 0, values, 0.0))
    assert torch.equal(fixed.expand(fixed.u), fixed.u)


def test_absent_rows_are_zero_not_inf():
    counts = _counts([[1.0]])
    fixed = U.build_table(counts, torch.bfloat16, compact=False)
    assert torch.isfinite(fixed.u).all()  # inf/NaN patterns are absent, so 0
    assert int((fixed.u != 0).sum()) == 1
    c = U.table_iterations(fixed.u, fixed.n, torch.tensor([[0.0, 2.0]]), torch.ones(1), 3)
    assert torch.isfinite(c).all()


def test_compact_ratio_constant_controls_auto_choice(monkeypatch):
    counts = _counts([[1.0, 2.0, 3.0]])
    monkeypatch.setattr(U, "COMPACT_RATIO", 0.0)
    assert not U.build_table(counts, torch.bfloat16).compact
    monkeypatch.setattr(U, "COMPACT_RATIO", 1.0)
    assert U.build_table(counts, torch.bfloat16).compact


def test_local_slope_matches_autograd():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    c = torch.sort(torch.randn(2, 8, generator=gen, dtype=torch.float64), dim=1)[0]
    tau = torch.tensor([0.05, 0.5], dtype=torch.float64)
    leaf = u.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(U.table_output(leaf, c, tau).sum(), leaf)
    torch.testing.assert_close(U.local_slope(u, c, tau), expected)


@pytest.mark.parametrize("compact", [True, False])
def test_unique_dkm_matches_reference_with_both_tables(compact):
    from edkm.dkm.soft import dkm_reference

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=gen).bfloat16().float()
    c = torch.sort(torch.randn(2, 4, generator=gen), dim=1)[0]
    tau = torch.tensor([0.1, 0.3])
    g = torch.randn(24, 16, generator=gen)
    results = []
    for fn in (
        lambda w_, c_: U.unique_dkm(w_, c_, tau=tau, iters=3, groups=2, compact=compact, chunk=50),
        lambda w_, c_: dkm_reference(w_, c_, tau, 3, 2),
    ):
        w_ = w.clone().requires_grad_(True)
        c_ = c.clone().requires_grad_(True)
        soft, c_t = fn(w_, c_)
        ((soft * g).sum() + c_t.sum()).backward()
        results.append((soft.detach(), c_t.detach(), w_.grad, c_.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unique_dkm_non_finite_and_chunk_errors():
    c = torch.tensor([[0.0, 1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        U.unique_dkm(torch.tensor([1.0, float("nan")]).bfloat16(), c, tau=1.0, iters=1)
    with pytest.raises(ValueError, match="chunk"):
        U.unique_dkm(torch.ones(2), c, tau=1.0, iters=1, chunk=0)


def test_compact_table_refused_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(64, 64, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="concrete shapes"):
            U.unique_dkm(w, torch.empty(1, 4), tau=1.0, iters=1, compact=True)
        soft, _ = U.unique_dkm(w, torch.empty(1, 4), tau=1.0, iters=1)  # auto: fixed table
        assert soft.shape == (64, 64)


def test_backward_keeps_nothing_weight_sized_but_the_weight():
    w = torch.randn(64, 64).bfloat16().requires_grad_(True)
    soft, _ = U.unique_dkm(w, torch.tensor([[-1.0, 1.0]]), tau=0.5, iters=2)
    assert soft.grad_fn is not None
    saved = soft.grad_fn.saved_tensors  # type: ignore[attr-defined]
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()


def test_centroid_update_min_mass_rule():
    # masses 1, 2^-63 (at the bound: empty) and 2^-62 (above: moves); gradients stay finite
    a = torch.tensor([[[1.0, 2.0**-63, 2.0**-62]]]).requires_grad_(True)
    x = torch.tensor([[3.0]])
    c = torch.tensor([[0.0, 5.0, 7.0]])
    out = U.centroid_update(a, x, c)
    assert out.tolist() == [[3.0, 5.0, 3.0]]
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    # a subnormal mass with a zero upstream: 0 * inf = NaN under the old "s0 > 0" rule
    sub = torch.tensor([[[1.0, 1e-40]]]).requires_grad_(True)
    U.centroid_update(sub, x, torch.tensor([[0.0, 5.0]])).mul(
        torch.tensor([[1.0, 0.0]])
    ).sum().backward()
    assert sub.grad is not None and torch.isfinite(sub.grad).all()


def test_rows_and_pattern_values_decode_patterns():
    from edkm.kernels.unique import block_rows

    w = torch.tensor([[1.0, -2.0], [0.0, -0.0]], dtype=torch.bfloat16)
    keys = block_rows(w, 0).reshape(-1).long()
    assert keys.tolist() == [0x3F80, 0xC000, BINS + 0x0000, BINS + 0x8000]
    values = U.pattern_values(torch.bfloat16)
    assert torch.equal(values[keys % BINS].view(2, 2), w.float())
    counts = torch.zeros(1, BINS, dtype=torch.int32)
    counts[0, 0x3F80] = 1  # inf and NaN never occur in a weight (they raise): absent rows
    u = U.build_table(counts, torch.bfloat16, compact=False).u
    assert u[0, 0x7F80].item() == 0.0 and u[0, 0x7FC0].item() == 0.0  # inf and NaN read 0
    h = U.pattern_values(torch.float16)
    patterns_ = torch.arange(0, BINS, 97)
    decoded = torch.where(patterns_ >= 1 << 15, patterns_ - BINS, patterns_).to(torch.int16)
    expect = decoded.view(torch.float16).float()
    torch.testing.assert_close(h[patterns_], expect, rtol=0, atol=0, equal_nan=True)


# ---- the engine on both backends, held to the reference DKM ------------------------------------

NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")
REL_ATOL = 2e-6


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
    w = structured_weights(kind, shape, dtype, seed=7)
    groups = 1 if gs is None else shape[0] // gs
    flat = w.double().reshape(groups, -1)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits, dtype=torch.float64)
    c = torch.quantile(flat, q, dim=1).T.contiguous().float()
    c = c + torch.arange(2**bits) * 1e-4  # distinct centroids even when quantiles tie
    tau = (0.05 * flat.var(dim=1, unbiased=False)).float()
    return w.to(device), c.to(device), tau.to(device), gs


def _unique(weight, centroids, **kw):
    return dkm_soft(weight, centroids, method="unique", **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DKM_CASES, ids=_dkm_id)
def test_unique_dkm_matches_reference_dkm(
    run_dkm, error_rule, reference_dkm, device, backend, case
):
    if backend == "triton":
        pytest.importorskip("triton")
    w, c, tau, gs = _inputs(case, device)
    kw = {"iters": 3, "group_size": gs}
    truth = run_dkm(reference_dkm, w.double(), c.double(), tau=tau.double(), **kw)
    same = run_dkm(reference_dkm, w, c, tau=tau, **kw)
    out = run_dkm(_unique, w, c, tau=tau, **kw, backend=backend)
    assert out[0].dtype == w.dtype and out[2].dtype == w.dtype
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, REL_ATOL)


def test_unique_dkm_eight_bits(run_dkm, error_rule, reference_dkm, device, triton_backend):
    # K = 256 centroids over the 65,536-row table: one iteration keeps the interpreter quick
    gen = torch.Generator().manual_seed(8)
    w = (torch.randn(48, 40, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    c = torch.linspace(-0.05, 0.05, 256).view(1, 256).to(device)
    kw = {"tau": 2e-5, "iters": 1}
    truth = run_dkm(reference_dkm, w.double(), c.double(), **kw)
    same = run_dkm(reference_dkm, w, c, **kw)
    out = run_dkm(_unique, w, c, **kw, backend=triton_backend)
    for name, o, t, s in zip(NAMES, out, truth, same):
        error_rule(name, o, t, s, REL_ATOL)


def test_fp32_weights_on_both_backends_agree(run_dkm, device, triton_backend):
    # fp32 weights: the Triton kernels round them to bf16 patterns in registers
    w, c, tau, gs = _inputs(DKM_CASES[0], device)
    w = (
        w.float()
        + torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(device) * 1e-4
    )
    kw = {"tau": tau, "iters": 2, "group_size": gs}
    a = run_dkm(_unique, w, c, **kw, backend="torch")
    b = run_dkm(_unique, w, c, **kw, backend=triton_backend)
    for name, x, y in zip(NAMES, a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=name)


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

        # what the forward saves for backward (the backward's own small table graph is
        # transient: built and freed inside the backward call)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            soft = U.unique_dkm(w, c, tau=1e-4, iters=3, backend="torch")[0]
        soft.float().sum().backward()
        return sum(seen)

    small, large = saved_bytes(16), saved_bytes(256)
    assert small == large
    assert large <= BINS * 4 + (2 * 3 + 1) * 8 * 4 + 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runs_under_fake_tensor_mode(backend, device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "triton":
        pytest.importorskip("triton")
    # on a CUDA machine the Triton backend takes CUDA tensors (the interpreter is off there)
    with FakeTensorMode():
        w = torch.empty(256, 64, dtype=torch.bfloat16, device=device).requires_grad_()
        c = torch.empty(2, 8, device=device).requires_grad_()
        soft, c_t = dkm_soft(
            w, c, tau=torch.ones(2), iters=2, group_size=128, method="unique", backend=backend
        )
        soft.float().sum().backward()
        assert soft.shape == w.shape and c_t.shape == (2, 8)
        assert w.grad is not None and c.grad is not None and c.grad.shape == (2, 8)


def test_matches_dkm_soft_reference(run_dkm, device):
    w, c, tau, gs = _inputs(DKM_CASES[0], device)
    ref = run_dkm(dkm_soft, w, c, tau=tau, iters=3, group_size=gs, method="reference")
    out = run_dkm(_unique, w, c, tau=tau, iters=3, group_size=gs, backend="torch")
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-5, msg=name)


def test_per_weight_passes_are_single_custom_ops():
    # traced forward + backward: the four N-sized passes are one edkm op each, and the graph
    # has no data-dependent shape (the fixed table)
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(w: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        soft, c_t = dkm_soft(w, c, tau=0.01, iters=2, method="unique", backend="torch")
        return torch.autograd.grad((soft.float() * g).sum() + c_t.sum(), (w, c))

    w = torch.randn(32, 16).bfloat16().requires_grad_()
    c = torch.linspace(-1, 1, 4).view(1, 4).requires_grad_()
    graph = make_fx(step, tracing_mode="fake")(w, c, torch.randn(32, 16))
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    edkm_ops = sorted(t for t in targets if t.startswith("edkm."))
    assert edkm_ops == [
        "edkm.bit_histogram.default",
        "edkm.gather_table.default",
        "edkm.scatter_bins.default",
        "edkm.unique_grad.default",
    ], edkm_ops
    assert not any(t.startswith(("aten.nonzero", "aten.unique", "aten._unique")) for t in targets)
