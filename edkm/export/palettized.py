"""Save a finalized model as LUTs + bit-packed indices, and load it back (decoded or dense).

A palettized checkpoint is a folder with two files:

- ``model.safetensors``: for each palettized layer ``NAME``, ``NAME.lut`` (fp16, (G, 2**b)) and
  ``NAME.packed_indices`` (uint8, exactly ``ceil(out*in*b/8)`` bytes, layout of
  ``edkm.nn.bitpack``), plus every other state_dict tensor untouched. A tensor tied to another
  (the LM head and the token embedding) is stored once.
- ``palettization.json``: the format name and version, the layer map (bits, group size, shape,
  weight dtype per layer), the tied names, the ``DKMConfig`` used, and the Hugging Face model
  config and class, so ``load_palettized`` rebuilds the architecture offline.

The folder is written next to its target under a temporary name and renamed into place, so a
reader never sees a half-written checkpoint; an existing checkpoint is replaced only once the new
one is complete (and a folder that is not a palettized checkpoint is never replaced).

Example:
    >>> import edkm
    >>> edkm.finalize(model)  # doctest: +SKIP
    >>> edkm.save_palettized(model, "out/model-3bit")  # doctest: +SKIP
    >>> reloaded = edkm.load_palettized("out/model-3bit")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.errors import InputError
from edkm.io import atomic
from edkm.nn.bitpack import packed_size
from edkm.nn.dkm_linear import DKMLinear
from edkm.nn.palette import Palette
from edkm.nn.palettize import _CONFIG_ATTR
from edkm.nn.palettized_linear import PalettizedLinear

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "TENSORS_FILE",
    "PalettizedLinear",
    "load_palettized",
    "save_palettized",
]

FORMAT = "edkm-palettized"
FORMAT_VERSION = 1
META_FILE = "palettization.json"
TENSORS_FILE = "model.safetensors"


def _edkm_version() -> str:
    import edkm

    return str(edkm.__version__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str, file: Path) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"'{file}': unknown dtype {name!r}")
    return dtype


def _palettized_layers(model: nn.Module) -> list[tuple[str, nn.Module, Palette]]:
    out: list[tuple[str, nn.Module, Palette]] = []
    for name, module in model.named_modules():
        if isinstance(module, DKMLinear):
            raise InputError(
                f"layer '{name}' is still DKM-wrapped; call edkm.finalize(model) before saving"
            )
        if isinstance(module, PalettizedLinear):
            out.append((name, module, module.to_palette()))
            continue
        palette = getattr(module, "palette", None)
        if isinstance(module, nn.Linear) and isinstance(palette, Palette):
            # the weight must still be exactly what finalize wrote
            if not torch.equal(
                palette.dense(module.weight.dtype).to(module.weight.device), module.weight.detach()
            ):
                raise InputError(
                    f"layer '{name}': its weight changed after finalize (it is no longer "
                    "LUT[indices]); finalize again before saving"
                )
            out.append((name, module, palette))
    return out


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied tensors: alias name -> the name stored in the file (the first one)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(param), name)
        if canonical != name:
            aliases[name] = canonical
    for name, buf in model.named_buffers(remove_duplicate=False):
        canonical = first.setdefault(id(buf), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _check_replaceable(target: Path) -> None:
    """A checkpoint may replace an empty folder or another checkpoint, nothing else."""
    if target.exists():
        if not target.is_dir():
            raise InputError(f"'{target}' exists and is not a folder")
        if any(target.iterdir()) and not (target / META_FILE).is_file():
            raise InputError(
                f"'{target}' exists and is not a palettized checkpoint; refusing to replace it"
            )


def save_palettized(model: nn.Module, path: str | os.PathLike[str], *, config: Any = None) -> Path:
    """Save a finalized model to the folder ``path`` (LUTs, packed indices, metadata).

    ``config`` is the ``DKMConfig`` to record; by default the one ``palettize_`` used. The model
    must carry a Hugging Face ``config`` so that loading can rebuild it.

    Example:
        >>> save_palettized(model, "out/model-3bit")  # doctest: +SKIP
        PosixPath('out/model-3bit')
    """
    from safetensors.torch import save_file

    target = Path(path)
    layers = _palettized_layers(model)
    if not layers:
        raise InputError(
            "the model has no palettized layers; call edkm.palettize_ and edkm.finalize first"
        )
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_json_string"):
        raise InputError(
            f"save_palettized needs a Hugging Face model with a config, got {type(model).__name__}"
        )
    dkm_config = config if config is not None else getattr(model, _CONFIG_ATTR, None)
    aliases = _aliases(model)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in aliases:
            tensors[key] = value
    layer_map: dict[str, Any] = {}
    for name, module, palette in layers:
        for suffix in ("weight", "lut", "packed_indices"):
            tensors.pop(f"{name}.{suffix}", None)
        if f"{name}.weight" in aliases.values():
            raise InputError(
                f"layer '{name}': a palettized weight cannot be tied to another tensor"
            )
        tensors[f"{name}.lut"] = palette.lut.to(torch.float16)
        tensors[f"{name}.packed_indices"] = palette.packed_indices
        weight_dtype = (
            module.weight_dtype
            if isinstance(module, PalettizedLinear)
            else getattr(module, "weight").dtype  # noqa: B009
        )
        layer_map[name] = {
            "bits": palette.bits,
            "group_size": palette.group_size,
            "shape": list(palette.shape),
            "weight_dtype": _dtype_name(weight_dtype),
            "bias": getattr(module, "bias", None) is not None,
        }
    # safetensors wants contiguous CPU tensors that share no memory
    seen: set[tuple[int, int]] = set()  # (storage pointer, offset)
    for key, value in list(tensors.items()):
        value = value.detach().to("cpu").contiguous()
        storage = (value.untyped_storage().data_ptr(), int(value.storage_offset()))
        if storage in seen:
            value = value.clone()
        seen.add(storage)
        tensors[key] = value
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edkm_version": _edkm_version(),
        "model_class": type(model).__name__,
        "model_config": json.loads(hf_config.to_json_string(use_diff=False)),
        "dtype": _dtype_name(float_dtypes[0]) if float_dtypes else "float32",
        "dkm_config": dkm_config.to_dict() if dkm_config is not None else None,
        "layers": layer_map,
        "tied": aliases,
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT})
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    _check_replaceable(target)
    atomic.write_dir(target, write)
    return target


def _read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise InputError(f"palettized checkpoint folder '{folder}' does not exist")
    file = folder / META_FILE
    if not file.is_file():
        raise InputError(f"'{file}' is missing: '{folder}' is not a palettized checkpoint")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"'{file}': not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(
            f"'{file}': not an edkm palettized checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"'{file}': format version {version!r} is not supported "
            f"(this edkm reads version {FORMAT_VERSION})"
        )
    for key in ("model_class", "model_config", "layers", "tied", "dtype"):
        if key not in meta:
            raise InputError(f"'{file}': missing key {key!r}")
    return meta


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = folder / TENSORS_FILE
    if not file.is_file():
        raise InputError(f"'{file}' is missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"'{file}': truncated or corrupt safetensors file ({first})") from None


def _check_layers(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    for name, info in meta["layers"].items():
        bits, group_size, (out_f, in_f) = info["bits"], info["group_size"], info["shape"]
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise InputError(f"'{file}': layer '{name}' has invalid bits {bits!r}")
        lut = tensors.get(f"{name}.lut")
        packed = tensors.get(f"{name}.packed_indices")
        if lut is None or packed is None:
            raise InputError(f"'{file}': layer '{name}' has no LUT or no indices")
        groups = 1 if group_size is None else out_f // group_size
        if lut.dtype != torch.float16 or tuple(lut.shape) != (groups, 1 << bits):
            raise InputError(
                f"'{file}': layer '{name}' LUT is {lut.dtype} {tuple(lut.shape)}, "
                f"expected float16 {(groups, 1 << bits)}"
            )
        expected = packed_size(out_f * in_f, bits)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
            raise InputError(
                f"'{file}': layer '{name}' has {packed.numel()} index bytes, expected "
                f"{expected} (ceil({out_f}*{in_f}*{bits}/8))"
            )


def _build_model(meta: dict[str, Any], file: Path) -> nn.Module:
    import transformers

    config_dict = dict(meta["model_config"])
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InputError(f"'{file}': the model config has no model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError) as err:
        raise InputError(f"'{file}': cannot rebuild the model config ({err})") from None
    cls_name = meta["model_class"]
    if cls_name.endswith("ForCausalLM"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise InputError(f"'{file}': unknown model class {cls_name!r}")
    return cls(hf_config)


def load_palettized(path: str | os.PathLike[str], *, dense: bool = False) -> nn.Module:
    """Load a palettized checkpoint; returns the model in eval mode.

    By default each palettized layer is a ``PalettizedLinear`` (LUT + packed indices, decoded in
    forward); with ``dense=True`` they are plain ``nn.Linear`` layers holding ``LUT[indices]``
    (with a ``palette`` attribute, so the model can be saved again). Errors name the file.

    Example:
        >>> model = load_palettized("out/model-3bit", dense=True)  # doctest: +SKIP
    """
    folder = Path(path)
    meta = _read_meta(folder)
    tensors = _read_tensors(folder)
    file = folder / TENSORS_FILE
    _check_layers(meta, tensors, file)
    model = _build_model(meta, folder / META_FILE)
    model.to(_parse_dtype(meta["dtype"], folder / META_FILE))
    state = dict(tensors)
    for alias, canonical in meta["tied"].items():
        if canonical not in state:
            raise InputError(f"'{file}': tied tensor {alias!r} refers to missing {canonical!r}")
        state[alias] = state[canonical]
    palettes: dict[str, Palette] = {}
    for name, info in meta["layers"].items():
        weight_dtype = _parse_dtype(info["weight_dtype"], folder / META_FILE)
        out_f, in_f = info["shape"]
        palette = Palette(
            lut=state.pop(f"{name}.lut"),
            packed_indices=state.pop(f"{name}.packed_indices"),
            bits=info["bits"],
            group_size=info["group_size"],
            shape=(out_f, in_f),
        )
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"'{file}': layer '{name}' does not exist in the model") from None
        if tuple(getattr(current, "weight").shape) != (out_f, in_f):  # noqa: B009
            raise InputError(
                f"'{file}': layer '{name}' shape {(out_f, in_f)} does not match the model"
            )
        if dense:
            state[f"{name}.weight"] = palette.dense(weight_dtype)
            palettes[name] = palette
        else:
            layer = PalettizedLinear(
                in_f,
                out_f,
                bits=palette.bits,
                group_size=palette.group_size,
                bias=bool(info["bias"]),
                weight_dtype=weight_dtype,
            )
            model.set_submodule(name, layer)
            state[f"{name}.lut"] = palette.lut
            state[f"{name}.packed_indices"] = palette.packed_indices
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise InputError(
            f"'{file}': tensors do not match the model ({' '.join(first[:2])})"
        ) from None
    for name, palette in palettes.items():
        module = model.get_submodule(name)
        module.palette = palette  # type: ignore[assignment]
    if meta.get("dkm_config") is not None:
        from edkm.config import DKMConfig

        object.__setattr__(model, _CONFIG_ATTR, DKMConfig.from_dict(meta["dkm_config"]))
    return model.eval()
