"""The palettized checkpoint folder (format ``edkm-palettized``, version 1): write, read, validate.

A checkpoint is a folder with two files:

- ``model.safetensors``: for each palettized layer ``NAME``, ``NAME.lut`` (fp16, (G, 2**b)) and
  ``NAME.packed_indices`` (uint8, exactly ``ceil(out*in*b/8)`` bytes, layout of
  ``edkm.nn.bitpack``), plus every other state_dict tensor untouched. A tensor tied to another
  (the LM head and the token embedding) is stored once. The file's own metadata is
  ``{"format": "edkm-palettized"}``.
- ``palettization.json``: the format name and version, the edkm version, the model class and
  its Hugging Face config (:mod:`edkm.export.hf`), the model dtype, the ``DKMConfig`` used, the
  layer map (bits, group size, shape, weight dtype and bias per layer), the tied names and the
  pre-pass manifests (:mod:`edkm.prepass`; ``[]`` for a model that was not pre-passed).
- ``config.json``: the same folder as a Hugging Face model folder. It is the model's config
  with ``quantization_config = {"quant_method": "edkm", "format_version": 1, "prepass": [...],
  "layers": {...}, "dkm_config": ...}`` (:func:`hf_config`), so that, after ``import edkm``,
  ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads the same
  ``model.safetensors`` into ``PalettizedLinear`` layers (:mod:`edkm.export.hf_quantizer`).

:func:`write_checkpoint` builds the folder under a temporary name and renames it into place
(:func:`edkm.io.atomic.write_dir`): a reader never sees a half-written checkpoint, an existing
checkpoint is replaced only once the new one is complete, and a folder that is not a checkpoint
is never replaced. :func:`read_checkpoint` checks everything it returns, so a missing, truncated
or tampered folder is one ``InputError`` line naming the file, never a traceback from deeper
down. This module knows nothing of models or layers beyond :class:`~edkm.nn.palette.Palette`.

Example:
    >>> import tempfile, torch
    >>> from edkm.nn.bitpack import pack_indices
    >>> p = Palette(torch.tensor([[0.0, 1.0]], dtype=torch.float16),
    ...             pack_indices(torch.tensor([1, 0, 1]), 1), 1, None, (1, 3))
    >>> meta = make_meta(model_class="Toy", model_config={"model_type": "toy"}, dtype="float32",
    ...                  dkm_config=None, layers={"fc": layer_entry(p, torch.float32, False)},
    ...                  tied={})
    >>> folder = write_checkpoint(f"{tempfile.mkdtemp()}/ckpt", layer_tensors("fc", p), meta)
    >>> ckpt = read_checkpoint(folder)
    >>> ckpt.layers["fc"].palette.dense(torch.float32).tolist(), ckpt.tensors
    ([[1.0, 0.0, 1.0]], {})
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError, bits_error
from edkm.io import atomic
from edkm.nn.bitpack import packed_size
from edkm.nn.palette import Palette

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HF_CONFIG_FILE",
    "META_FILE",
    "TENSORS_FILE",
    "Checkpoint",
    "StoredLayer",
    "dtype_name",
    "hf_config",
    "layer_entry",
    "layer_tensors",
    "make_meta",
    "read_checkpoint",
    "write_checkpoint",
]

FORMAT = "edkm-palettized"
FORMAT_VERSION = 1
META_FILE = "palettization.json"
TENSORS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
_META_KEYS = ("model_class", "model_config", "layers", "tied", "dtype")


def dtype_name(dtype: torch.dtype) -> str:
    """The name a dtype is stored under: ``torch.bfloat16`` -> ``"bfloat16"``.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: object, file: Path) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"'{file}': unknown dtype {name!r}")
    return dtype


def layer_entry(palette: Palette, weight_dtype: torch.dtype, bias: bool) -> dict[str, Any]:
    """The layer map entry of one palettized layer in ``palettization.json``.

    Example:
        >>> p = Palette(torch.zeros(1, 4, dtype=torch.float16), torch.zeros(2, dtype=torch.uint8),
        ...             2, None, (2, 4))
        >>> layer_entry(p, torch.bfloat16, bias=False)
        {'bits': 2, 'group_size': None, 'shape': [2, 4], 'weight_dtype': 'bfloat16', 'bias': False}
    """
    return {
        "bits": palette.bits,
        "group_size": palette.group_size,
        "shape": list(palette.shape),
        "weight_dtype": dtype_name(weight_dtype),
        "bias": bias,
    }


def layer_tensors(name: str, palette: Palette) -> dict[str, torch.Tensor]:
    """The two tensors a palettized layer ``name`` is stored as: its LUT and packed indices.

    Example:
        >>> p = Palette(torch.zeros(1, 2, dtype=torch.float16), torch.zeros(1, dtype=torch.uint8),
        ...             1, None, (1, 3))
        >>> sorted(layer_tensors("fc", p))
        ['fc.lut', 'fc.packed_indices']
    """
    return {
        f"{name}.lut": palette.lut.to(torch.float16),
        f"{name}.packed_indices": palette.packed_indices,
    }


def make_meta(
    *,
    model_class: str,
    model_config: dict[str, Any],
    dtype: str,
    dkm_config: dict[str, Any] | None,
    layers: dict[str, dict[str, Any]],
    tied: dict[str, str],
    prepass: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The content of ``palettization.json`` (keys in the order version 1 writes them).

    Example:
        >>> list(make_meta(model_class="M", model_config={}, dtype="float32", dkm_config=None,
        ...                layers={}, tied={}))[:3]
        ['format', 'format_version', 'edkm_version']
    """
    import edkm

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edkm_version": str(edkm.__version__),
        "model_class": model_class,
        "model_config": model_config,
        "dtype": dtype,
        "dkm_config": dkm_config,
        "layers": layers,
        "tied": tied,
        "prepass": list(prepass or []),
    }


def hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint: its model config plus edkm's ``quantization_config``.

    Example:
        >>> meta = make_meta(model_class="LlamaForCausalLM", model_config={"model_type": "llama"},
        ...                  dtype="float32", dkm_config=None, layers={}, tied={})
        >>> config = hf_config(meta)
        >>> config["architectures"], sorted(config["quantization_config"])
        (['LlamaForCausalLM'], ['dkm_config', 'format_version', 'layers', 'prepass', 'quant_method'])
    """
    from edkm.prepass import FORMAT_VERSION as PREPASS_VERSION
    from edkm.prepass import QUANT_METHOD

    config = {k: v for k, v in meta["model_config"].items() if k != "quantization_config"}
    config["architectures"] = [meta["model_class"]]
    config["dtype"] = meta["dtype"]
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": PREPASS_VERSION,
        "prepass": list(meta.get("prepass", [])),
        "layers": meta["layers"],
        "dkm_config": meta["dkm_config"],
    }
    return config


def _check_replaceable(target: Path) -> None:
    """A checkpoint may replace an empty folder or another checkpoint, nothing else."""
    if target.exists():
        if not target.is_dir():
            raise InputError(f"'{target}' exists and is not a folder")
        if any(target.iterdir()) and not (target / META_FILE).is_file():
            raise InputError(
                f"'{target}' exists and is not a palettized checkpoint; refusing to replace it"
            )


def write_checkpoint(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``tensors`` and ``meta`` as the checkpoint folder ``path``, atomically.

    Tensors are stored as contiguous CPU copies; two that share memory are stored apart (as
    safetensors requires). See the module docstring for what may be replaced.

    Example:
        >>> import tempfile
        >>> meta = make_meta(model_class="M", model_config={}, dtype="float32", dkm_config=None,
        ...                  layers={}, tied={})
        >>> folder = write_checkpoint(f"{tempfile.mkdtemp()}/c", {"w": torch.ones(2)}, meta)
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors', 'palettization.json']
    """
    from safetensors.torch import save_file

    target = Path(path)
    stored: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()  # (storage pointer, offset)
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = (value.untyped_storage().data_ptr(), int(value.storage_offset()))
        if storage in seen:
            value = value.clone()
        seen.add(storage)
        stored[key] = value

    def write(folder: Path) -> None:
        save_file(stored, str(folder / TENSORS_FILE), metadata={"format": FORMAT})
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if meta.get("model_config", {}).get("model_type"):
            (folder / HF_CONFIG_FILE).write_text(json.dumps(hf_config(meta), indent=2) + "\n")

    _check_replaceable(target)
    atomic.write_dir(target, write)
    return target


@dataclasses.dataclass(frozen=True)
class StoredLayer:
    """One palettized layer as stored: its palette, decoded weight dtype and whether it has a bias."""

    palette: Palette
    weight_dtype: torch.dtype
    bias: bool


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A read and validated checkpoint folder.

    ``tensors`` holds every state_dict tensor that is not a palettized layer's LUT or indices,
    tied names included (they share the stored tensor); ``layers`` the palettized layers.
    """

    folder: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layers: dict[str, StoredLayer]
    dtype: torch.dtype

    @property
    def meta_file(self) -> Path:
        return self.folder / META_FILE

    @property
    def tensors_file(self) -> Path:
        return self.folder / TENSORS_FILE


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
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise InputError(f"'{file}': not an edkm palettized checkpoint (format {found!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"'{file}': format version {version!r} is not supported "
            f"(this edkm reads version {FORMAT_VERSION})"
        )
    for key in _META_KEYS:
        if key not in meta:
            raise InputError(f"'{file}': missing key {key!r}")
    kinds = {"model_class": str, "model_config": dict, "layers": dict, "tied": dict}
    for key, kind in kinds.items():
        if not isinstance(meta[key], kind):
            raise InputError(f"'{file}': {key!r} must be a {kind.__name__}")
    if not isinstance(meta.get("buffer_dtypes", {}), dict):
        raise InputError(f"'{file}': 'buffer_dtypes' must be a dict")
    from edkm.prepass import QUANT_METHOD, read_manifests

    # a checkpoint written before pre-passes existed has no "prepass" key: no manifests
    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": version,
        "prepass": meta.get("prepass", []),
    }
    meta["prepass"] = read_manifests({"quantization_config": qc}, file)
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


def _layout(name: str, info: object, file: Path) -> tuple[int, int | None, int, int]:
    """``(bits, group_size, out, in)`` of a layer map entry, checked."""
    if not isinstance(info, dict):
        raise InputError(f"'{file}': layer '{name}' entry is not an object")
    bits, group_size, shape = info.get("bits"), info.get("group_size"), info.get("shape")
    if bits_error(bits) is not None:
        raise InputError(f"'{file}': layer '{name}' has invalid bits {bits!r}")
    valid_shape = (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    )
    if not valid_shape:
        raise InputError(f"'{file}': layer '{name}' has invalid shape {shape!r}")
    assert isinstance(shape, list) and isinstance(bits, int)
    out_f, in_f = shape
    valid_group = group_size is None or (
        isinstance(group_size, int) and group_size > 0 and out_f % group_size == 0
    )
    if not valid_group:
        raise InputError(f"'{file}': layer '{name}' has invalid group_size {group_size!r}")
    if not isinstance(info.get("bias"), bool):
        raise InputError(f"'{file}': layer '{name}' has invalid bias {info.get('bias')!r}")
    return bits, group_size, out_f, in_f


def _stored_layer(
    name: str, info: Any, tensors: dict[str, torch.Tensor], folder: Path
) -> StoredLayer:
    bits, group_size, out_f, in_f = _layout(name, info, folder / META_FILE)
    weight_dtype = _parse_dtype(info.get("weight_dtype"), folder / META_FILE)
    file = folder / TENSORS_FILE
    lut = tensors.pop(f"{name}.lut", None)
    packed = tensors.pop(f"{name}.packed_indices", None)
    if lut is None or packed is None:
        raise InputError(f"'{file}': layer '{name}' has no LUT or no indices")
    groups = 1 if group_size is None else out_f // group_size
    if lut.dtype != torch.float16 or tuple(lut.shape) != (groups, 1 << bits):
        raise InputError(
            f"'{file}': layer '{name}' LUT is {lut.dtype} {tuple(lut.shape)}, "
            f"expected float16 {(groups, 1 << bits)}"
        )
    if not bool(torch.isfinite(lut).all()):
        raise InputError(f"'{file}': layer '{name}' LUT holds non-finite values")
    expected = packed_size(out_f * in_f, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise InputError(
            f"'{file}': layer '{name}' has {packed.numel()} index bytes, expected "
            f"{expected} (ceil({out_f}*{in_f}*{bits}/8))"
        )
    palette = Palette(lut, packed, bits, group_size, (out_f, in_f))
    return StoredLayer(palette, weight_dtype, bool(info["bias"]))


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate the checkpoint folder ``path`` (module docstring); errors name the file.

    Example:
        >>> read_checkpoint("no/such/folder")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: palettized checkpoint folder 'no/such/folder' does not exist
    """
    folder = Path(path)
    meta = _read_meta(folder)
    tensors = _read_tensors(folder)
    layers = {
        name: _stored_layer(name, info, tensors, folder) for name, info in meta["layers"].items()
    }
    for alias, canonical in meta["tied"].items():
        if not isinstance(canonical, str) or canonical not in tensors:
            raise InputError(
                f"'{folder / TENSORS_FILE}': tied tensor {alias!r} refers to missing {canonical!r}"
            )
        tensors[alias] = tensors[canonical]
    dtype = _parse_dtype(meta["dtype"], folder / META_FILE)
    return Checkpoint(folder, meta, tensors, layers, dtype)
