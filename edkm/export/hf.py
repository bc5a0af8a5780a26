"""The Hugging Face side of a palettized checkpoint: describe a model, rebuild it offline.

``palettization.json`` stores the model's class name and its full config
(:func:`describe_model`); :func:`build_model` rebuilds that architecture from them with
``transformers.AutoConfig.for_model`` and ``from_config`` alone, so loading needs no hub access
and no original model folder. The rebuilt model has freshly initialised weights; the loader
then swaps in the palettized layers and loads every stored tensor over it.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> tiny = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                    num_hidden_layers=1, num_attention_heads=2)
    >>> cls, config = describe_model(LlamaForCausalLM(tiny))
    >>> cls, config["hidden_size"]
    ('LlamaForCausalLM', 8)
    >>> type(build_model(cls, config, Path("palettization.json"))).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.errors import InputError

__all__ = ["build_model", "describe_model"]


def describe_model(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(class name, full config dict)`` of a Hugging Face model; ``InputError`` for another.

    Example:
        >>> describe_model(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: save_palettized needs a Hugging Face model with a config, got Linear
    """
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_json_string"):
        raise InputError(
            f"save_palettized needs a Hugging Face model with a config, got {type(model).__name__}"
        )
    return type(model).__name__, json.loads(hf_config.to_json_string(use_diff=False))


def build_model(
    model_class: str, model_config: dict[str, Any], file: Path, dtype: torch.dtype | None = None
) -> nn.Module:
    """The architecture ``model_class`` with ``model_config``, freshly initialised, offline.

    ``file`` is the metadata file the two came from, named in every error. ``dtype`` is the
    dtype the model is built in (as ``from_pretrained(dtype=...)`` builds it: buffers that the
    model computes in fp32, such as the rotary frequencies, stay fp32).

    Example:
        >>> build_model("LlamaForCausalLM", {}, Path("palettization.json"))
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: 'palettization.json': the model config has no model_type
    """
    import transformers

    config_dict = dict(model_config)
    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InputError(f"'{file}': the model config has no model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError) as err:
        raise InputError(f"'{file}': cannot rebuild the model config ({err})") from None
    if model_class.endswith("ForCausalLM"):
        model: nn.Module = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        return model
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise InputError(f"'{file}': unknown model class {model_class!r}")
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        built: nn.Module = cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return built
