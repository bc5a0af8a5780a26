"""edkm.dkm.centroids: seeded initialisation (k-means++ / quantiles + Lloyd) and hard assignment."""

from __future__ import annotations

import pytest
import torch

import edkm.dkm.centroids as C
from edkm.dkm.centroids import hard_assign, init_centroids

# one intra-op thread (tests/conftest.py): small tensors on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_assign(w: torch.Tensor, c: torch.Tensor, group_size: int | None) -> torch.Tensor:
    groups = 1 if group_size is None else w.shape[0] // group_size
    flat = w.float().reshape(groups, -1)
    dist = (flat.unsqueeze(-1) - c.float().unsqueeze(1)).abs()
    return dist.argmin(-1).reshape(w.shape)  # argmin: first (lowest) index among ties


@pytest.mark.parametrize("method", ["kmeans++", "quantile"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_init_shape_sorted_distinct_deterministic(method, bits):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=gen)
    c = init_centroids(w, bits, method=method, seed=3)
    assert c.shape == (1, 1 << bits) and c.dtype == torch.float32
    assert bool((c[:, 1:] > c[:, :-1]).all())
    assert torch.equal(c, init_centroids(w, bits, method=method, seed=3))
    assert float(c.min()) >= float(w.min()) - 1e-6 and float(c.max()) <= float(w.max()) + 1e-6


def test_kmeanspp_seed_matters_and_lloyd_reaches_clusters():
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([-5.0, 0.0, 5.0, 10.0])
    w = centers[torch.randint(0, 4, (4000,), generator=gen)] + 0.01 * torch.randn(
        4000, generator=gen
    )
    for seed in range(3):
        c = init_centroids(w, 2, seed=seed)
        torch.testing.assert_close(c[0], centers, atol=0.01, rtol=0)
    wide = torch.randn(5000, generator=gen)
    seeds = {tuple(init_centroids(wide, 4, seed=s, lloyd_iters=0)[0].tolist()) for s in range(3)}
    assert len(seeds) > 1


def test_grouped_init_follows_each_group():
    w = torch.cat([torch.randn(4, 32) * 0.01, torch.randn(4, 32) * 0.01 + 100.0])
    c = init_centroids(w, 2, group_size=4)
    assert c.shape == (2, 4)
    assert float(c[0].abs().max()) < 1.0 and float((c[1] - 100).abs().max()) < 1.0


@pytest.mark.parametrize("values", [[0.5], [1.0, 2.0], [0.0, 0.0, 3.0]])
def test_distinct_centroids_for_few_distinct_values(values):
    w = torch.tensor(values).repeat(50)
    for method in ("kmeans++", "quantile"):
        c = init_centroids(w, 3, method=method)
        assert torch.unique(c).numel() == 8, (method, c)
        # every present value is a centroid: its cluster is exact
        for v in set(values):
            assert bool((c == v).any()), (method, v, c)


def test_big_tensor_uses_subsample_and_stays_deterministic():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(300_000, generator=gen)
    c1 = init_centroids(w, 3, sample=4096, seed=5)
    c2 = init_centroids(w, 3, sample=4096, seed=5)
    assert torch.equal(c1, c2)
    # Lloyd on the whole tensor: centroids are the means of their cells (a fixed point)
    idx = hard_assign(w, c1).long()
    means = torch.zeros(8).index_add_(0, idx, w) / torch.bincount(idx, minlength=8)
    torch.testing.assert_close(c1[0], means, atol=2e-2, rtol=0)


@pytest.mark.parametrize("chunk", [1 << 20, 7, 33, 100])  # blocks: in a group, across groups
@pytest.mark.parametrize("group_size", [None, 5, 1, 20])
def test_hard_assign_matches_brute_force_with_ties(group_size, chunk, monkeypatch):
    import edkm.dkm.centroids as C

    monkeypatch.setattr(C, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(20, 33, generator=gen)
    groups = 1 if group_size is None else 20 // group_size
    c = torch.randn(groups, 8, generator=gen)
    # exact ties: weights on midpoints, on centroids, and duplicated centroids
    c[:, 5] = c[:, 2]
    w.view(-1)[:8] = torch.tensor([0.0, 0.5, 1.0, -1.0, 0.25, 2.0, -0.75, 0.125])
    c[0, :4] = torch.tensor([0.0, 1.0, -1.0, 0.5])
    idx = hard_assign(w, c, group_size)
    assert idx.dtype == torch.uint8 and idx.shape == w.shape
    assert torch.equal(idx.long(), brute_force_assign(w, c, group_size))


def test_hard_assign_chunks_agree(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(1000, generator=gen)
    c = torch.randn(1, 16, generator=gen)
    whole = hard_assign(w, c)
    monkeypatch.setattr(C, "CHUNK", 7)
    assert torch.equal(hard_assign(w, c), whole)


def test_errors():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="bits"):
        init_centroids(w, 0)
    with pytest.raises(ValueError, match="bits"):
        init_centroids(w, 9)
    with pytest.raises(ValueError, match="init"):
        init_centroids(w, 2, method="random")
    with pytest.raises(ValueError, match="does not divide"):
        init_centroids(w, 2, group_size=3)
    with pytest.raises(ValueError, match="non-finite"):
        init_centroids(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="centroids must be"):
        hard_assign(w, torch.zeros(2, 4))
