"""Tests for edkm.export.hf: describing a Hugging Face model and rebuilding it offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edkm.errors import InputError
from edkm.export.hf import build_model, describe_model
from tests.conftest import make_tiny_llama

META = Path("ckpt/palettization.json")


def test_rebuilds_the_same_architecture_from_the_description():
    model = make_tiny_llama(tie_word_embeddings=False)
    cls, config = describe_model(model)
    assert cls == "LlamaForCausalLM" and config["num_key_value_heads"] == 2
    rebuilt = build_model(cls, config, META)
    assert type(rebuilt) is type(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert not torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)  # fresh weights


def test_errors_name_the_metadata_file():
    with pytest.raises(InputError, match=r"needs a Hugging Face model with a config, got Linear"):
        describe_model(nn.Linear(2, 2))
    _, config = describe_model(make_tiny_llama())
    with pytest.raises(InputError, match=rf"'{META}': the model config has no model_type"):
        build_model(
            "LlamaForCausalLM", {k: v for k, v in config.items() if k != "model_type"}, META
        )
    with pytest.raises(InputError, match=rf"'{META}': cannot rebuild the model config"):
        build_model("LlamaForCausalLM", {"model_type": "no-such-architecture"}, META)
    with pytest.raises(InputError, match=rf"'{META}': unknown model class 'NoSuchModel'"):
        build_model("NoSuchModel", config, META)
