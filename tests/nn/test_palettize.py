"""Tests for edkm.nn.palettize: wrapping, warm start, tau, modes, state_dict, finalize, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edkm
from edkm.config import DKMConfig, LayerOverride
from edkm.errors import InputError
from edkm.nn.palettize import (
    DKMLinear,
    Palette,
    PalettizedLinear,
    dkm_layers,
    finalize,
    finalized_layers,
    lut_lookup,
    palettize_,
    set_mode,
    set_tau_scale,
)
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
DECODER_LINEARS = 14


def _train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _distinct_per_group(weight: torch.Tensor, group_size: int | None) -> list[int]:
    rows = (
        weight.reshape(1, -1)
        if group_size is None
        else weight.reshape(-1, group_size * weight.shape[1])
    )
    return [int(row.unique().numel()) for row in rows]


def test_wraps_decoder_linears_and_keeps_parameter_names(tiny_llama):
    before = dict(tiny_llama.named_parameters())
    keys_before = set(tiny_llama.state_dict())
    summary = palettize_(tiny_llama, DKMConfig(method="reference", bits=3))
    layers = dict(dkm_layers(tiny_llama))
    assert len(layers) == summary.num_layers == DECODER_LINEARS
    assert "lm_head" not in layers and "model.embed_tokens" not in layers
    after = dict(tiny_llama.named_parameters())
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the very same Parameter objects
    new_keys = set(tiny_llama.state_dict()) - keys_before
    assert new_keys == {f"{n}.{b}" for n in layers for b in ("centroids", "tau_base")}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.centroids.shape == (1, 8) and q.centroids.dtype == torch.float32
    assert summary.num_params == sum(m.weight.numel() for m in layers.values())
    assert summary.model_params == sum(p.numel() for p in tiny_llama.parameters())
    text = str(summary)
    assert "model.layers.1.mlp.down_proj" in text and f"{DECODER_LINEARS} layers" in text
    assert summary.to_dict()["num_layers"] == DECODER_LINEARS


def test_tau_is_relative_to_group_variance(tiny_llama):
    cfg = DKMConfig(
        method="reference", bits=2, tau=0.1, granularity="per_grouped_channel", group_size=16
    )
    palettize_(tiny_llama, cfg)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    assert isinstance(layer, DKMLinear) and layer.num_groups == 128 // 16
    w = layer.weight.detach()
    expected = torch.stack([0.1 * w[g * 16 : (g + 1) * 16].var(unbiased=False) for g in range(8)])
    torch.testing.assert_close(layer.tau, expected, rtol=1e-5, atol=0)
    assert layer.centroids.shape == (8, 4)
    set_tau_scale(tiny_llama, 0.25)
    torch.testing.assert_close(layer.tau, 0.25 * expected, rtol=1e-5, atol=0)
    assert all(m.tau_scale == 0.25 for _, m in dkm_layers(tiny_llama))
    with pytest.raises(InputError, match=r"tau scale must be a finite number > 0"):
        set_tau_scale(tiny_llama, 0.0)


def test_training_moves_weights_and_warm_starts_centroids(tiny_llama):
    from edkm.dkm.soft import dkm_soft

    palettize_(tiny_llama, DKMConfig(method="reference", bits=2, iters=2))
    layer = tiny_llama.model.layers[1].mlp.gate_proj
    w0, c0 = layer.weight.detach().clone(), layer.centroids.clone()
    losses = _train(tiny_llama, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(layer.weight.detach(), w0)
    assert not torch.equal(layer.centroids, c0)
    # one more training forward starts from the stored centroids and stores DKM's new ones
    start = layer.centroids.clone()
    expected_soft, expected_c = dkm_soft(
        layer.weight.detach(), start, tau=layer.tau, iters=layer.iters, method=layer.method
    )
    soft = layer.soft_weight()
    torch.testing.assert_close(soft, expected_soft, rtol=0, atol=0)
    torch.testing.assert_close(layer.centroids, expected_c.detach(), rtol=0, atol=0)
    assert not layer.centroids.requires_grad
    # evaluation forwards never move the centroids
    tiny_llama.eval()
    stored = layer.centroids.clone()
    with torch.no_grad():
        tiny_llama(input_ids=IDS)
    assert torch.equal(layer.centroids, stored)


def test_gradients_reach_weights_through_dkm(tiny_llama):
    palettize_(tiny_llama, DKMConfig(method="reference", bits=3))
    tiny_llama.train()
    tiny_llama(input_ids=IDS, labels=IDS).loss.backward()
    for name, layer in dkm_layers(tiny_llama):
        assert layer.weight.grad is not None, name
        assert float(layer.weight.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches_plain_backward(tiny_llama, reentrant):
    import copy

    from torch.utils.checkpoint import checkpoint

    palettize_(tiny_llama, DKMConfig(method="reference", bits=2))
    layer = tiny_llama.model.layers[0].mlp.up_proj.train()
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    for _ in range(2):  # the second step starts from the centroids the first one stored
        layer(x).square().sum().backward()
        checkpoint(twin, x, use_reentrant=reentrant).square().sum().backward()
        assert torch.equal(layer.centroids, twin.centroids)
        assert twin.weight.grad is not None and layer.weight.grad is not None
        torch.testing.assert_close(twin.weight.grad, layer.weight.grad, rtol=0, atol=0)


def test_hard_mode_equals_finalize_and_soft_differs(tiny_llama):
    palettize_(tiny_llama, DKMConfig(method="reference", bits=2))
    _train(tiny_llama, 1)
    tiny_llama.eval()
    with torch.no_grad():
        soft = tiny_llama(input_ids=IDS).logits
        set_mode(tiny_llama, "hard")
        hard = tiny_llama(input_ids=IDS).logits
    for _, layer in dkm_layers(tiny_llama):
        assert layer.mode == "hard"
        assert max(_distinct_per_group(layer.hard_weight(), None)) <= 4
    assert not torch.equal(soft, hard)
    finalize(tiny_llama)
    with torch.no_grad():
        final = tiny_llama(input_ids=IDS).logits
    assert torch.equal(hard, final)
    with pytest.raises(InputError, match=r"mode must be 'soft' or 'hard'"):
        set_mode(tiny_llama, "dense")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cfg",
    [
        DKMConfig(method="reference", bits=3),
        DKMConfig(method="reference", bits=1, init="quantile"),
        DKMConfig(method="reference", bits=2, granularity="per_grouped_channel", group_size=8),
    ],
)
def test_finalize_gives_lut_weights(cfg):
    model = make_tiny_llama()
    keys = list(model.state_dict())
    palettize_(model, cfg)
    returned = finalize(model)
    assert returned is model
    assert not list(dkm_layers(model))
    layers = dict(finalized_layers(model))
    # no centroid buffers, no index cache in the state: each finalized weight is stored as its
    # LUT and packed indices, the names the checkpoint file uses
    expected = [k for k in keys if k.removesuffix(".weight") not in layers]
    expected += [f"{n}.{b}" for n in layers for b in ("lut", "packed_indices")]
    assert sorted(model.state_dict()) == sorted(expected)
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, PalettizedLinear):
            continue
        count += 1
        assert type(module) is PalettizedLinear and not module.lut_trainable, name
        palette = module.to_palette()
        assert isinstance(palette, Palette) and palette.lut.dtype == torch.float16
        assert palette.bits == cfg.bits and palette.group_size == cfg.group_size
        assert module.bits == cfg.bits and module.group_size == cfg.group_size
        assert palette.lut.shape == (
            cfg.global_spec().num_groups(module.out_features),
            1 << cfg.bits,
        )
        numel = module.out_features * module.in_features
        assert palette.packed_indices.numel() == (numel * cfg.bits + 7) // 8
        weight = module.weight.detach()
        assert torch.equal(weight, palette.dense(weight.dtype))
        assert torch.equal(
            weight, lut_lookup(palette.lut.float(), palette.indices(), cfg.group_size)
        )
        assert max(_distinct_per_group(weight, cfg.group_size)) <= 1 << cfg.bits
        # each weight sits on its nearest LUT entry (hard assignment)
        lut = palette.lut.float()
        groups = weight.reshape(lut.shape[0], -1)
        nearest = (groups.unsqueeze(-1) - lut.unsqueeze(1)).abs().min(-1).values
        assert torch.equal(nearest, torch.zeros_like(nearest))
    assert count == DECODER_LINEARS


def test_finalize_keeps_the_bias_parameter_and_the_training_flag():
    model = nn.Sequential(nn.Linear(16, 8, bias=True)).train()
    model[0] = DKMLinear(model[0], DKMConfig(method="reference", bits=2).global_spec(), "0")
    bias = model[0].bias
    hard = model[0].hard_weight()
    finalize(model)
    layer = model[0]
    assert isinstance(layer, PalettizedLinear) and layer.training
    assert layer.bias is bias  # the same Parameter object
    assert torch.equal(layer.weight, hard)
    # the unpacked indices of the hard assignment seed the index cache
    assert layer.index_cache is not None and torch.equal(layer.index_cache, layer.indices())


def test_state_dict_round_trip_restores_centroids_exactly(tiny_llama):
    cfg = DKMConfig(method="reference", bits=2, granularity="per_grouped_channel", group_size=16)
    palettize_(tiny_llama, cfg)
    _train(tiny_llama, 1)
    set_tau_scale(tiny_llama, 0.5)
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    other = make_tiny_llama(seed=1)
    palettize_(other, cfg)
    other.load_state_dict(state)
    set_tau_scale(other, 0.5)
    for (name, a), (_, b) in zip(dkm_layers(tiny_llama), dkm_layers(other)):
        assert torch.equal(a.centroids, b.centroids), name
        assert torch.equal(a.tau_base, b.tau_base), name
    tiny_llama.train()
    other.train()
    assert torch.equal(tiny_llama(input_ids=IDS).logits, other(input_ids=IDS).logits)


def test_overrides_select_and_skip_layers():
    model = make_tiny_llama(tie_word_embeddings=False)
    cfg = DKMConfig(
        bits=3,
        module_type_configs={"LlamaMLP": LayerOverride(bits=4)},
        module_name_configs={r".*\.v_proj": None, "lm_head": LayerOverride(bits=2)},
    )
    summary = palettize_(model, cfg)
    layers = dict(dkm_layers(model))
    assert summary.num_layers == DECODER_LINEARS - 2 + 1
    assert "model.layers.0.self_attn.v_proj" not in layers
    assert layers["lm_head"].bits == 2
    assert layers["model.layers.1.mlp.down_proj"].bits == 4
    assert layers["model.layers.1.self_attn.o_proj"].bits == 3


def test_bf16_autocast_and_bf16_weights():
    model = make_tiny_llama()
    palettize_(model, DKMConfig(bits=2))  # auto: the unique path on CPU, for fp32 weights
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.float32 and layer.weight.grad is not None
    assert layer.centroids.dtype == torch.float32 and bool(torch.isfinite(layer.centroids).all())
    half = make_tiny_llama().to(torch.bfloat16)
    palettize_(half, DKMConfig(bits=2))
    half.train()
    loss = half(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    layer = half.model.layers[0].mlp.up_proj
    assert layer.centroids.dtype == torch.float32 and layer.weight.grad is not None
    finalize(half)
    assert max(_distinct_per_group(half.model.layers[0].mlp.up_proj.weight.detach(), None)) <= 4


@pytest.mark.parametrize("method", ["unique", "reference"])
def test_autocast_soft_weight_equals_autocast_cast_of_fp32(method):
    # Under autocast DKM writes the soft weight in bf16 directly; it must equal what autocast
    # made of the fp32 soft weight, forward and backward, bit for bit.
    from edkm.dkm.soft import dkm_soft

    model = make_tiny_llama()
    palettize_(model, DKMConfig(bits=3, method=method))
    layer = model.model.layers[0].mlp.up_proj
    layer.eval()  # no warm-start store: both passes start from the same centroids
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    soft32, _ = dkm_soft(
        layer.weight, layer.centroids, tau=layer.tau, iters=layer.iters, method=method
    )
    assert soft32.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = torch.nn.functional.linear(x, soft32, layer.bias)
    assert torch.equal(y, y_ref)
    y_ref.float().square().sum().backward()
    assert torch.equal(grad, layer.weight.grad)


def _untouched(model: nn.Module) -> bool:
    return not list(dkm_layers(model))


def test_non_linear_target_is_an_error_naming_the_layer(tiny_llama):
    cfg = DKMConfig(method="reference", module_name_configs={"model.embed_tokens": LayerOverride()})
    with pytest.raises(
        InputError, match=r"layer 'model.embed_tokens' is a Embedding, not a Linear"
    ):
        palettize_(tiny_llama, cfg)
    assert _untouched(tiny_llama)


def test_tied_weight_is_an_error(tiny_llama):
    with pytest.raises(
        InputError, match=r"layer 'lm_head': its weight is tied to model.embed_tokens"
    ):
        palettize_(
            tiny_llama,
            DKMConfig(method="reference", module_name_configs={"lm_head": LayerOverride()}),
        )
    assert _untouched(tiny_llama)


def test_group_size_not_dividing_names_the_layer(tiny_llama):
    cfg = DKMConfig(method="reference", granularity="per_grouped_channel", group_size=48)
    with pytest.raises(
        InputError,
        match=r"layer 'model.layers.0.self_attn.q_proj': group_size 48 does not divide its 64",
    ):
        palettize_(tiny_llama, cfg)
    assert _untouched(tiny_llama)


def test_bad_bits_name_the_layer(tiny_llama):
    name = "model.layers.0.mlp.up_proj"
    with pytest.raises(
        InputError, match=rf"module_name_configs\['{name}'\].bits: must be an integer in 1..8"
    ):
        DKMConfig.from_dict({"module_name_configs": {name: {"bits": 9}}})
    cfg = DKMConfig(method="reference")
    object.__setattr__(cfg, "bits", 0)  # mutated after construction: checked again
    with pytest.raises(InputError, match=r"DKMConfig.bits: must be an integer in 1..8, got 0"):
        palettize_(tiny_llama, cfg)
    assert _untouched(tiny_llama)


def test_non_finite_weights_name_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.v_proj.weight[3, 5] = float("nan")
    with pytest.raises(
        InputError, match=r"layer 'model.layers.1.self_attn.v_proj': weight has 1 non-finite"
    ):
        palettize_(tiny_llama, DKMConfig(method="reference"))
    assert _untouched(tiny_llama)
    model = make_tiny_llama()
    palettize_(model, DKMConfig(method="reference"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.train()
    with pytest.raises(InputError, match=r"model.layers.0.mlp.down_proj"):
        model(input_ids=IDS)
    with pytest.raises(
        InputError, match=r"layer 'model.layers.0.mlp.down_proj': weight has 1 non-finite"
    ):
        finalize(model)


def test_palettizing_twice_is_an_error(tiny_llama):
    palettize_(tiny_llama)
    with pytest.raises(InputError, match=r"is already palettized"):
        palettize_(tiny_llama)


def test_unmatched_keys_warn(tiny_llama):
    cfg = DKMConfig(
        module_name_configs={"no_such_layer": None}, module_type_configs={"Conv2d": None}
    )
    with pytest.warns(UserWarning) as record:
        palettize_(tiny_llama, cfg)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "module_name_configs key 'no_such_layer' matches no layer",
        "module_type_configs key 'Conv2d' matches no layer",
    ]


def test_public_names_are_exported():
    assert edkm.palettize_ is palettize_ and edkm.finalize is finalize
