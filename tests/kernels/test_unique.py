"""edkm.kernels.unique: the four per-weight ops of the uniquified DKM.

The torch implementation is held to plain indexing; the Triton kernels are held to the torch
implementation (histograms and gathers bit-exact, sums by the error rule against fp64); the
custom ops pass ``torch.library.opcheck`` (schema, fake shapes, tracing)."""

from __future__ import annotations

import pytest
import torch

import edkm.kernels.unique as U
from edkm.kernels import bit_histogram, gather_table, scatter_bins, unique_grad
from edkm.kernels._common import BINS
from tests.kernels.conftest import structured_weights

# one intra-op thread (tests/conftest.py): small tensors on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def patterns(w: torch.Tensor) -> torch.Tensor:
    """Plain reference: the unsigned 16-bit pattern of each weight (bf16 unless fp16), int64."""
    w16 = w if w.dtype == torch.float16 else w.to(torch.bfloat16)
    return w16.view(torch.int16).to(torch.int64) & 0xFFFF


def ref_rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Plain reference: the flat table row ``g * 65536 + pattern`` of every weight."""
    pat = patterns(w).reshape(groups, -1)
    return (pat + torch.arange(groups, device=w.device).unsqueeze(1) * BINS).reshape(-1)


# ---- the torch implementation against plain indexing --------------------------------------------

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
    kw = {"backend": "torch", "chunk": chunk}

    counts = bit_histogram(w, groups, **kw)
    assert counts.dtype == torch.int32 and counts.shape == (groups, BINS)
    expected = torch.bincount(rows, minlength=groups * BINS).view(groups, BINS)
    assert torch.equal(counts.long(), expected)

    table = torch.randn(groups, BINS, generator=gen)
    soft = gather_table(table.to(dtype), w, groups, **kw)
    assert soft.dtype == dtype and soft.shape == w.shape
    assert torch.equal(soft.reshape(-1), table.reshape(-1).to(dtype)[rows])

    g = torch.randn(shape, generator=gen).to(dtype)
    bins = scatter_bins(g, w, groups, **kw)
    expected_bins = torch.zeros(groups * BINS, dtype=torch.float64)
    expected_bins.index_add_(0, rows, g.reshape(-1).double())
    torch.testing.assert_close(bins.reshape(-1).double(), expected_bins, rtol=1e-6, atol=1e-5)

    slope, shared = torch.randn(2, groups, BINS, generator=gen)
    grad = unique_grad(g, w, torch.stack([slope, shared], dim=-1), groups, **kw)
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
        bins = scatter_bins(g, w, 2, backend="torch", chunk=5)
        expected = torch.zeros(2 * BINS).index_add_(0, ref_rows(w, 2), g.reshape(-1))
        torch.testing.assert_close(bins.reshape(-1), expected)


def test_block_rows_rounds_fp32_to_bf16_and_masks_sign():
    w = torch.tensor([[1.0, -2.0, 1.00390625 + 1e-4, -0.0]])  # third rounds up to 1.0078125
    rows = U.block_rows(w, 0)
    assert rows.dtype == torch.int32
    assert rows.tolist() == [[0x3F80, 0xC000, 0x3F81, 0x8000]]
    assert U.block_rows(w, 2).tolist() == [[r + 2 * BINS for r in rows[0].tolist()]]


def test_histogram_counts_beyond_fp32_integer_range():
    n = (1 << 24) + 3  # fp32 accumulation would stop at 2^24
    counts = bit_histogram(torch.zeros(n, dtype=torch.bfloat16), backend="torch")
    assert int(counts[0, 0]) == n and int(counts.sum()) == n


# ---- the Triton kernels against the torch implementation -----------------------------------------


BIN_CASES = [
    ("ties", (37, 53), None, torch.bfloat16),
    ("few", (64, 64), 16, torch.float16),
    ("wide", (129, 31), None, torch.float16),
    ("ties", (129, 31), 43, torch.bfloat16),
    ("few", (40, 7), None, torch.bfloat16),
    ("wide", (37, 53), None, torch.float32),  # fp32: rounded to bf16 patterns in the kernels
    ("ties", (64, 64), 16, torch.float32),
]


def _bin_id(case: tuple) -> str:
    kind, shape, gs, dtype = case
    return f"{kind}-{shape[0]}x{shape[1]}-g{gs}-{str(dtype).split('.')[-1]}"


def _groups(shape: tuple[int, int], gs: int | None) -> int:
    return 1 if gs is None else shape[0] // gs


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_histogram_bit_exact(triton_backend, device, case):
    kind, shape, gs, dtype = case
    w = structured_weights(kind, shape, dtype, seed=0).to(device)
    groups = _groups(shape, gs)
    ref = bit_histogram(w, groups, backend="torch")
    counted = torch.bincount(ref_rows(w, groups), minlength=groups * BINS).view(groups, BINS)
    assert torch.equal(ref, counted.to(torch.int32))  # the reference itself, independently
    out = bit_histogram(w, groups, backend=triton_backend)
    assert out.dtype == torch.int32 and out.shape == (groups, BINS)
    assert torch.equal(out, ref)


def test_fp32_rounding_in_the_kernels_is_pytorch_rounding(triton_backend, device):
    # ties to even, the largest finite values (round to inf), subnormals, signed zeros, inf
    bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000000],
        dtype=torch.int64,
    )
    specials = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    specials = specials.view(torch.float32)
    w = torch.cat([specials, torch.tensor([float("inf"), -float("inf"), 1.5, -2.75])])
    w = w.view(1, -1).to(device)
    ref = bit_histogram(w, backend="torch")
    assert torch.equal(bit_histogram(w, backend=triton_backend), ref)
    table = torch.arange(BINS, dtype=torch.int32).view(1, -1).to(device)
    assert torch.equal(gather_table(table, w, backend=triton_backend).long(), patterns(w))


METHODS = ("sorted", "atomic", "window")  # unique_triton.METHODS, without importing triton here


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_histogram_methods_bit_exact(triton_backend, device, case, method):
    from edkm.kernels import unique_triton

    assert unique_triton.METHODS == METHODS
    kind, shape, gs, dtype = case
    w = structured_weights(kind, shape, dtype, seed=7).to(device)
    groups = _groups(shape, gs)
    counted = torch.bincount(ref_rows(w, groups), minlength=groups * BINS).view(groups, BINS)
    out = unique_triton.histogram(w, groups, method)
    assert out.dtype == torch.int32 and out.shape == (groups, BINS)
    assert torch.equal(out, counted.to(torch.int32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_scatter_methods_match_fp64_sums(triton_backend, device, error_rule, case, method):
    from edkm.kernels import unique_triton

    kind, shape, gs, dtype = case
    w = structured_weights(kind, shape, dtype, seed=8).to(device)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype).to(device)
    groups = _groups(shape, gs)
    truth = torch.zeros(groups * BINS, dtype=torch.float64, device=device)
    truth.index_add_(0, ref_rows(w, groups), g.reshape(-1).double())
    out = unique_triton.scatter(g, w, groups, method)
    assert out.dtype == torch.float32 and out.shape == (groups, BINS)
    same = scatter_bins(g, w, groups, backend="torch")
    error_rule(f"scatter {method}", out.view(-1), truth, same.view(-1), 1e-7)


# Shapes large enough for the shared-memory window kernels (LUT groups >= MIN_GROUP weights):
# irregular and round, group boundaries inside a block's range, weights outside the window
# ("wide": |w| >= 2), fp32 weights rounded in the kernel, 16-bit and fp32 gradients.
WINDOW_CASES = [
    ("ties", (1823, 781), None, torch.bfloat16, torch.float32),
    ("wide", (1823, 781), None, torch.float16, torch.float16),
    ("few", (512, 1024), 64, torch.bfloat16, torch.bfloat16),
    ("wide", (300, 1000), 100, torch.float32, torch.float32),
    ("ties", (256, 4096), 16, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the window kernels run on CUDA only")
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"{c[0]}-{c[1]}-g{c[2]}-{c[3]}")
def test_window_kernels_on_cuda(error_rule, case):
    from edkm.kernels import unique_cuda

    kind, shape, gs, dtype, gdtype = case
    assert unique_cuda.available("cuda"), "NVRTC or the shared-memory opt-in is missing"
    w = structured_weights(kind, shape, dtype, seed=10).cuda()
    groups = _groups(shape, gs)
    assert w.numel() // groups >= unique_cuda.MIN_GROUP
    rows = ref_rows(w, groups)
    counted = torch.bincount(rows, minlength=groups * BINS).view(groups, BINS)
    assert torch.equal(unique_cuda.histogram(w, groups), counted.to(torch.int32))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(gdtype).cuda()
    truth = torch.zeros(groups * BINS, dtype=torch.float64, device="cuda")
    truth.index_add_(0, rows, g.reshape(-1).double())
    same = scatter_bins(g, w, groups, backend="torch")
    error_rule(
        "window scatter", unique_cuda.scatter(g, w, groups).view(-1), truth, same.view(-1), 1e-7
    )


def test_unknown_method_is_rejected(triton_backend, device):
    from edkm.kernels import unique_triton

    w = torch.zeros(4, 4, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="histogram method"):
        unique_triton.histogram(w, 1, "bucket")
    with pytest.raises(ValueError, match="scatter method"):
        unique_triton.scatter(w, w, 1, "bucket")


def test_window_falls_back_off_cuda():
    from edkm.kernels import unique_cuda

    assert not unique_cuda.available("cpu")


def test_window_source_compiles():
    from edkm.kernels import unique_cuda

    try:
        unique_cuda._nvrtc()
    except OSError:
        pytest.skip("NVRTC is not installed")
    cubin = unique_cuda.compile_cubin("90")
    assert cubin[:4] == b"\x7fELF"  # a device ELF image


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
@pytest.mark.parametrize("table_dtype", ["weight", "float32"])
def test_gather_bit_exact(triton_backend, device, case, table_dtype):
    kind, shape, gs, dtype = case
    w = structured_weights(kind, shape, dtype, seed=1).to(device)
    groups = _groups(shape, gs)
    gen = torch.Generator().manual_seed(2)
    tdt = dtype if table_dtype == "weight" else torch.float32
    table = torch.randn(groups, BINS, generator=gen).to(tdt).to(device)
    out = gather_table(table, w, groups, backend=triton_backend)
    ref = gather_table(table, w, groups, backend="torch")
    assert out.dtype == tdt and out.shape == w.shape
    raw = torch.int16 if tdt != torch.float32 else torch.int32
    assert torch.equal(out.view(raw), ref.view(raw))
    # the reference is the lookup by row: spot-check it against a python loop
    flat_w = patterns(w).reshape(groups, -1)
    for g, i in ((0, 0), (groups - 1, flat_w.shape[1] - 1)):
        assert ref.reshape(groups, -1)[g, i].item() == table[g, flat_w[g, i]].item()


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_scatter_add_matches_fp64_sums(triton_backend, device, error_rule, case):
    kind, shape, gs, dtype = case
    w = structured_weights(kind, shape, dtype, seed=3).to(device)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    groups = _groups(shape, gs)
    truth = torch.zeros(groups * BINS, dtype=torch.float64, device=device)
    truth.index_add_(0, ref_rows(w, groups), g.reshape(-1).double())
    out = scatter_bins(g, w, groups, backend=triton_backend)
    assert out.dtype == torch.float32 and out.shape == (groups, BINS)
    same = scatter_bins(g, w, groups, backend="torch")
    error_rule("scatter", out.view(-1), truth, same.view(-1), 1e-7)
    assert torch.equal(out != 0, truth.view(groups, BINS) != 0)  # no bin lost or invented


@pytest.mark.parametrize("case", BIN_CASES, ids=_bin_id)
def test_fused_backward_matches_reference(triton_backend, device, error_rule, case):
    kind, shape, gs, dtype = case
    w = structured_weights(kind, shape, dtype, seed=5).to(device)
    groups = _groups(shape, gs)
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    slope_path = torch.randn(groups, BINS, 2, generator=gen).to(device)
    keys = ref_rows(w, groups)
    table = slope_path.reshape(-1, 2).double()
    truth = (g.reshape(-1).double() * table[keys, 0] + table[keys, 1]).view(shape)
    out = unique_grad(g, w, slope_path, groups, backend=triton_backend)
    assert out.dtype == dtype
    same = unique_grad(g, w, slope_path, groups, backend="torch")
    error_rule("grad", out, truth, same, 1e-7)


# ---- the custom ops -----------------------------------------------------------------------------


def _op_samples(backend: str, device: str = "cpu") -> list[tuple[object, tuple]]:
    gen = torch.Generator().manual_seed(9)
    w = (torch.randn(6, 10, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    g = torch.randn(6, 10, generator=gen).to(device)
    table = torch.randn(2, BINS, generator=gen).to(torch.bfloat16).to(device)
    dh = torch.randn(2, BINS, 2, generator=gen).to(device)
    ops = torch.ops.edkm
    return [
        (ops.bit_histogram, (w, 2, backend, 7)),
        (ops.gather_table, (table, w, 2, backend, 7)),
        (ops.scatter_bins, (g, w, 2, backend, 7)),
        (ops.unique_grad, (g, w, dh, 2, backend, 7)),
    ]


def test_custom_ops_pass_opcheck():
    for op, args in _op_samples("torch"):
        torch.library.opcheck(op, args)


def test_custom_ops_pass_opcheck_with_triton(triton_backend, device):
    # the fake (meta) shapes and schema must hold for the Triton implementation too
    for op, args in _op_samples(triton_backend, device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_under_fake_tensor_mode_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(4096, 1024, dtype=torch.bfloat16)
        g = torch.empty(4096, 1024)
        assert bit_histogram(w, 4).shape == (4, BINS)
        assert bit_histogram(w, 4).dtype == torch.int32
        soft = gather_table(torch.empty(4, BINS, dtype=torch.float16), w, 4)
        assert soft.shape == w.shape and soft.dtype == torch.float16
        assert scatter_bins(g, w, 4).dtype == torch.float32
        dw = unique_grad(g, w, torch.empty(4, BINS, 2), 4)
        assert dw.shape == w.shape and dw.dtype == torch.bfloat16


def test_rejects_bad_arguments(monkeypatch):
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="floating point"):
        bit_histogram(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        gather_table(torch.zeros(2, BINS), w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="do not divide"):
        bit_histogram(w, 3)
    with pytest.raises(ValueError, match="chunk"):
        bit_histogram(w, chunk=0)
    with pytest.raises(ValueError, match="backend"):
        bit_histogram(w, backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        bit_histogram(w.double(), backend="triton")
