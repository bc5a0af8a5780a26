"""``save_palettized`` / ``load_palettized``: a finalized model to its checkpoint folder and back.

Saving collects each palettized layer's :class:`~edkm.nn.palette.Palette` (from a frozen
``PalettizedLinear``, or from a layer densified by :func:`edkm.nn.dense.densify_` whose weight
is still ``LUT[indices]``) and every other state_dict tensor, and writes them in the folder
format of :mod:`edkm.export.format` (which is also a Hugging Face folder: after ``import edkm``,
``AutoModelForCausalLM.from_pretrained`` loads it, :mod:`edkm.export.hf_quantizer`). Loading
reads and validates that folder, rebuilds the Hugging Face architecture offline
(:mod:`edkm.export.hf`), applies the pre-pass manifests of a pre-passed model
(:func:`edkm.prepass.restructure`), swaps a frozen ``PalettizedLinear`` in for each stored
layer and loads the tensors, strictly. The weights a reloaded model decodes
are those of the saved model, bit for bit.

Example:
    >>> import tempfile, edkm
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> _ = edkm.palettize_(model, edkm.DKMConfig(bits=2))
    >>> model = edkm.finalize(model)
    >>> folder = edkm.save_palettized(model, f"{tempfile.mkdtemp()}/model-2bit")
    >>> reloaded = edkm.load_palettized(folder)
    >>> name = "model.layers.0.mlp.up_proj"
    >>> type(reloaded.get_submodule(name)).__name__
    'PalettizedLinear'
    >>> torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.errors import InputError
from edkm.export import hf
from edkm.export.format import (
    _parse_dtype,
    dtype_name,
    hf_config,
    layer_entry,
    layer_tensors,
    make_meta,
    read_checkpoint,
    write_checkpoint,
)
from edkm.nn.dense import dense_palettes, densify_
from edkm.nn.dkm_linear import DKMLinear
from edkm.nn.palette import Palette
from edkm.nn.palettize import _CONFIG_ATTR
from edkm.nn.palettized_linear import PalettizedLinear

__all__ = ["load_palettized", "model_prepass", "save_palettized"]


def _stored_layers(model: nn.Module) -> list[tuple[str, Palette, dict[str, Any]]]:
    """``(name, palette, layer map entry)`` of every palettized layer, in model order."""
    dense = dense_palettes(model)
    out: list[tuple[str, Palette, dict[str, Any]]] = []
    for name, module in model.named_modules():
        if isinstance(module, DKMLinear):
            raise InputError(
                f"layer '{name}' is still DKM-wrapped; call edkm.finalize(model) before saving"
            )
        if isinstance(module, PalettizedLinear):
            if module.lut_trainable:
                raise InputError(
                    f"layer '{name}': its LUT is trainable; freeze it (bake_luts or "
                    "lut_trainable_(False)) before saving"
                )
            palette, weight_dtype = module.to_palette(), module.weight_dtype
        elif name in dense:
            palette, weight_dtype = dense[name][1], dense[name][0].weight.dtype
        else:
            continue
        has_bias = getattr(module, "bias", None) is not None
        out.append((name, palette, layer_entry(palette, weight_dtype, has_bias)))
    return out


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied tensors: alias name -> the name stored in the file (the first one)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named: list[tuple[str, torch.Tensor]] = [*model.named_parameters(remove_duplicate=False)]
    named += model.named_buffers(remove_duplicate=False)
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def model_prepass(model: nn.Module) -> list[dict[str, Any]]:
    """The pre-pass manifests that shaped ``model`` (``[]`` for a stock model).

    Those recorded on the model by a pre-pass or by ``edkm.prepass.restructure`` (every loader
    calls it), else those in ``config.quantization_config``.

    Example:
        >>> model_prepass(nn.Linear(2, 2))
        []
    """
    from edkm.prepass import manifests_of, read_manifests

    recorded = manifests_of(model)  # applied by a pre-pass, restructure or a loader
    if recorded:
        return recorded
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else None
    return read_manifests({"quantization_config": qc}, "the model's config") if qc else []


def save_palettized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: Any = None,
    prepass: list[dict[str, Any]] | None = None,
) -> Path:
    """Save a finalized model to the folder ``path`` (LUTs, packed indices, metadata).

    ``config`` is the ``DKMConfig`` to record; by default the one ``palettize_`` used.
    ``prepass`` are the pre-pass manifests that turned the stock architecture into this one
    (:mod:`edkm.prepass`), in order; by default those in the model's ``quantization_config``
    (:func:`model_prepass`). The folder is also a Hugging Face model folder (``config.json``
    with edkm's ``quantization_config``; :mod:`edkm.export.format`). The model
    must carry a Hugging Face ``config`` so that loading can rebuild it. Errors
    (``InputError``): no palettized layer, a layer still DKM-wrapped or with a trainable LUT, a
    densified weight that changed, a palettized weight tied to another tensor.

    Example:
        >>> save_palettized(model, "out/model-3bit")  # doctest: +SKIP
        PosixPath('out/model-3bit')
    """
    layers = _stored_layers(model)
    if not layers:
        raise InputError(
            "the model has no palettized layers; call edkm.palettize_ and edkm.finalize first"
        )
    model_class, model_config = hf.describe_model(model)
    model_config.pop("quantization_config", None)
    manifests = model_prepass(model) if prepass is None else [dict(m) for m in prepass]
    dkm_config = config if config is not None else getattr(model, _CONFIG_ATTR, None)
    aliases = _aliases(model)
    tensors = {k: v for k, v in model.state_dict().items() if k not in aliases}
    layer_map: dict[str, Any] = {}
    for name, palette, entry in layers:
        if f"{name}.weight" in aliases.values():
            raise InputError(
                f"layer '{name}': a palettized weight cannot be tied to another tensor"
            )
        for suffix in ("weight", "lut", "packed_indices"):
            tensors.pop(f"{name}.{suffix}", None)
        tensors.update(layer_tensors(name, palette))
        layer_map[name] = entry
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    meta = make_meta(
        model_class=model_class,
        model_config=model_config,
        dtype=dtype_name(float_dtypes[0]) if float_dtypes else "float32",
        dkm_config=dkm_config.to_dict() if dkm_config is not None else None,
        layers=layer_map,
        tied=aliases,
        prepass=manifests,
    )
    # buffers that are not saved (rotary frequencies) are rebuilt on load; a model moved with
    # .to(bfloat16) holds them rounded, so their dtypes are recorded to rebuild it exactly
    meta["buffer_dtypes"] = {
        name: dtype_name(buf.dtype)
        for name, buf in _unsaved_buffers(model)
        if buf.is_floating_point()
    }
    return write_checkpoint(path, tensors, meta)


def _unsaved_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    saved = set(model.state_dict())
    return [(n, b) for n, b in model.named_buffers() if n not in saved]


def load_palettized(
    path: str | os.PathLike[str], *, dense: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a palettized checkpoint; returns the model in eval mode.

    ``dtype`` is the dtype of the model's float tensors and decoded weights (default: the
    saved model's); the model is built in it, as ``from_pretrained(dtype=...)`` builds one, so
    fp32 buffers (rotary frequencies) stay fp32. The LUTs stay fp16 whatever the dtype.

    By default each palettized layer is a frozen ``PalettizedLinear`` (LUT + packed indices,
    decoded in forward); with ``dense=True`` they are plain ``nn.Linear`` layers holding
    ``LUT[indices]`` (:func:`edkm.nn.dense.densify_`, so the model can be saved again). Errors
    name the file.

    Example:
        >>> model = load_palettized("out/model-3bit", dense=True)  # doctest: +SKIP
    """
    ckpt = read_checkpoint(path)
    file = ckpt.tensors_file
    model = hf.build_model(
        ckpt.meta["model_class"], ckpt.meta["model_config"], ckpt.meta_file, dtype or ckpt.dtype
    )
    if ckpt.meta["prepass"]:
        from edkm.prepass import restructure

        restructure(model, ckpt.meta["prepass"])
    state = dict(ckpt.tensors)
    for name, stored in ckpt.layers.items():
        palette = stored.palette
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"'{file}': layer '{name}' does not exist in the model") from None
        if tuple(getattr(current, "weight", torch.empty(0)).shape) != palette.shape:
            raise InputError(
                f"'{file}': layer '{name}' shape {palette.shape} does not match the model"
            )
        weight_dtype = dtype or stored.weight_dtype
        layer = PalettizedLinear.from_palette(palette, weight_dtype=weight_dtype)
        if stored.bias:
            layer.bias = nn.Parameter(torch.zeros(palette.shape[0], dtype=weight_dtype))
        model.set_submodule(name, layer)
        state.update(layer_tensors(name, palette))  # loaded strictly like every other tensor
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise InputError(
            f"'{file}': tensors do not match the model ({' '.join(first[:2])})"
        ) from None
    if dense:
        densify_(model)
    if dtype is None:  # the saved model exactly, unsaved buffers in their recorded dtypes
        recorded = ckpt.meta.get("buffer_dtypes", {})
        for name, buf in _unsaved_buffers(model):
            if isinstance(recorded.get(name), str) and buf.is_floating_point():
                buf.data = buf.data.to(_parse_dtype(recorded[name], ckpt.meta_file))
    # the in-memory model says what it is, as one loaded by from_pretrained does: a re-save
    # (save_palettized or save_pretrained) keeps the pre-pass manifests and the layer map
    hf_model: Any = model
    hf_model.config.quantization_config = hf_config(ckpt.meta)["quantization_config"]
    if ckpt.meta.get("dkm_config") is not None:
        from edkm.config import DKMConfig

        object.__setattr__(model, _CONFIG_ATTR, DKMConfig.from_dict(ckpt.meta["dkm_config"]))
    return model.eval()
