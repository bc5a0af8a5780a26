"""The plain-torch exit of the lifecycle: ``PalettizedLinear`` <-> ``nn.Linear`` holding ``LUT[indices]``.

``densify_(model)`` swaps every frozen ``PalettizedLinear`` for an ordinary ``nn.Linear`` whose
weight is the decoded ``LUT[indices]`` (for tools that want plain Linear layers; it costs every
dense weight at once). The palettes stay recorded on the model as the attribute
``edkm_dense_palettes`` (outside the state_dict), so ``save_palettized`` can write the model
again and ``undensify_`` can return to ``PalettizedLinear``; both first check with
``dense_palettes`` that each weight is still exactly ``LUT[indices]``.
``load_palettized(path, dense=True)`` gives this form. The whole state machine is drawn in
:mod:`edkm.nn.palettize`.

Example:
    >>> import torch
    >>> p = Palette(torch.tensor([[0.5, 1.0]], dtype=torch.float16),
    ...             torch.tensor([0b110], dtype=torch.uint8), 1, None, (1, 3))
    >>> model = densify_(torch.nn.Sequential(PalettizedLinear.from_palette(p)))
    >>> type(model[0]).__name__, model[0].weight.tolist()
    ('Linear', [[0.5, 1.0, 1.0]])
    >>> undensify_(model), type(model[0]).__name__
    (1, 'PalettizedLinear')
"""

from __future__ import annotations

import torch
from torch import nn

from edkm.errors import InputError
from edkm.nn.palette import Palette
from edkm.nn.palettize import finalized_layers
from edkm.nn.palettized_linear import PalettizedLinear

__all__ = ["dense_palettes", "densify_", "undensify_"]

_PALETTES_ATTR = "edkm_dense_palettes"  # name -> Palette of the densified layers


def densify_(model: nn.Module) -> nn.Module:
    """Swap every frozen ``PalettizedLinear`` for a plain ``nn.Linear`` holding ``LUT[indices]``.

    This materializes every dense weight (the price of plain torch layers). The palettes are
    recorded on the model, outside the state_dict, for ``save_palettized`` and ``undensify_``;
    the bias Parameter is kept as it is. Returns ``model``.

    Example:
        >>> p = Palette(torch.zeros(1, 2, dtype=torch.float16), torch.zeros(1, dtype=torch.uint8),
        ...             1, None, (2, 3))
        >>> m = densify_(nn.Sequential(PalettizedLinear.from_palette(p)))
        >>> type(m[0]).__name__, sorted(dense_palettes(m))
        ('Linear', ['0'])
    """
    record: dict[str, Palette] = dict(getattr(model, _PALETTES_ATTR, None) or {})
    for name, layer in list(finalized_layers(model)):
        if layer.lut_trainable:
            raise InputError(
                f"layer '{name}': its LUT is trainable; freeze it first (lut_trainable_(False) or bake_luts)"
            )
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
            dtype=layer.weight_dtype,
        )
        linear.weight = nn.Parameter(layer.weight)
        linear.bias = layer.bias  # type: ignore[assignment]  # the same Parameter, or None
        linear.train(layer.training)
        model.set_submodule(name, linear)
        record[name] = layer.to_palette()
    object.__setattr__(model, _PALETTES_ATTR, record)
    return model


def dense_palettes(model: nn.Module) -> dict[str, tuple[nn.Linear, Palette]]:
    """The densified layers of ``model`` (``densify_``) with their palettes, by name.

    Each weight must still be exactly ``LUT[indices]``; one that changed is an ``InputError``
    naming the layer. A recorded name that holds another module since is left out.

    Example:
        >>> dense_palettes(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    out: dict[str, tuple[nn.Linear, Palette]] = {}
    for name, palette in (getattr(model, _PALETTES_ATTR, None) or {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if type(module) is not nn.Linear:
            continue
        weight = module.weight.detach()
        if not torch.equal(palette.dense(weight.dtype).to(weight.device), weight):
            raise InputError(
                f"layer '{name}': its weight changed after it was densified (it is no longer "
                "LUT[indices]); load or finalize the model again"
            )
        out[name] = (module, palette)
    return out


def undensify_(model: nn.Module) -> int:
    """Swap each densified ``nn.Linear`` back to a frozen ``PalettizedLinear``; the count.

    Example:
        >>> p = Palette(torch.zeros(1, 2, dtype=torch.float16), torch.zeros(1, dtype=torch.uint8),
        ...             1, None, (2, 3))
        >>> m = densify_(nn.Sequential(PalettizedLinear.from_palette(p)))
        >>> undensify_(m), type(m[0]).__name__
        (1, 'PalettizedLinear')
    """
    layers = dense_palettes(model)
    record: dict[str, Palette] = getattr(model, _PALETTES_ATTR, None) or {}
    for name, (linear, palette) in layers.items():
        weight = linear.weight
        layer = PalettizedLinear.from_palette(palette, bias=linear.bias, weight_dtype=weight.dtype)
        layer.to(weight.device)
        layer.train(linear.training)
        model.set_submodule(name, layer)
        record.pop(name, None)
    return len(layers)
