"""Centroid initialisation and hard assignment for LUT groups.

``init_centroids`` gives the first DKM centroids of every LUT group (the whole tensor, or one
group of ``group_size`` consecutive output channels): k-means++ seeding or evenly spaced
quantiles, both refined by Lloyd iterations, seeded and deterministic. Big groups are seeded on
a fixed-size random subsample (``sample`` weights; the subsample is drawn with the seed), and
refined by Lloyd iterations on that subsample. Centroids are distinct even when a group
has fewer distinct values than centroids (spare centroids are spread between the present values),
and returned sorted.

``hard_assign`` gives each weight the index of its nearest centroid (ties to the lower index),
chunked so that it never materializes N x K at once.

Big groups: k-means++ (or the quantiles) and the Lloyd refinement run on a seeded subsample of
``sample`` weights drawn with replacement (an initialisation only has to be close; DKM, or the
k-means baseline's own Lloyd steps, refine on all weights afterwards).

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

from edkm.errors import check_bits

CHUNK = 1 << 20  # weights per chunk in hard assignment and Lloyd sums
DEFAULT_SAMPLE = 1 << 16


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
    k = 1 << check_bits(bits)
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
            # with replacement: a permutation of a 45M-weight group would cost 360 MB
            x = x[torch.randint(0, x.numel(), (sample,), generator=gen)]
        if method == "quantile":
            seeds = torch.quantile(x, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
        else:
            seeds = _kmeanspp(x, k, gen)
        lo, hi = float(row.min()), float(row.max())
        c = _spread(seeds, k, lo, hi)
        # Lloyd on the subsample too: an initialisation only has to be close; DKM (or the
        # k-means baseline's own Lloyd steps) refine on all weights afterwards.
        c = _spread(_lloyd(x, c, lloyd_iters), k, lo, hi)
        out.append(c)
    return torch.stack(out).to(weight.device)


def _nearest_index(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (row of (G, K) ``c``): the sorted centroids and, per sorted position, the
    lowest original index with that value."""
    sorted_c, order = torch.sort(c, dim=1, stable=True)
    new_run = torch.ones_like(sorted_c, dtype=torch.bool)
    new_run[:, 1:] = sorted_c[:, 1:] != sorted_c[:, :-1]
    position = torch.arange(c.shape[1], device=c.device).expand_as(order)
    # the sorted position where each run of equal values starts (a stable sort puts the run's
    # lowest original index there)
    start = torch.where(new_run, position, 0).cummax(dim=1).values
    return sorted_c, order.gather(1, start)


def hard_assign(
    weight: torch.Tensor, centroids: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """uint8 index of each weight's nearest centroid, in the weight's shape.

    Nearest means the smallest ``|w - c_j|`` computed in fp32, ties to the lower index, i.e.
    ``argmin_j |w - c_j|`` (only two neighbours in sorted order are compared, which equals the
    full argmin unless fp32 rounding makes a farther centroid's distance tie with them). Works
    block by block (about ``CHUNK`` weights, several groups at once when groups are small) with
    a batched binary search: memory O(chunk), never N x K, and no loop over LUT groups.

    Example:
        >>> hard_assign(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([[1.0, 0.0]])).tolist()
        [1, 0, 0]
    """
    groups = group_rows(weight, group_size)
    if centroids.dim() != 2 or centroids.shape[0] != groups.shape[0]:
        raise ValueError(
            f"centroids must be ({groups.shape[0]}, K) for this weight, got {tuple(centroids.shape)}"
        )
    k = centroids.shape[1]
    if not 1 <= k <= 256:
        raise ValueError(f"uint8 indices hold at most 256 centroids, got {k}")
    out = torch.empty(groups.shape, dtype=torch.uint8, device=weight.device)
    sorted_all, first_all = _nearest_index(centroids.float())
    count, n = groups.shape
    cols = min(max(n, 1), CHUNK)
    rows = max(1, CHUNK // cols)
    for g0 in range(0, count, rows):
        g1 = min(g0 + rows, count)
        sorted_c, first = sorted_all[g0:g1], first_all[g0:g1]
        for m0 in range(0, n, cols):
            part = groups[g0:g1, m0 : m0 + cols]
            # insertion point: sorted_c[pos - 1] < w <= sorted_c[pos]; compare both neighbours
            if g1 - g0 == 1:
                pos = torch.searchsorted(sorted_c[0], part)
            else:
                pos = torch.searchsorted(sorted_c, part.contiguous())
            lo, hi = (pos - 1).clamp_min(0), pos.clamp_max(k - 1)
            d_lo = (part - sorted_c.gather(1, lo)).abs()
            d_hi = (part - sorted_c.gather(1, hi)).abs()
            i_lo, i_hi = first.gather(1, lo), first.gather(1, hi)
            take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (i_hi < i_lo))
            out[g0:g1, m0 : m0 + cols] = torch.where(take_hi, i_hi, i_lo).to(torch.uint8)
    return out.reshape(weight.shape)
