"""dkm_soft: the uniquified DKM held to the reference DKM (outputs and every gradient), the
method dispatch, and the input checks.

Error rule (as for every fast path): the error of ``unique`` against an fp64 reference is at most
twice the fp32 reference's own error plus a small multiple of the tensor's scale.

Conditioning. A centroid update ``c = s1 / s0`` of a nearly empty cluster (tiny mass ``s0``,
e.g. few distinct values and many centroids, or centroids far outside the data) is
ill-conditioned: its derivative is ``-c / s0``, and when every weight sits on one value the
true centroid gradient is 0 while each method computes it as a cancellation of terms of size
``eps * |c| / s0`` — rounding garbage that differs between methods and dtypes (relative errors
of 1e25 for the fp32 reference against the fp64 oracle have been seen). Measured against the
fp64 oracle with the fp32 reference's own error as the yardstick, such draws stay well posed:
the bound grows with the problem's conditioning, not with any difference between methods.
Clusters below ``edkm.kernels._common.MIN_MASS`` count as empty in every dtype, so fp32 and fp64 agree
on which clusters move (they did not when only an exact 0 counted: fp32 froze clusters whose
fp64 mass was 1e-60, a 50% centroid difference that was neither method's fault).
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from edkm.dkm.soft import choose_method, dkm_reference, dkm_soft
from edkm.dkm.unique import unique_dkm

NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tensors are small, and on a loaded machine torch's thread
    pool makes small ops 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """fp32 values that bf16 represents exactly (unique then sees the same numbers)."""
    return t.bfloat16().float()


def make_case(
    shape: tuple[int, ...],
    bits: int,
    *,
    groups: int = 1,
    seed: int = 0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = bf16_exact(torch.randn(shape, generator=gen) * scale)
    k = 1 << bits
    q = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    flat = w.reshape(groups, -1)
    c = torch.quantile(flat, q, dim=1).T.contiguous()
    c = c + 1e-3 * scale * torch.arange(k)  # distinct even for few distinct values
    return w, c


def run(fn, w, c, *, upstream_seed: int = 1, **kw):
    """Forward, then backward of a fixed random upstream gradient into soft and c_T."""
    w = w.detach().clone().requires_grad_(True)
    c = c.detach().clone().requires_grad_(True)
    soft, c_t = fn(w, c, **kw)
    gen = torch.Generator().manual_seed(upstream_seed)
    g = torch.randn(soft.shape, generator=gen).to(soft.dtype)
    gc = torch.randn(c_t.shape, generator=gen)
    (soft.float() * g.float()).sum().add((c_t * gc).sum()).backward()
    return soft.detach(), c_t.detach(), w.grad, c.grad


def oracle(w, c, *, tau, iters, group_size=None):
    """fp64 reference DKM (same formulas, double arithmetic)."""
    groups = 1 if group_size is None else w.shape[0] // group_size
    tau_t = torch.as_tensor(tau, dtype=torch.float64).expand(groups)

    def fn(w_, c_, **_):
        return dkm_reference(w_, c_, tau_t, iters, groups, compute_dtype=torch.float64)

    return run(fn, w.double(), c.double())


def assert_error_rule(out, ref32, ref64, *, rel: float = 1e-5, factor: float = 2.0) -> None:
    for name, a, r, o in zip(NAMES, out, ref32, ref64):
        o = o.double()
        scale = float(o.abs().max()) or 1.0
        err = float((a.double() - o).abs().max())
        ref_err = float((r.double() - o).abs().max())
        assert torch.isfinite(a).all(), name
        assert err <= factor * ref_err + rel * scale, (name, err, ref_err, scale)


def check_unique_vs_reference(
    w, c, *, tau, iters, group_size=None, weight=None, factor=2.0, **unique_kw
):
    """``unique`` on ``weight`` (default ``w``) against the references on ``w``."""
    kw = {"tau": tau, "iters": iters, "group_size": group_size}
    ref32 = run(dkm_soft, w, c, method="reference", **kw)
    ref64 = oracle(w, c, **kw)
    w = w if weight is None else weight
    if unique_kw:
        groups = 1 if group_size is None else w.shape[0] // group_size
        tau_t = torch.as_tensor(tau, dtype=torch.float32).expand(groups)
        out = run(unique_dkm, w, c, tau=tau_t, iters=iters, groups=groups, **unique_kw)
    else:
        out = run(dkm_soft, w, c, method="unique", **kw)
    assert_error_rule(out, ref32, ref64, factor=factor)
    return out, ref32


@pytest.mark.parametrize("bits", range(1, 9))
def test_unique_matches_reference_all_bits(bits):
    w, c = make_case((37, 29), bits, seed=bits)
    check_unique_vs_reference(w, c, tau=0.05, iters=3)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize(
    ("shape", "bits", "iters", "group_size"),
    [
        ((10,), 2, 3, None),  # tiny, 1-D
        ((1823, 78), 3, 2, None),  # irregular
        ((48, 40), 4, 3, 16),  # 3 grouped LUTs
        ((64, 33), 6, 1, 32),  # many centroids, groups
    ],
)
def test_unique_matches_reference_both_tables(shape, bits, iters, group_size, compact):
    groups = 1 if group_size is None else shape[0] // group_size
    w, c = make_case(shape, bits, groups=groups, seed=3)
    check_unique_vs_reference(w, c, tau=0.1, iters=iters, group_size=group_size, compact=compact)


def test_unique_matches_reference_irregular_large():
    w, c = make_case((1823, 391), 3, seed=15, scale=0.02)  # 713k weights, odd sizes
    check_unique_vs_reference(w, c, tau=2e-5, iters=1)


def test_unique_matches_reference_million_weights():
    w, c = make_case((1000, 1000), 1, seed=4, scale=0.02)
    check_unique_vs_reference(w, c, tau=1e-4, iters=1)


def test_many_groups_compact():
    w, c = make_case((96, 40), 8, groups=12, seed=13)
    check_unique_vs_reference(w, c, tau=0.1, iters=2, group_size=8)


def test_per_group_tau_tensor():
    w, c = make_case((24, 16), 2, groups=3, seed=5)
    tau = torch.tensor([0.05, 0.2, 1.0])
    out, _ = check_unique_vs_reference(w, c, tau=tau, iters=2, group_size=8)
    # a group's result depends on its own tau only
    single = run(dkm_soft, w[8:16], c[1:2], tau=0.2, iters=2, method="unique")
    torch.testing.assert_close(out[0][8:16], single[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], single[1][0], rtol=0, atol=0)


def test_few_distinct_values_zeros_and_ties():
    gen = torch.Generator().manual_seed(6)
    # three values (zeros, +/-0.0 included), centroids placed so 0.5 sits exactly between two
    values = torch.tensor([0.0, -0.0, 0.5, 1.0])
    w = values[torch.randint(0, 4, (50, 20), generator=gen)]
    c = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    check_unique_vs_reference(w, c, tau=0.3, iters=3)


def test_constant_weight_many_centroids():
    w = torch.full((16, 16), 0.25)
    c = torch.linspace(-1, 1, 16).view(1, -1)
    check_unique_vs_reference(w, c, tau=0.5, iters=3)


@pytest.mark.parametrize("method", ["reference", "unique"])
def test_subnormal_cluster_mass_counts_as_empty(method, monkeypatch):
    # 320 weights at 0.5; the far centroid's attention exp(-98) * 320 ~ 1e-40 is subnormal,
    # not 0. Its update s1/s0 has derivative -c/s0 ~ 1e40: fp32 backward gave inf/NaN (NaN even
    # for a zero upstream gradient) when only an exact 0 counted as empty.
    w = torch.full((20, 16), 0.5)
    c = torch.tensor([[0.5, 0.5 + 0.9899]])
    import edkm.kernels._common as U  # where MIN_MASS is defined, read by every method

    _, c_t, gw, gc = run(dkm_soft, w, c, tau=0.01, iters=2, method=method)
    assert c_t[0].tolist() == [0.5, c[0, 1].item()]  # the far cluster keeps its centroid
    assert torch.isfinite(gw).all() and torch.isfinite(gc).all()
    monkeypatch.setattr(U, "MIN_MASS", 0.0)  # the old rule: the bug this guards against
    _, _, gw, gc = run(dkm_soft, w, c, tau=0.01, iters=2, method=method)
    assert not (torch.isfinite(gw).all() and torch.isfinite(gc).all())


def test_few_values_many_centroids_nearly_empty_clusters():
    # 3 values, 256 centroids spread over and beyond them: most clusters are nearly empty and
    # the centroid gradient is ill-conditioned (module docstring). Held to the error rule
    # against the fp64 oracle, and unique to the fp32 reference relative to each result's norm.
    gen = torch.Generator().manual_seed(14)
    w = torch.tensor([-0.75, 0.0, 1.25])[torch.randint(0, 3, (40, 30), generator=gen)]
    c = torch.linspace(-3.0, 3.0, 256).view(1, -1)
    out, ref32 = check_unique_vs_reference(w, c, tau=0.05, iters=2)
    for name, a, b in zip(NAMES, out, ref32):
        assert torch.isfinite(a).all(), name
        err = float((a - b).norm()) / max(float(b.norm()), 1e-30)
        assert err < 1e-5, (name, err)


def test_empty_cluster_keeps_centroid_in_both_methods():
    # tau tiny: the far centroid's weights exp(-d^2/tau) underflow to exactly 0
    w = bf16_exact(torch.linspace(-1, 1, 64))
    c = torch.tensor([[-0.5, 0.5, 1e4, 2e4]])
    for method in ("reference", "unique"):
        _, c_t, gw, gc = run(dkm_soft, w, c, tau=1e-3, iters=2, method=method)
        assert c_t[0, 2:].tolist() == [1e4, 2e4]
        assert torch.isfinite(gw).all() and torch.isfinite(gc).all()
    out = run(dkm_soft, w, c, tau=1e-3, iters=2, method="unique")
    ref = run(dkm_soft, w, c, tau=1e-3, iters=2, method="reference")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_many_distinct_values_wide_range():
    gen = torch.Generator().manual_seed(7)
    w = bf16_exact(torch.randn(300, 200, generator=gen) * torch.logspace(-4, 1, 200))
    c = torch.quantile(w.flatten()[::7], torch.linspace(0.05, 0.95, 8)).view(1, -1)
    check_unique_vs_reference(w, c, tau=0.02, iters=3)


def test_zero_iterations_and_no_centroid_grad():
    w, c = make_case((20, 12), 3, seed=8)
    check_unique_vs_reference(w, c, tau=0.1, iters=0)
    wr = w.clone().requires_grad_(True)
    soft, _ = dkm_soft(wr, c, tau=0.1, iters=2, method="unique")
    soft.sum().backward()
    ws = w.clone().requires_grad_(True)
    soft_r, _ = dkm_soft(ws, c, tau=0.1, iters=2, method="reference")
    soft_r.sum().backward()
    torch.testing.assert_close(wr.grad, ws.grad, rtol=1e-4, atol=1e-6)


def test_gradient_through_centroids_only():
    w, c = make_case((20, 12), 2, seed=9)
    grads = []
    for method in ("reference", "unique"):
        wr = w.clone().requires_grad_(True)
        cr = c.clone().requires_grad_(True)
        _, c_t = dkm_soft(wr, cr, tau=0.2, iters=3, method=method)
        (c_t * torch.arange(4.0)).sum().backward()
        grads.append((wr.grad, cr.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_inputs(dtype):
    w, c = make_case((40, 24), 3, seed=10)
    w16 = w.to(dtype)
    out = run(dkm_soft, w16, c, tau=0.1, iters=3, method="unique")
    ref = run(dkm_soft, w16, c, tau=0.1, iters=3, method="reference")
    assert out[0].dtype == dtype and out[2].dtype == dtype
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for name, a, b in zip(NAMES, out, ref):
        # 16-bit results may differ by one rounding step of fp32 values that agree closely
        torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=1e-5, msg=name)


def test_fp16_patterns_keep_fp16_precision():
    # fp16 has more mantissa than bf16: distinct fp16 values must stay distinct
    w = torch.tensor([1.0, 1.0 + 2**-10, 1.0 + 2**-9], dtype=torch.float16)
    c = torch.tensor([[0.9, 1.1]])
    out = run(dkm_soft, w, c, tau=1e-3, iters=2, method="unique")
    ref = run(dkm_soft, w, c, tau=1e-3, iters=2, method="reference")
    torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=0)


def test_fp32_weights_round_to_bf16_with_straight_through_gradient():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(30, 10, generator=gen)  # not bf16-representable
    assert not torch.equal(w, bf16_exact(w))
    c = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    out, _ = check_unique_vs_reference(bf16_exact(w), c, tau=0.1, iters=3, weight=w)
    assert out[2].dtype == torch.float32


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 24),
    bits=st.integers(1, 8),
    iters=st.integers(0, 3),
    groups=st.sampled_from([1, 2, 3]),
    distinct=st.sampled_from([1, 3, 50, 10_000]),
    log_tau=st.floats(-3, 1),
    seed=st.integers(0, 2**16),
)
def test_property_unique_matches_reference(
    rows, cols, bits, iters, groups, distinct, log_tau, seed
):
    rows = rows * groups
    gen = torch.Generator().manual_seed(seed)
    pool = bf16_exact(torch.randn(distinct, generator=gen))
    w = pool[torch.randint(0, distinct, (rows, cols), generator=gen)]
    # centroids drawn independently of the data: with few distinct values many clusters are
    # (nearly) empty, the ill-conditioned case of the module docstring; no draw is discarded
    c = torch.sort(torch.randn(groups, 1 << bits, generator=gen) * 2, dim=1)[0]
    # factor 4, not 2: on a handful of weights at small tau the fp32 reference's max error is a
    # noisy yardstick (two fp32 evaluations in different orders; ratios up to 2.3 seen in 400
    # random draws, all at rounding level relative to the terms that cancel)
    check_unique_vs_reference(
        w,
        c,
        tau=10.0**log_tau,
        iters=iters,
        group_size=rows // groups if groups > 1 else None,
        factor=4.0,
    )


def test_auto_is_unique_on_cpu():
    w, c = make_case((16, 8), 2, seed=12)
    a = run(dkm_soft, w, c, tau=0.1, iters=2, method="auto")
    b = run(dkm_soft, w, c, tau=0.1, iters=2, method="unique")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_backend_word_reaches_the_per_weight_ops(monkeypatch):
    # ``backend`` picks the kernels of the per-weight ops; ``method`` the algorithm
    import edkm.kernels.unique as KU

    seen: list[str] = []
    real = KU.bins_for

    def spy(backend: str) -> Any:
        seen.append(backend)
        return real("torch")

    monkeypatch.setattr(KU, "bins_for", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets "triton" resolve on CPU tensors
    w, c = make_case((8, 4), 1, seed=2)
    run(dkm_soft, w, c, tau=0.5, iters=1, method="unique", backend="triton")
    assert seen == ["triton"] * 4  # histogram, gather; scatter-add, fused backward
    seen.clear()
    run(dkm_soft, w, c, tau=0.5, iters=1, method="unique", backend="torch")
    assert seen == ["torch"] * 4


def test_method_triton_is_gone_with_a_pointer():
    with pytest.raises(ValueError, match="method must be one of"):
        dkm_soft(torch.zeros(4, 4), torch.zeros(1, 2), tau=0.5, iters=1, method="triton")


def test_choose_method():
    big = torch.empty(512, 256, dtype=torch.bfloat16)  # 131,072 weights per tensor
    assert choose_method(big, 1, backend="triton") == "unique"
    # 32,768 weights per group < 65,536 table rows
    assert choose_method(big, 4, backend="triton") == "implicit"
    assert choose_method(big.float(), 1, backend="triton") == "implicit"
    assert choose_method(big, 4, "unique", "triton") == "unique"
    assert choose_method(big, 1, "implicit", "triton") == "implicit"
    assert choose_method(big.float(), 1, "unique", "triton") == "unique"  # rounds to bf16
    for weight, groups in ((big, 4), (big.float(), 1)):  # torch kernels: always uniquified
        assert choose_method(weight, groups, backend="torch") == "unique"
    with pytest.raises(ValueError, match="method"):
        choose_method(big, 1, "fast")


def test_fake_tensor_fixed_table_forward_backward():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(4096, 4096, dtype=torch.bfloat16).requires_grad_(True)
        c = torch.empty(1, 8).requires_grad_(True)
        soft, c_t = dkm_soft(w, c, tau=1e-4, iters=3, method="unique")
        (soft.float().sum() + c_t.sum()).backward()
        assert soft.shape == w.shape and soft.dtype == torch.bfloat16
        assert c_t.shape == (1, 8)
        assert w.grad is not None and w.grad.shape == w.shape and w.grad.dtype == torch.bfloat16
        assert c.grad is not None and c.grad.shape == (1, 8)


@pytest.mark.parametrize("method", ["reference", "unique"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"centroids": torch.zeros(1, 3)}, "bits must be in 1..8"),
        ({"centroids": torch.zeros(1, 512)}, "bits must be in 1..8"),
        ({"centroids": torch.zeros(1, 1)}, "bits must be in 1..8"),
        ({"centroids": torch.zeros(2, 4)}, r"shape \(1, K\)"),
        ({"centroids": torch.zeros(4)}, r"shape \(1, K\)"),
        ({"group_size": 3}, "does not divide"),
        ({"group_size": 0}, "does not divide"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": torch.ones(3)}, "tau"),
        ({"iters": -1}, "iters"),
        ({"weight": torch.zeros(2, 2, 2)}, "1-D or 2-D"),
        ({"weight": torch.zeros(4, 4, dtype=torch.int32)}, "float"),
        ({"weight": torch.tensor([[0.0, float("nan")], [1.0, 2.0]])}, "non-finite"),
        ({"weight": torch.tensor([[0.0, float("inf")], [1.0, 2.0]])}, "non-finite"),
        ({"method_override": "fast"}, "method must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_clear_errors(method, kwargs, match):
    args: dict[str, Any] = {
        "weight": torch.zeros(4, 4),
        "centroids": torch.zeros(1, 4),
        "tau": 0.1,
        "iters": 1,
    }
    args.update(kwargs)
    method = args.pop("method_override", method)
    with pytest.raises(ValueError, match=match):
        dkm_soft(args.pop("weight"), args.pop("centroids"), method=method, **args)


def test_weights_beyond_bf16_range_are_non_finite_for_unique():
    w = torch.tensor([1.0, 3.4e38])  # finite in fp32, inf once rounded to bf16
    with pytest.raises(ValueError, match="non-finite"):
        dkm_soft(w, torch.tensor([[0.0, 1.0]]), tau=0.1, iters=1, method="unique")


# ---- both algorithms on the Triton kernels (tests/kernels/conftest.py fixtures) -----------------


def test_rejects_non_finite_and_unsupported_dtypes(device, triton_backend):
    w = torch.randn(8, 8, device=device)
    c = torch.zeros(1, 4, device=device)
    w[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dkm_soft(w, c, tau=1.0, iters=1, method="auto", backend=triton_backend)
    w[3, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        dkm_soft(w.to(torch.bfloat16), c, tau=1.0, iters=1, method="unique", backend=triton_backend)
    with pytest.raises(ValueError, match="float64"):
        dkm_soft(
            torch.zeros(8, 8, dtype=torch.float64, device=device),
            c,
            tau=1.0,
            iters=1,
            method="auto",
            backend=triton_backend,
        )


TRITON_NAMES = ("soft", "centroids", "grad_weight", "grad_centroids")


@pytest.mark.parametrize("method", ["unique", "implicit"])
def test_methods_on_triton_match_reference(
    make_inputs, run_dkm, error_rule, reference_dkm, triton_backend, method
):
    w, c, tau = make_inputs((48, 33), 12, 3, torch.bfloat16, seed=11)
    kw = {"iters": 2, "group_size": 12}
    truth = run_dkm(reference_dkm, w.double(), c.double(), tau=tau.double(), **kw)
    same = run_dkm(reference_dkm, w, c, tau=tau, **kw)
    out = run_dkm(dkm_soft, w, c, tau=tau, **kw, method=method, backend=triton_backend)
    for name, o, t, s in zip(TRITON_NAMES, out, truth, same):
        error_rule(name, o, t, s, 2e-6)


def test_auto_method_on_fp32_weights_with_triton(
    make_inputs, run_dkm, error_rule, reference_dkm, triton_backend
):
    w, c, tau = make_inputs((31, 29), None, 2, torch.float32, seed=12)
    assert choose_method(w, 1, backend="triton") == "implicit"
    truth = run_dkm(reference_dkm, w.double(), c.double(), tau=tau.double(), iters=3)
    same = run_dkm(reference_dkm, w, c, tau=tau, iters=3)
    out = run_dkm(dkm_soft, w, c, tau=float(tau), iters=3, method="auto", backend=triton_backend)
    for name, o, t, s in zip(TRITON_NAMES, out, truth, same):
        error_rule(name, o, t, s, 2e-6)
