"""Pre-passes that shrink a model before palettization, and the folder format they share.

A pre-pass (SliceGPT slicing, :mod:`edkm.prepass.slicegpt`; LLM-Pruner structured pruning,
:mod:`edkm.prepass.prune`) changes the architecture: widths may differ per layer and new small
Linear layers may appear. A stock Hugging Face config cannot say that, so every pre-pass
describes its change as a **manifest**, a JSON-able dict with a ``"kind"`` key, and provides
``restructure(model, manifest)``: given a freshly built stock model (real or on the meta
device), it changes the modules in place so that the state_dict keys and shapes become those
of the pre-passed model. Loading is then: build the stock model from ``config.json``, apply each
manifest in order, load the tensors (strict). Nothing is unpickled.

On disk a pre-passed model is a Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) whose ``config.json`` carries::

    "quantization_config": {"quant_method": "edkm", "format_version": 1,
                            "prepass": [manifest, ...]}

so ``transformers.AutoModelForCausalLM.from_pretrained`` loads it through edkm's registered
integration, and :func:`load_structured` (edkm's own loader) loads it without transformers'
quantizer machinery. Why by hand: neither SliceGPT's nor LLM-Pruner's reference code has a
loadable format (they pickle whole model objects), and transformers has no notion of per-layer
widths.

Example:
    >>> restructure(None, [{"kind": "nope"}])
    Traceback (most recent call last):
    ...
    edkm.errors.InputError: unknown pre-pass manifest kind 'nope'; known: prune, slicegpt
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError, first_line

__all__ = [
    "FORMAT_VERSION",
    "MANIFESTS_ATTR",
    "QUANT_METHOD",
    "is_structured_dir",
    "load_structured",
    "manifests_of",
    "parse_spec",
    "read_manifests",
    "record_manifest",
    "restructure",
    "run_prepass",
    "save_structured",
]

QUANT_METHOD = "edkm"
FORMAT_VERSION = 1
# the manifests applied to a model object, in order (read by the savers; not a tensor)
MANIFESTS_ATTR = "_edkm_prepass_manifests"
# manifest kind -> "module:function" that applies it (imported only when a manifest needs it)
_RESTRUCTURERS = {
    "prune": "edkm.prepass.prune:restructure",
    "slicegpt": "edkm.prepass.slicegpt:restructure",
}
# pre-pass name (as in ``edkm compress --prepass NAME:AMOUNT``) -> "module:function" running it
# as ``function(model, tokenizer, calib, amount, *, seed) -> (model, manifest)``, where ``calib``
# is an (n, seq_len) int64 tensor of token blocks from the training split (never held-out text)
# and the returned model is the shrunk one (the input model may be changed in place).
_RUNNERS = {
    "prune": "edkm.prepass.prune:run_prepass",
    "slice": "edkm.prepass.slicegpt:run_prepass",
}


def _resolve(target: str) -> Any:
    module, func = target.split(":")
    if importlib.util.find_spec(module) is None:
        raise InputError(f"{module} is not part of this edkm installation")
    return getattr(importlib.import_module(module), func)


def parse_spec(spec: object) -> tuple[str, float]:
    """``"NAME:AMOUNT"`` (as in ``edkm compress --prepass slice:0.25``) -> ``(name, amount)``.

    The name must be a known pre-pass whose module is installed; the amount a number in
    [0, 1) (the share of the model to remove).

    Example:
        >>> parse_spec("slice:0.25")
        ('slice', 0.25)
        >>> parse_spec("slice:1.5")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: pre-pass 'slice:1.5': the amount must be a number in [0, 1), got 1.5
    """
    name, sep, amount_text = str(spec).partition(":")
    if not isinstance(spec, str) or not sep:
        raise InputError(f"pre-pass {spec!r} must be written NAME:AMOUNT, e.g. 'slice:0.25'")
    if name not in _RUNNERS:
        raise InputError(f"unknown pre-pass {name!r}; known: {', '.join(sorted(_RUNNERS))}")
    module = _RUNNERS[name].split(":")[0]
    if importlib.util.find_spec(module) is None:
        raise InputError(f"pre-pass {name!r} is not available: {module} is not installed")
    try:
        amount = float(amount_text)
    except ValueError:
        amount = float("nan")
    if not 0 <= amount < 1:
        raise InputError(
            f"pre-pass {spec!r}: the amount must be a number in [0, 1), got {amount_text}"
        )
    return name, amount


def run_prepass(
    name: str,
    model: Any,
    tokenizer: Any,
    calib: torch.Tensor,
    amount: float,
    *,
    seed: int = 0,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run the pre-pass ``name`` (``"slice"`` or ``"prune"``): ``(shrunk model, manifest)``.

    ``options`` go to that pre-pass's runner as keywords (``prune``: ``recovery_steps``,
    ``on_pruned``; see :func:`edkm.prepass.prune.run_prepass`).

    Example:
        >>> run_prepass("squash", None, None, torch.zeros(1, 2), 0.2)
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: unknown pre-pass 'squash'; known: prune, slice
    """
    target = _RUNNERS.get(name)
    if target is None:
        raise InputError(f"unknown pre-pass {name!r}; known: {', '.join(sorted(_RUNNERS))}")
    model, manifest = _resolve(target)(model, tokenizer, calib, amount, seed=seed, **options)
    record_manifest(model, manifest)
    return model, manifest


def manifests_of(model: Any) -> list[dict[str, Any]]:
    """The pre-pass manifests applied to ``model`` so far, in order (``[]`` for a stock model).

    Example:
        >>> manifests_of(torch.nn.Linear(2, 2))
        []
    """
    return list(getattr(model, MANIFESTS_ATTR, []))


def record_manifest(model: Any, manifest: dict[str, Any]) -> None:
    """Note on ``model`` that ``manifest`` was applied (once: recording it again is a no-op).

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> m = {"kind": "slicegpt"}
        >>> record_manifest(layer, m); record_manifest(layer, m); manifests_of(layer)
        [{'kind': 'slicegpt'}]
    """
    done = manifests_of(model)
    if not any(m is manifest for m in done):
        object.__setattr__(model, MANIFESTS_ATTR, [*done, manifest])


def restructure(model: Any, manifests: Sequence[dict[str, Any]]) -> None:
    """Apply each manifest's structural change to ``model`` in place, in order.

    Example:
        >>> restructure(None, [])  # no manifest: nothing to do
    """
    for manifest in manifests:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        target = _RESTRUCTURERS.get(str(kind))
        if target is None:
            raise InputError(
                f"unknown pre-pass manifest kind {kind!r}; known: {', '.join(sorted(_RESTRUCTURERS))}"
            )
        _resolve(target)(model, manifest)
        record_manifest(model, manifest)


def read_manifests(config: dict[str, Any], file: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The pre-pass manifests in a config dict (``[]`` when it has none); ``file`` names errors.

    Example:
        >>> read_manifests({"quantization_config": {"quant_method": "edkm", "format_version": 1,
        ...                 "prepass": [{"kind": "prune"}]}}, "config.json")
        [{'kind': 'prune'}]
    """
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return []
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"'{file}': edkm format_version {version!r} is not supported (this edkm reads "
            f"{FORMAT_VERSION})"
        )
    manifests = qc.get("prepass", [])
    if not isinstance(manifests, list) or not all(
        isinstance(m, dict) and isinstance(m.get("kind"), str) for m in manifests
    ):
        raise InputError(f"'{file}': quantization_config.prepass must be a list of manifests")
    return manifests


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read '{file}': {first_line(err)}") from err
    if not isinstance(config, dict):
        raise InputError(f"'{file}' does not hold a JSON object")
    return config


def is_structured_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder whose ``config.json`` lists edkm pre-pass manifests.

    Example:
        >>> is_structured_dir("no/such/folder")
        False
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return False
    try:
        return bool(read_manifests(_read_config(folder), folder / "config.json"))
    except InputError:
        return True  # ours, but broken: let the loader report it


def save_structured(
    model: Any,
    out: str | os.PathLike[str],
    manifests: Sequence[dict[str, Any]],
    *,
    tokenizer: Any = None,
) -> Path:
    """Write a pre-passed model as a Hugging Face folder with its manifests (atomically).

    ``manifests`` are all structural changes made to the stock architecture, in order (for a
    model pruned after slicing: the slicing manifest, then the pruning one).

    Example:
        >>> save_structured(model, "out/sliced", [manifest], tokenizer=tok)  # doctest: +SKIP
    """
    from edkm.io import atomic

    manifests = [dict(m) for m in manifests]
    if not manifests:
        raise InputError("save_structured needs at least one pre-pass manifest")
    for m in manifests:
        if m.get("kind") not in _RESTRUCTURERS:
            raise InputError(f"unknown pre-pass manifest kind {m.get('kind')!r}")
        json.dumps(m)  # must be JSON-able; raises TypeError otherwise

    def write(tmp: Path) -> None:
        config = model.config
        previous = getattr(config, "quantization_config", None)
        config.quantization_config = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "prepass": manifests,
        }
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if previous is None:
                del config.quantization_config
            else:
                config.quantization_config = previous
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic.write_dir(out, write)
    return Path(out)


def load_structured(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Load a folder written by :func:`save_structured` (edkm's loader; no quantizer needed).

    Builds the stock architecture on the meta device, applies the manifests, then loads every
    tensor from ``*.safetensors`` with a strict key and shape check.

    Example:
        >>> model = load_structured("out/sliced")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from edkm.io.models import set_offline

    folder = Path(path).expanduser()
    config_dict = _read_config(folder)
    manifests = read_manifests(config_dict, folder / "config.json")
    set_offline()
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InputError(f"'{folder / 'config.json'}' has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"'{folder / 'config.json'}': {first_line(err)}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    restructure(model, manifests)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"'{folder}' holds no *.safetensors file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    expected = model.state_dict()
    tied = {k for k in expected if k not in state and _is_tied(model, k)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"'{folder}' does not match its manifests: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise InputError(
                f"'{folder}': tensor {key} has shape {tuple(tensor.shape)}, the manifests "
                f"say {tuple(expected[key].shape)}"
            )
    target = dtype or state[next(iter(state))].dtype
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # buffers that are not saved (rotary inv_freq) are recomputed on a real device
    _materialize_buffers(model, config)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _is_tied(model: Any, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key == "lm_head.weight"


def _materialize_buffers(model: Any, config: Any) -> None:
    for name, module in model.named_modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if hasattr(module, "rope_init_fn") or bname == "inv_freq":
                    fresh = type(module)(config=config)
                    for b2, v in fresh.named_buffers(recurse=False):
                        module.register_buffer(b2, v, persistent=False)
                    if hasattr(fresh, "original_inv_freq"):
                        module.original_inv_freq = fresh.original_inv_freq
                    break
                raise InputError(f"buffer {name}.{bname} was not saved and cannot be rebuilt")
