"""Sharded uniquified DKM on gloo process groups of 1, 2 and 3 CPU ranks.

Each multi-rank test starts its ranks as fresh processes (``tests.shard.launcher``), bounded by a
deadline after which every child is killed; the in-process tests cover world size 1 and the
pieces that need no process group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edkm.dkm.unique import unique_dkm
from edkm.kernels.unique import bit_histogram
from edkm.shard.comm import Comm, shard_rows
from edkm.shard.engine import local_counts, segments, sharded_linear, sharded_unique_dkm
from edkm.shard.launch import launched
from tests.shard.launcher import expect_ok, run_ranks
from tests.shard.worker import ENGINE_CASES

# ---- in process: world size 1 and the row arithmetic ------------------------------------------


def test_shard_rows_follow_torch_chunk() -> None:
    for rows, world in [(11008, 3), (10, 4), (4, 3), (7, 8), (0, 2)]:
        chunks = torch.arange(rows).chunk(world) if rows else ()
        got = [shard_rows(rows, world, r) for r in range(world)]
        want = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
        assert [g for g in got if g[1] > g[0]] == want
        assert got[0][0] == 0 and got[-1][1] == rows


def test_segments_cover_rows_in_group_order() -> None:
    for start, stop, size in [(0, 110, 10), (37, 74, 10), (3, 4, 5), (5, 20, 5), (7, 7, 3)]:
        segs = segments(start, stop, size)
        covered = [start + r for a, b, _, _ in segs for r in range(a, b)]
        assert covered == list(range(start, stop))
        for a, b, g0, n in segs:
            rows = range(start + a, start + b)
            assert {r // size for r in rows} == set(range(g0, g0 + n))
            assert n == 1 or (b - a) == n * size


@pytest.mark.parametrize("name, rows, cols, dtype, group_size, compact", ENGINE_CASES)
def test_world_size_one_is_the_single_process_engine(
    one_thread, name, rows, cols, dtype, group_size, compact
) -> None:
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
    groups = 1 if group_size is None else rows // group_size
    c = torch.linspace(-0.04, 0.04, 4).repeat(groups, 1)
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    a, b = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    soft_a, c_a = unique_dkm(a, c, tau=1e-4, iters=3, groups=groups, compact=compact)
    soft_b, c_b = sharded_unique_dkm(
        b, c, tau=1e-4, iters=3, rows=rows, comm=Comm.single(), group_size=group_size,
        compact=compact,
    )  # fmt: skip
    soft_a.backward(g)
    soft_b.backward(g)
    assert torch.equal(soft_a, soft_b) and torch.equal(c_a, c_b)
    assert torch.equal(a.grad, b.grad)
    counts = local_counts(w, groups, segments(0, rows, group_size or rows))
    assert torch.equal(counts, bit_histogram(w, groups))


def test_sharded_linear_world_one_is_f_linear(one_thread) -> None:
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, bias))
    y = torch.nn.functional.linear(x, w, bias)
    y2 = sharded_linear(x2, w2, b2, total=5, comm=Comm.single())
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(y, y2)
    for t, t2 in ((x, x2), (w, w2), (bias, b2)):
        assert torch.allclose(t.grad, t2.grad, rtol=1e-6, atol=1e-6)


def test_sharded_engine_rejects_a_wrong_shard() -> None:
    with pytest.raises(ValueError, match="expected a"):
        sharded_unique_dkm(
            torch.zeros(3, 2), torch.zeros(1, 2), tau=1.0, iters=1, rows=4, comm=Comm.single()
        )


def test_launch_detection() -> None:
    assert launched({}) is None
    info = launched({"WORLD_SIZE": "3", "RANK": "2"})
    assert info is not None and (info.world, info.rank, info.local_rank) == (3, 2, 2)
    from edkm.errors import InputError

    with pytest.raises(InputError):
        launched({"WORLD_SIZE": "2", "RANK": "2"})


# ---- spawned gloo groups -------------------------------------------------------------------------


@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_engine_matches_single_process_bitwise(tmp_path: Path, world: int) -> None:
    """Histogram, soft weight and centroids bitwise; weight gradients within one bf16 step."""
    results = expect_ok(run_ranks(world, "engine", tmp_path))
    covered: dict[str, list[list[int]]] = {}
    for res in results:
        for name, case in res.items():
            covered.setdefault(name, []).append(case["rows"])
            assert case["histogram_equal"], (name, case)
            assert case["soft_equal"], (name, case)
            assert case["centroids_equal"], (name, case)
            assert case["grad_bf16_steps"] <= 1.0, (name, case)
            assert case["grad_close"], (name, case)
    # 16-bit weights: the fp32 bin sums' order does not survive the 16-bit gradient's rounding
    for res in results:
        for name in ("per_tensor_11008", "groups_straddle", "fp16_weights"):
            assert res[name]["grad_equal"], (name, res[name])
    rows = {name: r for name, r, *_ in ENGINE_CASES}
    for name, spans in covered.items():  # the ranks' rows tile the weight
        assert sorted(spans)[0][0] == 0 and sorted(spans)[-1][1] == rows[name]


@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_fsdp2_training_step_and_sharded_checkpoint(tmp_path: Path, world: int) -> None:
    """FSDP2 + sharded DKM on the local batches = one process on the global batch; a DCP
    checkpoint resumes exactly; a NaN in one rank's shard raises on every rank."""
    results = expect_ok(run_ranks(world, "train", tmp_path, timeout=150))
    for res in results:
        assert res["grad_names_equal"]
        for name, err in res["grad_rel_err"].items():
            assert err < 1e-5, (name, err)
        assert res["centroids_equal_step1"]
        for got, want in zip(res["losses"], res["ref_losses"]):
            assert abs(got - want) < 1e-5 * abs(want)
        assert res["resumed_losses"] == res["losses"][1:]
        assert res["resume_params_equal"]
        assert res["extra"] == {"step": 1}
        assert res["nan_error"] and "non-finite" in res["nan_error"]
        assert "model.layers.1.mlp.up_proj" in res["nan_error"]
    assert len({tuple(r["losses"]) for r in results}) == 1  # every rank reports the same loss


def test_a_rank_that_dies_fails_the_others(tmp_path: Path) -> None:
    results = run_ranks(2, "die", tmp_path, timeout=120, dist_timeout=20, grace=60)
    dead, alive = results[1], results[0]
    assert dead.returncode == 3
    assert alive.returncode is not None, "the surviving rank hung until the deadline"
    assert alive.result is not None and alive.result["error"], alive.log[-2000:]
