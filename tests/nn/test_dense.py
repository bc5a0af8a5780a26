"""Tests for edkm.nn.dense: the plain nn.Linear form of finalized layers and the way back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edkm
from edkm.errors import InputError
from edkm.nn.dense import dense_palettes, densify_, undensify_
from edkm.nn.palettized_linear import PalettizedLinear
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))


def _finalized() -> nn.Module:
    model = make_tiny_llama()
    edkm.palettize_(model, edkm.DKMConfig(method="reference", bits=2))
    return edkm.finalize(model)


def test_densify_and_back_keep_every_weight_and_output():
    model = _finalized()
    names = [n for n, m in model.named_modules() if isinstance(m, PalettizedLinear)]
    weights = {n: model.get_submodule(n).weight for n in names}
    palettes = {n: model.get_submodule(n).to_palette() for n in names}
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert densify_(model) is model
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weights[name]), name
    recorded = dense_palettes(model)
    assert sorted(recorded) == sorted(names)
    assert all(torch.equal(recorded[n][1].lut, palettes[n].lut) for n in names)
    assert all(recorded[n][0] is model.get_submodule(n) for n in names)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, logits)
    assert undensify_(model) == len(names)
    assert dense_palettes(model) == {}
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, PalettizedLinear), name
        assert torch.equal(layer.lut, palettes[name].lut)
        assert torch.equal(layer.packed_indices, palettes[name].packed_indices)
        assert torch.equal(layer.weight, weights[name])


def test_a_changed_dense_weight_is_refused_and_a_trainable_lut_cannot_densify():
    model = _finalized()
    q = model.model.layers[0].self_attn.q_proj
    q.lut_trainable_(True)
    with pytest.raises(InputError, match=r"q_proj': its LUT is trainable; freeze it first"):
        densify_(model)
    q.lut_trainable_(False)
    densify_(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 3] *= 2
    with pytest.raises(
        InputError, match=r"layer 'model.layers.1.mlp.down_proj': its weight changed"
    ):
        undensify_(model)


def test_a_recorded_layer_replaced_since_is_left_out():
    model = densify_(_finalized())
    edkm.palettize_(model, edkm.DKMConfig(method="reference", bits=2))  # DKM layers again
    assert dense_palettes(model) == {}
    assert undensify_(model) == 0
