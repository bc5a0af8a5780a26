"""Centroid initialisation and hard assignment for LUT groups.

``init_centroids`` gives the first DKM centroids of every LUT group (the whole tensor, or one
group of ``group_size`` consecutive output channels): k-means++ seeding or evenly spaced
quantiles, both refined by Lloyd iterations, seeded and deterministic. Big groups are seeded on
a fixed-size random subsample (``sample`` weights; the subsample is drawn with the seed), then
the Lloyd refinement runs on the whole group in chunks. Centroids are distinct even when a group
has fewer distinct values than centroids (spare centroids are spread between the present values),
and returned sorted.

``hard_assign`` gives each weight the index of its nearest centroid (ties to the lower index),
chunked so that it never materializes N x K at once.

Example:
    >>> import torch
    >>> w = torch.randn(64, 32)
    >>> c = init_centroids(w, 2, seed=0)
    >>> c.shape, bool((c[:, 1:] > c[:, :-1]).all())
    (torch.Size([1, 4]), True)
    >>> hard_assign(w, c).dtype
    torch.uint8
"""

from __future__ import annotations

import torch

CHUNK = 1 << 20  # weights per chunk in hard assignment and Lloyd sums
DEFAULT_SAMPLE = 1 << 16


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return 1 << bits


def group_rows(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(G, N/G) fp32 view of the weight by LUT group (consecutive output channels)."""
    w = weight.detach().float()
    if group_size is None:
        return w.reshape(1, -1)
    if w.dim() < 1 or w.shape[0] % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the {w.shape[0]} output channels"
        )
    return w.reshape(w.shape[0] // group_size, -1)


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest centroid for 1-D ``values`` and sorted 1-D ``centroids``.

    Uses the midpoints between sorted centroids (``searchsorted``), O(N log K) and no N x K
    matrix; a value exactly on a midpoint goes to the lower centroid.
    """
    mids = (centroids[1:] + centroids[:-1]) * 0.5
    return torch.searchsorted(mids, values, right=False)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    first = x[torch.randint(x.numel(), (1,), generator=gen)]
    chosen = [first]
    dist = (x - first).square()
    for _ in range(1, k):
        total = dist.sum()
        if not bool(total > 0):
            break
        pick = torch.multinomial(dist / total, 1, generator=gen)
        chosen.append(x[pick])
        dist = torch.minimum(dist, (x - x[pick]).square())
    return torch.cat(chosen)


def _spread(centroids: torch.Tensor, k: int, lo: float, hi: float) -> torch.Tensor:
    """Make k distinct sorted centroids: fill missing ones evenly between the present ones."""
    c = torch.unique(centroids)
    if c.numel() >= k:
        return c[:k]
    span = max(hi - lo, float(c.abs().max()) if c.numel() else 1.0, 1e-6)
    extra = torch.linspace(lo - 0.5 * span, hi + 0.5 * span, k + 2)[1:-1]
    for value in extra:
        if c.numel() >= k:
            break
        if not bool((c == value).any()):
            c = torch.sort(torch.cat([c, value.view(1)]))[0]
    return c[:k]


def _lloyd(x: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        c = torch.sort(c)[0]
        sums = torch.zeros_like(c)
        counts = torch.zeros_like(c)
        for start in range(0, x.numel(), CHUNK):
            part = x[start : start + CHUNK]
            idx = nearest(part, c)
            sums.index_add_(0, idx, part)
            counts.index_add_(0, idx, torch.ones_like(part))
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return torch.sort(c)[0]


def init_centroids(
    weight: torch.Tensor,
    bits: int,
    *,
    method: str = "kmeans++",
    group_size: int | None = None,
    seed: int = 0,
    lloyd_iters: int = 10,
    sample: int = DEFAULT_SAMPLE,
) -> torch.Tensor:
    """First centroids, (G, K) fp32 sorted per group, on the weight's device.

    Example:
        >>> init_centroids(torch.tensor([0.0, 0.0, 1.0, 1.0]), 1).tolist()
        [[0.0, 1.0]]
    """
    k = _check_bits(bits)
    if method not in ("kmeans++", "quantile"):
        raise ValueError(f"init must be 'kmeans++' or 'quantile', got {method!r}")
    groups = group_rows(weight, group_size)
    if not bool(torch.isfinite(groups).all()):
        raise ValueError("weight has non-finite values (NaN/inf); cannot initialise centroids")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for row in groups.cpu():
        x = row
        if x.numel() > sample:
            x = x[torch.randperm(x.numel(), generator=gen)[:sample]]
        if method == "quantile":
            seeds = torch.quantile(x, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
        else:
            seeds = _kmeanspp(x, k, gen)
        lo, hi = float(row.min()), float(row.max())
        c = _spread(seeds, k, lo, hi)
        c = _spread(_lloyd(row, c, lloyd_iters), k, lo, hi)
        out.append(c)
    return torch.stack(out).to(weight.device)


def hard_assign(
    weight: torch.Tensor, centroids: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """uint8 index of each weight's nearest centroid (ties to the lower index), weight's shape.

    Centroids need not be sorted. Works chunk by chunk: memory O(chunk), never N x K.

    Example:
        >>> hard_assign(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([[1.0, 0.0]])).tolist()
        [1, 0, 1]
    """
    groups = group_rows(weight, group_size)
    if centroids.dim() != 2 or centroids.shape[0] != groups.shape[0]:
        raise ValueError(
            f"centroids must be ({groups.shape[0]}, K) for this weight, got {tuple(centroids.shape)}"
        )
    out = torch.empty(groups.shape, dtype=torch.uint8, device=weight.device)
    for g in range(groups.shape[0]):
        c = centroids[g].float()
        # sort with a stable order so that ties between equal centroids keep the lower index
        sorted_c, order = torch.sort(c, stable=True)
        for start in range(0, groups.shape[1], CHUNK):
            part = groups[g, start : start + CHUNK]
            pos = nearest(part, sorted_c)
            out[g, start : start + CHUNK] = order[pos].to(torch.uint8)
    return out.reshape(weight.shape)
