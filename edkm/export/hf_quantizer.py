"""``from_pretrained`` / ``save_pretrained`` for edkm folders: transformers' quantizer API.

A folder whose ``config.json`` carries ``quantization_config = {"quant_method": "edkm",
"format_version": 1, "prepass": [...], "layers": {...}, "dkm_config": ...}`` (what
:func:`edkm.save_palettized` and ``edkm compress`` write, :mod:`edkm.export.format`; or a
pre-passed dense model, :mod:`edkm.prepass`) loads with
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` once ``edkm`` is imported:

1. transformers builds the stock architecture on the meta device;
2. :class:`EdkmHfQuantizer` applies the pre-pass manifests (:func:`edkm.prepass.restructure`),
   then puts a ``PalettizedLinear`` (meta tensors) in place of each Linear of the layer map,
   after checking the safetensors headers against the map (dtype, LUT shape, exact packed
   byte count), so a tampered folder is one ``InputError`` before any tensor is read;
3. transformers loads ``model.safetensors`` into it. The LUT buffer is fp16 and transformers
   keeps a tensor's dtype where the module's own tensor has another one, so the LUT stays
   bit-exact under ``dtype=torch.bfloat16``; ``PalettizedLinear`` decodes into the model dtype.

``save_pretrained`` writes the state_dict (``NAME.lut``, ``NAME.packed_indices``, the other
tensors) and ``config.json`` with the same ``quantization_config``. Only safetensors files are
read (``*.bin`` is refused: nothing in the folder is unpickled).

Why by hand: transformers has no LUT (palettized) format, and its quantizer API is the
documented way to add one (``register_quantization_config`` / ``register_quantizer``). This
module imports transformers; ``import edkm`` does not, and registers it only once
``transformers.quantizers.auto`` is imported (:func:`edkm._install_hf_hook`). Written for the
transformers 5 quantizer interface (``preprocess_model`` on the meta model, weights loaded by
``core_model_loading``); pyproject requires ``transformers>=5.0``.

Example:
    >>> import edkm, transformers
    >>> config = transformers.AutoConfig.for_model("llama")
    >>> config.quantization_config = {"quant_method": "edkm", "format_version": 1, "layers": {}}
    >>> type(EdkmQuantizationConfig.from_dict(config.quantization_config)).__name__
    'EdkmQuantizationConfig'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from edkm.errors import InputError
from edkm.export.format import _layout, _parse_dtype
from edkm.nn.bitpack import packed_size
from edkm.nn.palettized_linear import PalettizedLinear
from edkm.prepass import FORMAT_VERSION, QUANT_METHOD, read_manifests, restructure

__all__ = ["EdkmHfQuantizer", "EdkmQuantizationConfig", "register"]

_WHERE = "config.json quantization_config"


class EdkmQuantizationConfig(QuantizationConfigMixin):
    """edkm's ``quantization_config``: pre-pass manifests and the palettized layer map.

    ``layers`` maps a Linear's name to ``{"bits", "group_size", "shape", "weight_dtype",
    "bias"}`` (as in ``palettization.json``); it is empty for a pre-passed dense model. Every
    field is checked on construction (``InputError`` naming ``config.json``).

    Example:
        >>> cfg = EdkmQuantizationConfig(layers={"fc": {"bits": 3, "group_size": None,
        ...     "shape": [4, 8], "weight_dtype": "float32", "bias": False}})
        >>> cfg.to_dict()["layers"]["fc"]["bits"], cfg.prepass
        (3, [])
        >>> EdkmQuantizationConfig(format_version=7)
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: 'config.json quantization_config': edkm format_version 7 is not supported (this edkm reads 1)
    """

    def __init__(
        self,
        quant_method: str = QUANT_METHOD,
        format_version: int = FORMAT_VERSION,
        prepass: list[dict[str, Any]] | None = None,
        layers: dict[str, Any] | None = None,
        dkm_config: dict[str, Any] | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise InputError(f"'{_WHERE}': unknown keys {sorted(unknown)}")
        self.quant_method = quant_method  # type: ignore[assignment]
        self.format_version = format_version
        qc = {"quant_method": quant_method, "format_version": format_version}
        self.prepass = read_manifests(
            {"quantization_config": {**qc, "prepass": prepass or []}}, _WHERE
        )
        if layers is None:
            layers = {}
        if not isinstance(layers, dict):
            raise InputError(f"'{_WHERE}': 'layers' must be an object")
        for name, info in layers.items():
            _layout(name, info, Path(_WHERE))
            _parse_dtype(info.get("weight_dtype"), Path(_WHERE))
        self.layers = layers
        if dkm_config is not None and not isinstance(dkm_config, dict):
            raise InputError(f"'{_WHERE}': 'dkm_config' must be an object or null")
        self.dkm_config = dkm_config

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "prepass": json.loads(json.dumps(self.prepass)),
            "layers": json.loads(json.dumps(self.layers)),
            "dkm_config": json.loads(json.dumps(self.dkm_config)),
        }


def _headers(files: list[str]) -> dict[str, tuple[str, list[int]]]:
    """``name -> (safetensors dtype, shape)`` of every tensor in ``files`` (headers only)."""
    from safetensors import safe_open

    found: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise InputError(
                f"'{file}': edkm folders load from safetensors files only (nothing is unpickled)"
            )
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    sl = f.get_slice(key)
                    found[key] = (sl.get_dtype(), list(sl.get_shape()))
        except Exception as err:  # safetensors raises its own error type for corrupt files
            raise InputError(f"'{file}': truncated or corrupt safetensors file ({err})") from None
    return found


def _check_stored(name: str, info: dict[str, Any], headers: dict[str, Any], where: str) -> None:
    bits, group_size, out_f, in_f = _layout(name, info, Path(where))
    groups = 1 if group_size is None else out_f // group_size
    lut, packed = headers.get(f"{name}.lut"), headers.get(f"{name}.packed_indices")
    if lut is None or packed is None:
        raise InputError(f"'{where}': layer '{name}' has no LUT or no indices")
    if lut != ("F16", [groups, 1 << bits]):
        raise InputError(
            f"'{where}': layer '{name}' LUT is {lut[0]} {lut[1]}, expected F16 {[groups, 1 << bits]}"
        )
    expected = packed_size(out_f * in_f, bits)
    if packed != ("U8", [expected]):
        raise InputError(
            f"'{where}': layer '{name}' has indices {packed[0]} {packed[1]}, expected U8 "
            f"[{expected}] (ceil({out_f}*{in_f}*{bits}/8))"
        )


def swap_in_palettized(model: nn.Module, layers: dict[str, Any], where: str) -> None:
    """Replace each Linear named in ``layers`` by an empty ``PalettizedLinear`` on its device.

    The decoded weight dtype is the replaced Linear's (the dtype the model is loaded in).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> swap_in_palettized(model, {"0": {"bits": 2, "group_size": None, "shape": [4, 8],
        ...                                  "weight_dtype": "float32", "bias": True}}, "cfg")
        >>> type(model[0]).__name__, model[0].bias is not None
        ('PalettizedLinear', True)
    """
    for name, info in layers.items():
        bits, group_size, out_f, in_f = _layout(name, info, Path(where))
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"'{where}': layer '{name}' does not exist in the model") from None
        weight = getattr(current, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (out_f, in_f):
            raise InputError(
                f"'{where}': layer '{name}' shape {[out_f, in_f]} does not match the model"
            )
        layer = PalettizedLinear(
            in_f,
            out_f,
            bits,
            group_size,
            bias=bool(info["bias"]),
            weight_dtype=weight.dtype,
            device=weight.device,
        )
        model.set_submodule(name, layer)


class EdkmHfQuantizer(HfQuantizer):
    """Loads edkm folders (module docstring); pre-quantized only, serializable, not trainable."""

    requires_calibration = True  # edkm palettizes by training (edkm compress), never on load
    quantization_config: EdkmQuantizationConfig

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        files = [str(f) for f in kwargs.get("checkpoint_files") or []]
        where = str(Path(files[0]).parent / "config.json") if files else _WHERE
        if self.quantization_config.layers:
            headers = _headers(files)
            for name, info in self.quantization_config.layers.items():
                _check_stored(name, info, headers, where)
        restructure(model, self.quantization_config.prepass)
        swap_in_palettized(model, self.quantization_config.layers, where)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for name, module in model.named_modules():
            if isinstance(module, PalettizedLinear):
                if module.lut.is_meta or module.packed_indices.is_meta:
                    raise InputError(f"layer '{name}': its LUT or indices were not in the folder")
                if not bool(torch.isfinite(module.lut).all()):
                    raise InputError(f"layer '{name}': the LUT holds non-finite values")
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the ``edkm`` quantization config and quantizer with transformers (idempotent).

    ``import edkm`` calls this as soon as transformers' quantizer registry is imported.

    Example:
        >>> register(); register()  # the second call does nothing
    """
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is EdkmHfQuantizer:
        return
    register_quantization_config(QUANT_METHOD)(EdkmQuantizationConfig)
    register_quantizer(QUANT_METHOD)(EdkmHfQuantizer)


register()
