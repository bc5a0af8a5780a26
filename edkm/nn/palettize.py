"""The palettized layer's lifecycle, one state machine: ``palettize_``, ``finalize`` and back.

```
nn.Linear
   | palettize_
   v
DKMLinear(soft | hard)                  set_mode(model, "soft" | "hard")
   | finalize                           hard assignment to the LUT rounded to fp16
   v
PalettizedLinear(frozen) <-------------+
   | lut_trainable_(True)              | lut_trainable_(False)
   | swap_in_luts                      | bake_luts (the LUT rounds to fp16)
   v                                   |
PalettizedLinear(LUT trainable) -------+

PalettizedLinear(frozen) --save_palettized--> folder --load_palettized--> PalettizedLinear(frozen)
PalettizedLinear(frozen) --densify_--> nn.Linear(dense) --undensify_--> PalettizedLinear(frozen)
folder --load_palettized(dense=True)--> nn.Linear(dense) --save_palettized--> folder
```

- ``DKMLinear`` (:mod:`edkm.nn.dkm_linear`), the training state: the original ``weight`` and
  ``bias`` Parameters plus the ``centroids``/``tau_base`` buffers. ``"soft"`` mode runs DKM in
  forward; ``"hard"`` mode uses nearest-centroid weights with the centroids rounded to fp16, so it
  evaluates exactly the model that ``finalize`` will produce.
- ``PalettizedLinear`` (:mod:`edkm.nn.palettized_linear`), every state after ``finalize``: the
  fp16 LUT and the bit-packed indices are the truth, the weight is ``LUT[indices]`` decoded in
  forward (one layer at a time: the model never holds all its dense weights). Its LUT can be
  made trainable (fp32 Parameter, indices fixed) for LUT fine-tuning
  (:mod:`edkm.train.lut_tune`); freezing rounds it to fp16 again.
- ``nn.Linear(dense)`` (:mod:`edkm.nn.dense`): the plain-torch exit, for tools that want
  ordinary Linear layers. The palettes stay recorded on the model (outside the state_dict), so
  ``save_palettized`` can write it again and ``undensify_`` can return to ``PalettizedLinear`` as
  long as each weight is still ``LUT[indices]`` (both check).
- The transitions of the folder are in :mod:`edkm.export`, those of LUT fine-tuning in
  :mod:`edkm.train.lut_tune`.
- :class:`~edkm.nn.palette.Palette` is the value form every transition passes around (LUT,
  packed indices, bits, group size, shape).

``palettize_(model, config)`` swaps each selected ``nn.Linear`` for a ``DKMLinear`` in place.
We swap modules rather than use ``torch.nn.utils.parametrize`` because a parametrization renames
the weight to ``...parametrizations.weight.original``; the swap keeps the very same ``weight``
and ``bias`` Parameter objects under their original names, so ``named_parameters()``, the
state_dict keys, an optimizer created before the swap, and checkpoints all stay valid. The
wrapper adds two buffers that enter the state_dict: ``centroids`` (G, K) fp32, the LUT that the
warm start carries from step to step, and ``tau_base`` (G,), the absolute DKM temperature per
LUT group (``tau * var(w_group)`` at wrap time; see ``edkm.config.dkm``).

``finalize(model)`` snaps each LUT to fp16 (the checkpoint's LUT dtype), assigns each weight
to its nearest LUT entry and swaps in a frozen ``PalettizedLinear`` holding that LUT and the
packed indices (state_dict keys ``NAME.lut`` and ``NAME.packed_indices`` instead of
``NAME.weight``, as in the checkpoint file), keeping the same ``bias`` Parameter.

Example:
    >>> import edkm
    >>> summary = edkm.palettize_(model, edkm.DKMConfig(bits=3))  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
    >>> edkm.finalize(model)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edkm.adapters import get_adapter
from edkm.config import DKMConfig, LayerSpec
from edkm.errors import InputError
from edkm.nn.bitpack import pack_indices, packed_size
from edkm.nn.dkm_linear import DKMLinear, Mode, check_finite
from edkm.nn.palette import Palette, lut_lookup
from edkm.nn.palettized_linear import PalettizedLinear

__all__ = [
    "DKMLinear",
    "LayerSummary",
    "Palette",
    "PalettizeSummary",
    "PalettizedLinear",
    "dkm_layers",
    "finalize",
    "finalized_layers",
    "lut_lookup",
    "palettize_",
    "palettized_modules",
    "select_layers",
    "set_mode",
    "set_tau_scale",
]

_CONFIG_ATTR = "edkm_dkm_config"  # the DKMConfig used, kept on the model for export


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One palettized layer: name, shape, bits and LUT groups."""

    name: str
    out_features: int
    in_features: int
    bits: int
    group_size: int | None
    num_groups: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def packed_bytes(self) -> int:
        """Bytes of the exported layer: packed indices plus fp16 LUTs."""
        return packed_size(self.numel, self.bits) + 2 * self.num_groups * (1 << self.bits)


@dataclasses.dataclass(frozen=True)
class PalettizeSummary:
    """What ``palettize_`` wrapped; ``print`` it for a table.

    Example:
        >>> s = PalettizeSummary([LayerSummary("a", 4, 8, 2, None, 1)], model_params=64)
        >>> (s.num_layers, s.num_params, round(s.bits_per_weight, 2))
        (1, 32, 4.0)
    """

    layers: list[LayerSummary]
    model_params: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_params(self) -> int:
        """Weights palettized (biases are kept as they are)."""
        return sum(layer.numel for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Exported size of the palettized weights per weight, LUTs included."""
        if not self.layers:
            return 0.0
        return 8 * sum(layer.packed_bytes for layer in self.layers) / self.num_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_params": self.num_params,
            "model_params": self.model_params,
            "bits_per_weight": self.bits_per_weight,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>12}  bits  luts"]
        for layer in self.layers:
            shape = f"{layer.out_features}x{layer.in_features}"
            lines.append(
                f"{layer.name:<{width}}  {shape:>12}  {layer.bits:>4}  {layer.num_groups:>4}"
            )
        share = self.num_params / self.model_params if self.model_params else 0.0
        lines.append(
            f"{self.num_layers} layers, {self.num_params:,} weights palettized "
            f"({share:.1%} of {self.model_params:,} parameters), "
            f"{self.bits_per_weight:.3f} bits/weight exported"
        )
        return "\n".join(lines)


def _module_types(model: nn.Module) -> dict[str, list[str]]:
    """name -> class names of the module, then of its enclosing modules, innermost first."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0] if name else None
        own = [type(module).__name__]
        out[name] = own + (out.get(parent, []) if parent is not None else [])
    return out


def select_layers(model: nn.Module, config: DKMConfig) -> list[tuple[str, nn.Linear, LayerSpec]]:
    """The modules ``config`` selects, with their resolved settings, in model order.

    Defaults come from the model adapter (Linear layers inside decoder blocks); name overrides
    may add others. A selected module that is not a Linear is an error naming it. The post-
    training baselines use the same selection.

    Example:
        >>> [n for n, _, _ in select_layers(model, DKMConfig())][:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """
    adapter = get_adapter(model)
    defaults = {name for name, _ in adapter.linear_layers()}
    types = _module_types(model)
    selected: list[tuple[str, nn.Linear, LayerSpec]] = []
    matched_names: set[str] = set()
    seen_types: set[str] = set()
    for name, module in model.named_modules():
        # only modules that own a weight can be targets (Linear, Embedding, norms, ...)
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        found, key = config.name_override(name)
        if found:
            matched_names.add(str(key))
        if name in defaults:
            seen_types.update(types[name])
        spec = config.resolve(name, types[name], default=name in defaults)
        if spec is None:
            continue
        if isinstance(module, DKMLinear):
            raise InputError(
                f"layer '{name}' is already palettized; call edkm.finalize(model) before "
                "palettizing again"
            )
        if type(module) is not nn.Linear:
            raise InputError(
                f"layer '{name}' is a {type(module).__name__}, not a Linear layer; only Linear "
                "weights can be palettized (check module_name_configs)"
            )
        assert isinstance(module, nn.Linear)
        selected.append((name, module, spec))
    unmatched = [
        f"module_name_configs key {k!r}"
        for k in config.module_name_configs
        if k not in matched_names
    ]
    unmatched += [
        f"module_type_configs key {k!r}" for k in config.module_type_configs if k not in seen_types
    ]
    for what in unmatched:  # most likely a typo: say so rather than silently ignore it
        warnings.warn(f"{what} matches no layer", stacklevel=3)
    return selected


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def palettize_(model: nn.Module, config: DKMConfig | None = None) -> PalettizeSummary:
    """Wrap the Linear weights that ``config`` selects with DKM, in place; return a summary.

    Errors (``InputError``, naming the layer): a selected module that is not a Linear, a tied
    weight, bits outside 1..8, a group size that does not divide the output channels, and
    non-finite weights. The model must be one that ``edkm.adapters.get_adapter`` knows.

    Example:
        >>> import edkm
        >>> print(edkm.palettize_(model, edkm.DKMConfig(bits=3)))  # doctest: +SKIP
    """
    config = DKMConfig() if config is None else config
    config.validate()  # a config mutated after construction is checked again
    selected = select_layers(model, config)
    shared = _shared_weights(model)
    for name, module, _ in selected:
        others = [n for n in shared[id(module.weight)] if n != f"{name}.weight"]
        if others:
            raise InputError(
                f"layer '{name}': its weight is tied to {', '.join(others)}; "
                "tied weights cannot be palettized"
            )
    # build every wrapper first so that an error leaves the model untouched
    wrappers = [(name, DKMLinear(module, spec, name)) for name, module, spec in selected]
    for (name, wrapper), (_, module, _) in zip(wrappers, selected):
        wrapper.train(module.training)
        model.set_submodule(name, wrapper)
    object.__setattr__(model, _CONFIG_ATTR, config)
    layers = [
        LayerSummary(
            name=name,
            out_features=w.out_features,
            in_features=w.in_features,
            bits=w.bits,
            group_size=w.group_size,
            num_groups=w.num_groups,
        )
        for name, w in wrappers
    ]
    model_params = sum(p.numel() for p in model.parameters())
    return PalettizeSummary(layers=layers, model_params=model_params)


def dkm_layers(model: nn.Module) -> Iterator[tuple[str, DKMLinear]]:
    """The DKM-wrapped layers of ``model`` as ``(name, module)``.

    Example:
        >>> [name for name, _ in dkm_layers(model)][:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj']
    """
    for name, module in model.named_modules():
        if isinstance(module, DKMLinear):
            yield name, module


palettized_modules = dkm_layers  # the name the trainer uses


def set_tau_scale(model: nn.Module, scale: float) -> None:
    """Multiply every layer's base temperature by ``scale`` (for annealing schedules).

    Example:
        >>> set_tau_scale(model, 0.5)  # doctest: +SKIP
    """
    if not (scale > 0 and scale < float("inf")):
        raise InputError(f"tau scale must be a finite number > 0, got {scale}")
    for _, layer in dkm_layers(model):
        layer.tau_scale = float(scale)


def set_mode(model: nn.Module, mode: Mode) -> None:
    """Switch every DKM layer to ``"soft"`` (DKM weights) or ``"hard"`` (nearest centroid).

    Example:
        >>> set_mode(model, "hard")  # doctest: +SKIP
    """
    if mode not in ("soft", "hard"):
        raise InputError(f"mode must be 'soft' or 'hard', got {mode!r}")
    for _, layer in dkm_layers(model):
        layer.mode = mode


def finalize(model: nn.Module) -> nn.Module:
    """Hard-assign every DKM layer and swap in a frozen ``PalettizedLinear``; returns model.

    Each LUT is first rounded to fp16 (the checkpoint's LUT dtype), then each weight takes its
    nearest LUT entry, so the finalized layers decode exactly the weights of ``"hard"`` mode and
    of ``load_palettized``, bit for bit. Every LUT group then holds at most 2**bits distinct
    values. The unpacked indices seed each layer's index cache (see ``PalettizedLinear``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
        >>> _ = palettize_(model, DKMConfig(bits=3))
        >>> layer = finalize(model).model.layers[0].mlp.up_proj
        >>> type(layer).__name__, layer.bits, layer.lut.dtype, layer.weight.unique().numel() <= 8
        ('PalettizedLinear', 3, torch.float16, True)
    """
    for name, layer in list(dkm_layers(model)):
        weight = layer.weight
        check_finite(weight.detach(), name)
        lut = layer.lut()
        if not bool(torch.isfinite(lut).all()):
            raise InputError(f"layer '{name}': a centroid overflows fp16 (|c| > 65504)")
        with torch.no_grad():
            indices = layer.hard_indices()
        palette = Palette(
            lut=lut,
            packed_indices=pack_indices(indices, layer.bits),
            bits=layer.bits,
            group_size=layer.group_size,
            shape=(layer.out_features, layer.in_features),
        )
        final = PalettizedLinear.from_palette(
            palette, bias=layer.bias, weight_dtype=weight.dtype, indices=indices
        )
        final.train(layer.training)
        model.set_submodule(name, final)
    return model


def finalized_layers(model: nn.Module) -> Iterator[tuple[str, PalettizedLinear]]:
    """The ``PalettizedLinear`` layers of ``model`` (frozen or LUT trainable) as ``(name, module)``.

    Example:
        >>> list(finalized_layers(nn.Sequential(nn.Linear(2, 2))))
        []
    """
    for name, module in model.named_modules():
        if isinstance(module, PalettizedLinear):
            yield name, module
