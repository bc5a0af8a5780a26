"""Post-training baselines at the same bits and on the same layers as DKM, for reports.

- ``rtn_``: round-to-nearest uniform quantization, per tensor or per group of ``group_size``
  consecutive input channels of each output row (the usual "g128" layout; a last group may be
  shorter when ``group_size`` does not divide the input channels). Asymmetric min/max: each
  group's range ``[min(w), max(w)]`` is widened to include 0 (so 0 stays exact and the integer
  zero point lies in ``[0, 2**b - 1]``, as GPTQ's and PyTorch's min/max quantizers do), then
  ``scale = (hi - lo) / (2**b - 1)``, ``zero = round(-lo / scale)``,
  ``q = clamp(round(w / scale) + zero, 0, 2**b - 1)`` and ``w' = (q - zero) * scale``.
- ``kmeans_``: post-training k-means with the LUT layout DKM uses for each layer (the config's
  ``granularity``: one LUT per tensor, or one per ``group_size`` consecutive output channels, as
  Core ML iOS18 stores grouped LUTs): k-means++ initialisation
  (``edkm.dkm.centroids.init_centroids``) then Lloyd iterations until no assignment changes,
  each weight replaced by its nearest centroid. Per tensor the Lloyd steps run on the distinct
  weight values with their counts (exact and cheap for 16-bit weights); grouped, they run on
  all groups at once on each group's sorted weights (no loop over groups, no per-weight work
  per step).

Both modify the model in place (selected Linear weights only, chosen by ``DKMConfig`` exactly as
``palettize_`` chooses them) and return a ``BaselineSummary`` with the relative weight error
and the storage the quantized layers would take, ``bits_per_weight``, computed from the tensors
the method produces (module ``storage_bits``): for k-means, ``b`` bits per index plus each LUT
entry at fp16 (``b + G * 2**b * 16 / N``, what ``save_palettized`` ships); for RTN, ``b`` bits
per weight plus, per quantization group, an fp16 scale and a ``b``-bit zero point. Only the
quantized Linear weights are counted (not biases, embeddings, norms or other layers).
They write dense weights into the model's own Linear layers (they are measured, then undone, not
exported), so they build no finalized layers; k-means decodes its LUT with the same
``edkm.nn.palette.lut_lookup`` as every finalized layer.

Example:
    >>> import copy
    >>> rtn = rtn_(copy.deepcopy(model), bits=3, group_size=128)  # doctest: +SKIP
    >>> print(rtn)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from edkm.config import DKMConfig
from edkm.errors import InputError, check_bits
from edkm.nn.palette import lut_lookup
from edkm.nn.palettize import select_layers

__all__ = [
    "BaselineSummary",
    "kmeans_",
    "kmeans_lut",
    "quantize_selected_",
    "rtn_",
    "rtn_weight",
    "storage_bits",
]


def storage_bits(
    indices: int, bits: int, *, lut_entries: int = 0, scales: int = 0, zeros: int = 0
) -> int:
    """Bits to store quantized weights: ``indices`` codes of ``bits`` bits, fp16 LUT entries,
    fp16 scales and ``bits``-bit zero points.

    Example:
        >>> storage_bits(1024, 3, lut_entries=2 * 8) / 1024  # 3 + 2 * 8 * 16 / 1024
        3.25
    """
    return indices * bits + 16 * lut_entries + 16 * scales + bits * zeros


@dataclasses.dataclass(frozen=True)
class BaselineSummary:
    """What a baseline changed: method, bits, layers, the relative weight error and storage.

    ``weight_rel_error`` is ``||W' - W||^2 / ||W||^2`` summed over all changed layers.
    ``group_size`` counts input channels per range for RTN, output channels per LUT for
    k-means (``None``: per tensor; the k-means figure is the config's global one).
    ``bits_per_weight`` is ``storage_bits / num_params`` over the changed layers (module docs).
    """

    method: str
    bits: int | None
    group_size: int | None
    layers: list[str]
    num_params: int
    weight_rel_error: float
    storage_bits: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight, side tensors (LUTs, scales, zeros) included."""
        return self.storage_bits / self.num_params if self.num_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bits_per_weight": self.bits_per_weight}

    def __str__(self) -> str:
        bits = "per-layer" if self.bits is None else str(self.bits)
        if self.group_size is None:
            group = "per tensor"
        elif self.method.startswith(("kmeans", "skm")):
            group = f"LUTs of {self.group_size} output channels"
        else:
            group = f"groups of {self.group_size}"
        return (
            f"{self.method}: {bits} bits, {group}, {len(self.layers)} layers, "
            f"{self.num_params:,} weights, relative weight error {self.weight_rel_error:.3e}, "
            f"{self.bits_per_weight:.3f} bits/weight"
        )


def _rtn_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max RTN of each slice along the last dim (fp32 in, fp32 out)."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / levels
    # an all-zero slice has no range: it is exact as it is
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe).clamp(0, levels)
    q = torch.clamp(torch.round(x / safe) + zero, 0, levels)
    return torch.where(scale > 0, (q - zero) * safe, x)


def rtn_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest quantized copy of an (out, in) weight, in its dtype (module docstring).

    Example:
        >>> w = torch.tensor([[-1.0, -0.2, 0.3, 2.0]])
        >>> rtn_weight(w, bits=2).tolist()
        [[-1.0, 0.0, 0.0, 2.0]]
    """
    return _rtn(weight, bits, group_size)[0]


def _rtn(weight: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, int]:
    """``rtn_weight`` and the number of ranges (one fp16 scale and zero point each)."""
    if bits is not None:
        check_bits(bits)
    if group_size is not None and group_size < 1:
        raise InputError(f"group_size must be at least 1, got {group_size}")
    w = weight.detach().float()
    if group_size is None:
        flat = w.reshape(1, -1)
        out, ranges = _rtn_rows(flat, bits).reshape(w.shape), flat.shape[0]
    else:
        full = (w.shape[1] // group_size) * group_size
        grouped = w[:, :full].reshape(w.shape[0], -1, group_size)
        main = _rtn_rows(grouped, bits)
        ranges = grouped.shape[0] * grouped.shape[1]
        parts = [main.reshape(w.shape[0], full)]
        if full < w.shape[1]:  # the shorter last group
            parts.append(_rtn_rows(w[:, full:], bits))
            ranges += w.shape[0]
        out = torch.cat(parts, dim=1)
    return out.to(weight.dtype), ranges


def kmeans_lut(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    iters: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of a weight: ``(lut (G, 2**bits) fp32, indices uint8 like weight)``.

    One LUT per tensor (``group_size=None``, G = 1) or per ``group_size`` consecutive output
    channels. k-means++ initialisation, then Lloyd steps until no assignment changes or
    ``iters`` steps. A centroid that loses all its weights keeps its previous value. Per tensor
    the Lloyd steps run on the distinct values of the weight, each counted with its
    multiplicity: the same fixed point as Lloyd on every weight, at a cost of at most 65,536
    values per step for 16-bit weights (the uniquification idea of eDKM applied to the
    baseline). Grouped, they run on every group at once (``_grouped_lloyd``).

    Example:
        >>> lut, idx = kmeans_lut(torch.tensor([[0.0, 0.1, 5.0, 5.2]]), bits=1)
        >>> sorted(round(v, 2) for v in lut[0].tolist())
        [0.05, 5.1]
        >>> kmeans_lut(torch.tensor([[0.0, 1.0], [5.0, 7.0]]), bits=1, group_size=1)[0].tolist()
        [[0.0, 1.0], [5.0, 7.0]]
    """
    from edkm.dkm.centroids import group_rows, hard_assign, init_centroids, nearest

    check_bits(bits)
    if group_size is not None:
        if isinstance(group_size, bool) or group_size < 1 or weight.shape[0] % group_size:
            raise InputError(
                f"group_size {group_size!r} does not divide the {weight.shape[0]} output channels"
            )
        init = init_centroids(weight.detach(), bits, group_size=group_size, seed=seed).float()
        lut = _grouped_lloyd(group_rows(weight, group_size), init, iters)
        return lut, hard_assign(weight.detach(), lut, group_size)
    w = weight.detach()
    values, counts = torch.unique(w.reshape(-1), return_counts=True)  # sorted
    values = values.double()  # sums of millions of weights: accumulate in fp64
    counts = counts.double()
    lut = init_centroids(w, bits, method="kmeans++", seed=seed).float()
    k = lut.shape[1]
    assign = None
    for _ in range(iters):
        # nearest() wants sorted centroids: sort, assign, and map back to the LUT's order
        sorted_c, order = torch.sort(lut[0])
        updated = order[nearest(values.float(), sorted_c)]
        if assign is not None and torch.equal(updated, assign):
            break
        assign = updated
        mass = torch.zeros(k, dtype=torch.float64, device=w.device).index_add_(0, assign, counts)
        sums = torch.zeros(k, dtype=torch.float64, device=w.device).index_add_(
            0, assign, values * counts
        )
        new = torch.where(mass > 0, sums / mass.clamp(min=1), lut[0].double())
        lut = new.float().unsqueeze(0)
    return lut, hard_assign(w, lut)


def _grouped_lloyd(x: torch.Tensor, lut: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd steps on (G, n) weights from (G, K) centroids, all groups at once, until no
    assignment changes (in any group) or ``iters`` steps; returns the (G, K) LUT sorted.

    1-D k-means needs no per-weight work per step: with each group's weights sorted once, a
    cluster is a run of them between two midpoints of the sorted centroids (a weight on a
    midpoint joins the lower centroid, as ``nearest``), so a step is a binary search of the
    K - 1 midpoints in the sorted weights and the clusters' sums are differences of an fp64
    prefix sum: O(G * K * log n) per step after one O(N log n) sort. A centroid that loses all
    its weights keeps its value.
    """
    groups, n = x.shape
    xs = torch.sort(x.float(), dim=1).values.contiguous()
    prefix = torch.zeros(groups, n + 1, dtype=torch.float64, device=x.device)
    prefix[:, 1:] = xs.double().cumsum(dim=1)
    lut = torch.sort(lut.float(), dim=1).values
    first = torch.zeros(groups, 1, dtype=torch.int64, device=x.device)
    last = torch.full((groups, 1), n, dtype=torch.int64, device=x.device)
    cuts = None
    for _ in range(iters):
        mids = ((lut[:, 1:] + lut[:, :-1]) * 0.5).contiguous()
        updated = torch.searchsorted(xs, mids, right=True)  # weights <= each midpoint
        if cuts is not None and torch.equal(updated, cuts):
            break
        cuts = updated
        edges = torch.cat([first, cuts, last], dim=1)
        mass = (edges[:, 1:] - edges[:, :-1]).double()
        sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
        new = torch.where(mass > 0, sums / mass.clamp(min=1), lut.double()).float()
        lut = torch.sort(new, dim=1).values
    return lut


def quantize_selected_(
    model: nn.Module,
    config: DKMConfig | None,
    method: str,
    bits: int | None,
    group_size: int | None,
    quantize: Any,
) -> BaselineSummary:
    """Quantize each selected layer with ``quantize(weight, bits, spec, name) -> (new weight,
    stored bits)`` in place and sum up the error and storage."""
    config = DKMConfig() if config is None else config
    err = ref = 0.0
    names: list[str] = []
    params = stored = 0
    for name, module, spec in select_layers(model, config):
        weight = module.weight
        if not bool(torch.isfinite(weight).all()):
            raise InputError(f"layer '{name}': weight has non-finite values (NaN/inf)")
        layer_bits = spec.bits if bits is None else bits
        with torch.no_grad():
            new, layer_stored = quantize(weight.detach(), layer_bits, spec, name)
            diff = (new.double() - weight.double()).pow(2).sum()
            err += float(diff)
            ref += float(weight.double().pow(2).sum())
            weight.copy_(new)
        names.append(name)
        params += weight.numel()
        stored += layer_stored
    rel = err / ref if ref > 0 else 0.0
    return BaselineSummary(method, bits, group_size, names, params, rel, stored)


def rtn_(
    model: nn.Module,
    bits: int | None = None,
    group_size: int | None = None,
    config: DKMConfig | None = None,
) -> BaselineSummary:
    """Round-to-nearest quantization of the selected Linear weights, in place.

    ``bits=None`` takes each layer's bits from ``config``; an int applies to every layer.
    ``group_size`` counts input channels (``None``: one range per tensor).

    Example:
        >>> print(rtn_(model, bits=3, group_size=128))  # doctest: +SKIP
    """
    if bits is not None:
        check_bits(bits)
    if group_size is not None and (isinstance(group_size, bool) or group_size < 1):
        raise InputError(f"group_size must be at least 1, got {group_size!r}")
    method = "rtn" if group_size is None else f"rtn_g{group_size}"

    def quantize(w: torch.Tensor, b: int, spec: Any, name: str) -> tuple[torch.Tensor, int]:
        new, ranges = _rtn(w, b, group_size)
        return new, storage_bits(w.numel(), b, scales=ranges, zeros=ranges)

    return quantize_selected_(model, config, method, bits, group_size, quantize)


def kmeans_(
    model: nn.Module,
    bits: int | None = None,
    config: DKMConfig | None = None,
    *,
    iters: int = 50,
    seed: int = 0,
) -> BaselineSummary:
    """Post-training k-means of the selected Linear weights, in place, with each layer's LUT
    granularity from ``config`` (per tensor, or per ``group_size`` output channels as DKM).

    Example:
        >>> print(kmeans_(model, bits=3))  # doctest: +SKIP
    """
    if bits is not None:
        check_bits(bits)
    if iters < 1:
        raise InputError(f"iters must be at least 1, got {iters}")
    config = DKMConfig() if config is None else config

    def quantize(w: torch.Tensor, b: int, spec: Any, name: str) -> tuple[torch.Tensor, int]:
        lut, idx = kmeans_lut(w, b, group_size=spec.group_size, iters=iters, seed=seed)
        new = lut_lookup(lut, idx, spec.group_size).to(w.dtype)
        return new, storage_bits(idx.numel(), b, lut_entries=lut.numel())

    gs = config.group_size
    method = "kmeans" if gs is None else f"kmeans_g{gs}"
    return quantize_selected_(model, config, method, bits, gs, quantize)
