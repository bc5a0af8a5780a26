"""Tests for edkm.eval.baselines: round-to-nearest and post-training k-means on the selected layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edkm.config import DKMConfig, LayerOverride
from edkm.errors import InputError
from edkm.eval.baselines import kmeans_, kmeans_lut, rtn_, rtn_weight
from edkm.nn.palettize import select_layers
from edkm.nn.palettized_linear import PalettizedLinear
from tests.conftest import make_tiny_llama

# one intra-op thread (tests/conftest.py): small tensors on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _groups(w: torch.Tensor, group_size: int | None) -> list[torch.Tensor]:
    if group_size is None:
        return [w.reshape(-1)]
    return [row[i : i + group_size] for row in w for i in range(0, w.shape[1], group_size)]


def _selected(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m, _ in select_layers(model, DKMConfig())}


@pytest.mark.parametrize("group_size", [None, 32, 48])  # 48: a shorter last group of 16
@pytest.mark.parametrize("bits", [2, 3])
def test_rtn_levels_and_error_bound(bits, group_size):
    model = make_tiny_llama()
    before = _selected(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    summary = rtn_(model, bits, group_size=group_size)
    assert summary.layers == list(before) and summary.bits == bits
    assert summary.num_params == sum(w.numel() for w in before.values())
    levels = (1 << bits) - 1
    for name, old in before.items():
        new = model.get_submodule(name).weight.detach()
        assert not torch.equal(new, old), name
        for g_old, g_new in zip(_groups(old, group_size), _groups(new, group_size)):
            assert g_new.unique().numel() <= 1 << bits
            lo, hi = min(float(g_old.min()), 0.0), max(float(g_old.max()), 0.0)
            step = (hi - lo) / levels
            # the zero point is rounded, so the grid can be off by up to half a step at the ends
            assert float((g_new - g_old).abs().max()) <= step * 1.0001
            # values on the grid are multiples of the step
            q = g_new / step
            assert torch.allclose(q, q.round(), atol=1e-3)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # not a selected layer


def test_rtn_error_falls_with_bits_and_groups():
    errs = {}
    for bits, group in [(2, None), (4, None), (4, 32)]:
        errs[(bits, group)] = rtn_(make_tiny_llama(), bits, group_size=group).weight_rel_error
    assert errs[(4, None)] < errs[(2, None)]
    assert errs[(4, 32)] < errs[(4, None)]
    assert all(e > 0 for e in errs.values())


def test_rtn_weight_keeps_zero_and_grid_points():
    w = torch.tensor([[0.0, 0.5, 1.0, 1.5, -1.5, 3.0, 0.25, -0.25]])
    out = rtn_weight(w, bits=2, group_size=4)
    # group [0, .5, 1, 1.5]: range [0, 1.5], step .5 -> exact
    assert out[0, :4].tolist() == [0.0, 0.5, 1.0, 1.5]
    assert out[0, 4:].unique().numel() <= 4
    zeros = torch.zeros(2, 4)
    assert torch.equal(rtn_weight(zeros, bits=1), zeros)
    half = w.to(torch.bfloat16)
    assert rtn_weight(half, bits=3).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeans_is_a_lloyd_fixed_point(dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 48, generator=gen).to(dtype)
    lut, idx = kmeans_lut(w, bits=3)
    assert lut.shape == (1, 8) and idx.shape == w.shape and idx.dtype == torch.uint8
    flat = w.reshape(-1).float()
    assign = idx.reshape(-1).long()
    assert torch.unique(assign).numel() == 8
    for j in range(8):
        members = flat[assign == j]
        if members.numel():
            torch.testing.assert_close(lut[0, j], members.double().mean().float())
    # each weight sits at its nearest centroid
    dist = (flat.unsqueeze(1) - lut[0]).abs()
    assert torch.equal(dist.gather(1, assign.unsqueeze(1)).squeeze(1), dist.min(1).values)


def test_kmeans_baseline_on_model_beats_rtn():
    model = make_tiny_llama()
    before = _selected(model)
    summary = kmeans_(model, 3)
    assert summary.method == "kmeans" and summary.layers == list(before)
    for name in before:
        assert model.get_submodule(name).weight.detach().unique().numel() <= 8, name
    rtn = rtn_(make_tiny_llama(), 3)
    assert summary.weight_rel_error < rtn.weight_rel_error
    assert "kmeans: 3 bits, per tensor, 14 layers" in str(summary)
    assert "bits/weight" in str(summary)


@pytest.mark.parametrize("group_size", [1, 4, 32])
def test_grouped_kmeans_is_a_lloyd_fixed_point_per_group(group_size):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 24, generator=gen).to(torch.bfloat16)
    lut, idx = kmeans_lut(w, bits=2, group_size=group_size)
    groups = 32 // group_size
    assert lut.shape == (groups, 4) and idx.shape == w.shape and idx.dtype == torch.uint8
    rows, assign = w.float().reshape(groups, -1), idx.reshape(groups, -1).long()
    for g in range(groups):
        for j in range(4):
            members = rows[g][assign[g] == j]
            if members.numel():
                torch.testing.assert_close(lut[g, j], members.double().mean().float())
        dist = (rows[g].unsqueeze(1) - lut[g]).abs()
        assert torch.equal(dist.gather(1, assign[g].unsqueeze(1)).squeeze(1), dist.min(1).values)
    # each group alone gives the same LUT as the grouped call (groups are independent)
    alone, _ = kmeans_lut(w[:group_size], bits=2, group_size=group_size)
    assert torch.equal(alone[:1], lut[:1])


def test_kmeans_uses_the_config_granularity_and_counts_lut_bits():
    cfg = DKMConfig(bits=3, granularity="per_grouped_channel", group_size=16)
    model = make_tiny_llama()
    before = _selected(model)
    grouped = kmeans_(model, 3, config=cfg)
    assert grouped.method == "kmeans_g16" and grouped.group_size == 16
    assert "3 bits, LUTs of 16 output channels, 14 layers" in str(grouped)
    for name in before:
        weight = model.get_submodule(name).weight.detach()
        for group in weight.reshape(-1, 16 * weight.shape[1]):
            assert group.unique().numel() <= 8, name
    per_tensor = kmeans_(make_tiny_llama(), 3)
    assert grouped.weight_rel_error < per_tensor.weight_rel_error
    # b + G * 2**b * 16 / N from the layer shapes
    n = sum(w.numel() for w in before.values())
    luts = sum(w.shape[0] // 16 for w in before.values()) * 8
    assert grouped.storage_bits == 3 * n + 16 * luts
    assert grouped.bits_per_weight == pytest.approx(3 + luts * 16 / n)
    assert per_tensor.bits_per_weight == pytest.approx(3 + len(before) * 8 * 16 / n)
    assert grouped.to_dict()["bits_per_weight"] == grouped.bits_per_weight


def test_kmeans_bits_per_weight_equals_shipped_palettized_layers():
    """The baseline's count is what finalize + save_palettized ship for the same layout."""
    import edkm

    cfg = DKMConfig(bits=3, method="reference", granularity="per_grouped_channel", group_size=32)
    summary = kmeans_(make_tiny_llama(), 3, config=cfg)
    model = make_tiny_llama()
    edkm.palettize_(model, cfg)
    edkm.finalize(model)
    layers = [m for m in model.modules() if isinstance(m, PalettizedLinear)]
    lut_bits = sum(m.lut.numel() * 16 for m in layers)
    index_bits = sum(m.out_features * m.in_features * m.bits for m in layers)
    assert summary.storage_bits == lut_bits + index_bits


def test_rtn_counts_scales_and_zero_points():
    model = make_tiny_llama()
    n = sum(w.numel() for w in _selected(model).values())
    rows = sum(w.shape[0] * -(-w.shape[1] // 48) for w in _selected(model).values())
    summary = rtn_(model, 3, group_size=48)  # 48: a shorter last group in 64-wide rows
    assert summary.storage_bits == 3 * n + (16 + 3) * rows
    per_tensor = rtn_(make_tiny_llama(), 3)
    assert per_tensor.storage_bits == 3 * n + (16 + 3) * 14


def test_baselines_follow_the_config_selection_and_bits():
    cfg = DKMConfig(
        bits=2, module_name_configs={r".*\.q_proj": None, r".*\.down_proj": LayerOverride(bits=4)}
    )
    model = make_tiny_llama()
    summary = rtn_(model, config=cfg)
    assert summary.bits is None and len(summary.layers) == 12
    assert "model.layers.0.self_attn.q_proj" not in summary.layers
    assert model.model.layers[0].mlp.down_proj.weight.unique().numel() > 4  # 4 bits here
    assert model.model.layers[0].mlp.up_proj.weight.unique().numel() <= 4


def test_errors():
    model = make_tiny_llama()
    with pytest.raises(InputError, match=r"bits must be an integer in 1..8, got 9"):
        rtn_(model, 9)
    with pytest.raises(InputError, match=r"bits must be an integer in 1..8, got 0"):
        kmeans_(model, 0)
    with pytest.raises(InputError, match=r"group_size must be at least 1"):
        rtn_(model, 3, group_size=0)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[1, 1] = float("nan")
    with pytest.raises(
        InputError, match=r"layer 'model.layers.0.mlp.gate_proj': weight has non-finite"
    ):
        kmeans_(model, 3)
