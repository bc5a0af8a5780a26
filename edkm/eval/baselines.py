"""Post-training baselines at the same bits and on the same layers as DKM, for reports.

- ``rtn_``: round-to-nearest uniform quantization, per tensor or per group of ``group_size``
  consecutive input channels of each output row (the usual "g128" layout; a last group may be
  shorter when ``group_size`` does not divide the input channels). Asymmetric min/max: each
  group's range ``[min(w), max(w)]`` is widened to include 0 (so 0 stays exact and the integer
  zero point lies in ``[0, 2**b - 1]``, as GPTQ's and PyTorch's min/max quantizers do), then
  ``scale = (hi - lo) / (2**b - 1)``, ``zero = round(-lo / scale)``,
  ``q = clamp(round(w / scale) + zero, 0, 2**b - 1)`` and ``w' = (q - zero) * scale``.
- ``kmeans_``: post-training k-means per tensor: k-means++ initialisation
  (``edkm.dkm.centroids.init_centroids``) then Lloyd iterations until no assignment changes (run on
  the distinct weight values with their counts, which is exact and cheap for 16-bit weights),
  each weight replaced by its nearest centroid.

Both modify the model in place (selected Linear weights only, chosen by ``DKMConfig`` exactly as
``palettize_`` chooses them) and return a ``BaselineSummary`` with the relative weight error.
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

__all__ = ["BaselineSummary", "kmeans_", "kmeans_lut", "rtn_", "rtn_weight"]


@dataclasses.dataclass(frozen=True)
class BaselineSummary:
    """What a baseline changed: method, bits, layers, and the relative weight error.

    ``weight_rel_error`` is ``||W' - W||^2 / ||W||^2`` summed over all changed layers.
    """

    method: str
    bits: int | None
    group_size: int | None
    layers: list[str]
    num_params: int
    weight_rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        bits = "per-layer" if self.bits is None else str(self.bits)
        group = "per tensor" if self.group_size is None else f"groups of {self.group_size}"
        return (
            f"{self.method}: {bits} bits, {group}, {len(self.layers)} layers, "
            f"{self.num_params:,} weights, relative weight error {self.weight_rel_error:.3e}"
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
    if bits is not None:
        check_bits(bits)
    if group_size is not None and group_size < 1:
        raise InputError(f"group_size must be at least 1, got {group_size}")
    w = weight.detach().float()
    if group_size is None:
        out = _rtn_rows(w.reshape(1, -1), bits).reshape(w.shape)
    else:
        full = (w.shape[1] // group_size) * group_size
        main = _rtn_rows(w[:, :full].reshape(w.shape[0], -1, group_size), bits)
        parts = [main.reshape(w.shape[0], full)]
        if full < w.shape[1]:  # the shorter last group
            parts.append(_rtn_rows(w[:, full:], bits))
        out = torch.cat(parts, dim=1)
    return out.to(weight.dtype)


def kmeans_lut(
    weight: torch.Tensor, bits: int, *, iters: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor k-means of a weight: ``(lut (1, 2**bits) fp32, indices uint8 like weight)``.

    k-means++ initialisation, then Lloyd steps until no assignment changes or ``iters`` steps.
    A centroid that loses all its weights keeps its previous value. The Lloyd steps run on the
    distinct values of the weight, each counted with its multiplicity: the same fixed point as
    Lloyd on every weight, at a cost of at most 65,536 values per step for 16-bit weights (the
    uniquification idea of eDKM applied to the baseline).

    Example:
        >>> lut, idx = kmeans_lut(torch.tensor([[0.0, 0.1, 5.0, 5.2]]), bits=1)
        >>> sorted(round(v, 2) for v in lut[0].tolist())
        [0.05, 5.1]
    """
    from edkm.dkm.centroids import hard_assign, init_centroids, nearest

    check_bits(bits)
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


def _apply(
    model: nn.Module,
    config: DKMConfig | None,
    method: str,
    bits: int | None,
    group_size: int | None,
    quantize: Any,
) -> BaselineSummary:
    config = DKMConfig() if config is None else config
    err = ref = 0.0
    names: list[str] = []
    params = 0
    for name, module, spec in select_layers(model, config):
        weight = module.weight
        if not bool(torch.isfinite(weight).all()):
            raise InputError(f"layer '{name}': weight has non-finite values (NaN/inf)")
        layer_bits = spec.bits if bits is None else bits
        with torch.no_grad():
            new = quantize(weight.detach(), layer_bits)
            diff = (new.double() - weight.double()).pow(2).sum()
            err += float(diff)
            ref += float(weight.double().pow(2).sum())
            weight.copy_(new)
        names.append(name)
        params += weight.numel()
    rel = err / ref if ref > 0 else 0.0
    return BaselineSummary(method, bits, group_size, names, params, rel)


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
    return _apply(
        model, config, method, bits, group_size, lambda w, b: rtn_weight(w, b, group_size)
    )


def kmeans_(
    model: nn.Module,
    bits: int | None = None,
    config: DKMConfig | None = None,
    *,
    iters: int = 50,
    seed: int = 0,
) -> BaselineSummary:
    """Post-training per-tensor k-means of the selected Linear weights, in place.

    Example:
        >>> print(kmeans_(model, bits=3))  # doctest: +SKIP
    """
    if bits is not None:
        check_bits(bits)
    if iters < 1:
        raise InputError(f"iters must be at least 1, got {iters}")

    def quantize(w: torch.Tensor, b: int) -> torch.Tensor:
        lut, idx = kmeans_lut(w, b, iters=iters, seed=seed)
        return lut_lookup(lut, idx, None).to(w.dtype)

    return _apply(model, config, "kmeans", bits, None, quantize)
