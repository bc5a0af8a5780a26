"""edkm.dkm.unique: the N-sized passes held to plain indexing, the two table forms, the closed-form
local slope held to autograd, and the uniquified function's edge cases."""

from __future__ import annotations

import pytest
import torch

import edkm.dkm.unique as U


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: small tensors, and a loaded machine makes torch's pool very slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patterns(w: torch.Tensor) -> torch.Tensor:
    """Plain reference: the unsigned 16-bit pattern of each weight (bf16 unless fp16), int64."""
    w16 = w if w.dtype == torch.float16 else w.to(torch.bfloat16)
    return w16.view(torch.int16).to(torch.int64) & 0xFFFF


def ref_rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    pat = patterns(w).reshape(groups, -1)
    return (pat + torch.arange(groups).unsqueeze(1) * U.BINS).reshape(-1)


CASES = [  # (shape, groups, chunk): chunks inside a group, spanning groups, uneven tails
    ((7, 5), 1, U.CHUNK),
    ((12, 10), 4, 7),
    ((12, 10), 4, 64),
    ((12, 10), 3, 1000),
    ((1000,), 1, 333),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "groups", "chunk"), CASES)
def test_passes_match_plain_indexing(shape, groups, chunk, dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w.view(-1)[:3] = torch.tensor([0.0, -0.0, 1.0], dtype=dtype)  # both zeros, repeats
    rows = ref_rows(w, groups)

    counts = U.histogram(w, groups, chunk=chunk)
    assert counts.dtype == torch.int32 and counts.shape == (groups, U.BINS)
    expected = torch.bincount(rows, minlength=groups * U.BINS).view(groups, U.BINS)
    assert torch.equal(counts.long(), expected)

    table = torch.randn(groups, U.BINS, generator=gen)
    soft = U.gather_table(table, w, groups, chunk=chunk)
    assert soft.dtype == dtype and soft.shape == w.shape
    assert torch.equal(soft.reshape(-1), table.reshape(-1).to(dtype)[rows])

    g = torch.randn(shape, generator=gen).to(dtype)
    bins = U.scatter_bins(g, w, groups, chunk=chunk)
    expected_bins = torch.zeros(groups * U.BINS, dtype=torch.float64)
    expected_bins.index_add_(0, rows, g.reshape(-1).double())
    torch.testing.assert_close(bins.reshape(-1).double(), expected_bins, rtol=1e-6, atol=1e-5)

    slope, shared = torch.randn(2, groups, U.BINS, generator=gen)
    grad = U.weight_grad(g, w, slope, shared, groups, chunk=chunk)
    expected_grad = torch.addcmul(
        shared.reshape(-1)[rows], g.reshape(-1).float(), slope.reshape(-1)[rows]
    )
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.reshape(-1), expected_grad.to(dtype), rtol=0, atol=0)


def test_non_contiguous_and_expanded_upstream_gradient():
    w = torch.randn(6, 8).bfloat16()
    g_expanded = torch.ones(()).expand(6, 8)
    g_transposed = torch.randn(8, 6).t()
    for g in (g_expanded, g_transposed):
        bins = U.scatter_bins(g, w, 2, chunk=5)
        expected = torch.zeros(2 * U.BINS).index_add_(0, ref_rows(w, 2), g.reshape(-1))
        torch.testing.assert_close(bins.reshape(-1), expected)


def test_block_rows_rounds_fp32_to_bf16_and_masks_sign():
    w = torch.tensor([[1.0, -2.0, 1.00390625 + 1e-4, -0.0]])  # third rounds up to 1.0078125
    rows = U.block_rows(w, 0)
    assert rows.dtype == torch.int32
    assert rows.tolist() == [[0x3F80, 0xC000, 0x3F81, 0x8000]]
    assert U.block_rows(w, 2).tolist() == [[r + 2 * U.BINS for r in rows[0].tolist()]]


def test_histogram_counts_beyond_fp32_integer_range():
    n = (1 << 24) + 3  # fp32 accumulation would stop at 2^24
    counts = U.histogram(torch.zeros(n, dtype=torch.bfloat16), 1)
    assert int(counts[0, 0]) == n and int(counts.sum()) == n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pattern_values_and_nonfinite_patterns(dtype):
    values = U.pattern_values(dtype)
    some = torch.tensor([0.5, -3.0, 65504.0 if dtype == torch.float16 else 1e30]).to(dtype)
    assert torch.equal(values[patterns(some)], some.float())
    bad = U.nonfinite_patterns(dtype)
    assert torch.equal(bad, ~torch.isfinite(values))
    assert bool(bad[patterns(torch.tensor([float("inf"), float("nan")]).to(dtype))].all())


def _counts(values: list[list[float]], dtype=torch.bfloat16) -> torch.Tensor:
    counts = torch.zeros(len(values), U.BINS, dtype=torch.int32)
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
    assert full.shape == (2, U.BINS)
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
