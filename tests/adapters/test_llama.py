"""Tests for the LLaMA adapter and get_adapter."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from edkm.adapters import HeadLayout, get_adapter
from edkm.adapters.llama import LlamaAdapter
from edkm.errors import InputError
from tests.conftest import make_tiny_llama

ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def test_causal_lm_layout(tiny_llama: Any) -> None:
    adapter = get_adapter(tiny_llama)
    assert isinstance(adapter, LlamaAdapter) and adapter.family == "llama"
    blocks = adapter.blocks()
    assert [name for name, _ in blocks] == ["model.layers.0", "model.layers.1"]
    assert blocks[1][1] is tiny_llama.model.layers[1]
    linears = adapter.block_linears(1)
    assert list(linears) == ROLES
    assert linears["k"] == (
        "model.layers.1.self_attn.k_proj",
        tiny_llama.get_submodule("model.layers.1.self_attn.k_proj"),
    )
    assert linears["down"][0] == "model.layers.1.mlp.down_proj"
    every = adapter.linear_layers()
    assert len(every) == 14
    for name, module in every:
        assert isinstance(module, nn.Linear)
        assert tiny_llama.get_submodule(name) is module
    names = {name for name, _ in every}
    all_linear = {n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    assert all_linear - names == {"lm_head"}  # the LM head is never a default target
    assert adapter.embedding() == ("model.embed_tokens", tiny_llama.model.embed_tokens)
    assert adapter.lm_head() == ("lm_head", tiny_llama.lm_head)
    assert adapter.final_norm() == ("model.norm", tiny_llama.model.norm)
    norms = adapter.block_norms(0)
    assert norms["input"] == (
        "model.layers.0.input_layernorm",
        tiny_llama.model.layers[0].input_layernorm,
    )
    assert norms["post_attention"][0] == "model.layers.0.post_attention_layernorm"
    assert adapter.tied_embeddings()
    assert adapter.config is tiny_llama.config


def test_head_layout_with_gqa(tiny_llama):
    layout = get_adapter(tiny_llama).head_layout(0)
    assert layout == HeadLayout(num_heads=4, num_kv_heads=2, head_dim=16)
    assert (layout.kv_groups, layout.q_dim, layout.kv_dim) == (2, 64, 32)
    mqa = get_adapter(make_tiny_llama(num_key_value_heads=1)).head_layout(1)
    assert (mqa.num_heads, mqa.num_kv_heads, mqa.kv_groups) == (4, 1, 4)


def test_head_layout_reads_shapes_not_config(tiny_llama):
    # a pre-pass that drops a key/value head changes the projections, not the config
    attn = tiny_llama.model.layers[0].self_attn
    attn.k_proj = nn.Linear(64, 16, bias=False)
    assert get_adapter(tiny_llama).head_layout(0).num_kv_heads == 1
    assert get_adapter(tiny_llama).head_layout(1).num_kv_heads == 2


def test_untied_model():
    model = make_tiny_llama(tie_word_embeddings=False)
    assert not get_adapter(model).tied_embeddings()


def test_bare_model_and_decoder_layer(tiny_llama):
    base = get_adapter(tiny_llama.model)
    assert [n for n, _ in base.blocks()] == ["layers.0", "layers.1"]
    assert base.lm_head() is None
    assert base.embedding() == ("embed_tokens", tiny_llama.model.embed_tokens)
    assert base.final_norm() == ("norm", tiny_llama.model.norm)
    assert base.linear_layers()[0][0] == "layers.0.self_attn.q_proj"
    layer = get_adapter(tiny_llama.model.layers[1])
    assert layer.blocks() == [("", tiny_llama.model.layers[1])]
    assert [n for n, _ in layer.linear_layers()][-1] == "mlp.down_proj"
    assert layer.embedding() is None and layer.lm_head() is None and layer.final_norm() is None
    assert not layer.tied_embeddings()
    assert layer.head_layout().num_heads == 4


def test_subclass_is_accepted(tiny_llama):
    class MyLlama(type(tiny_llama)):  # type: ignore[misc]
        pass

    tiny_llama.__class__ = MyLlama
    assert get_adapter(tiny_llama).lm_head() is not None


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(
        InputError, match=r"no edkm model adapter for Sequential; supported: LlamaForCausalLM"
    ):
        get_adapter(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(InputError, match=r"for Tensor"):
        get_adapter(torch.zeros(1))  # type: ignore[arg-type]
