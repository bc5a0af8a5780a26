"""Tests for edkm.nn.palettized_linear: decoding, dtype moves, the LUT-trainable state, the
index cache, and the checks on what a layer is built from."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edkm.errors import InputError
from edkm.nn.bitpack import pack_indices
from edkm.nn.lut_gather import lut_gather_reference
from edkm.nn.palette import Palette, lut_lookup
from edkm.nn.palettized_linear import PalettizedLinear


def _layer(
    out_f: int = 6, in_f: int = 10, bits: int = 3, group_size: int | None = 2, seed: int = 0
) -> tuple[PalettizedLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size is None else out_f // group_size
    lut = torch.randn(groups, 1 << bits, generator=gen).half()
    idx = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    palette = Palette(lut, pack_indices(idx, bits), bits, group_size, (out_f, in_f))
    bias = torch.randn(out_f, generator=gen)
    return PalettizedLinear.from_palette(palette, bias=bias), idx


def test_palettized_linear_keeps_fp16_lut_through_dtype_moves():
    gen = torch.Generator().manual_seed(0)
    layer = PalettizedLinear(8, 4, bits=2, bias=True)
    layer.lut.copy_(torch.randn(1, 4, generator=gen).half())
    layer.packed_indices.copy_(torch.randint(0, 256, (8,), generator=gen, dtype=torch.uint8))
    lut = layer.lut.clone()
    dense32 = layer.weight
    layer.to(torch.bfloat16)
    assert layer.lut.dtype == torch.float16 and torch.equal(layer.lut, lut)
    assert layer.weight_dtype == torch.bfloat16 and layer.bias is not None
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight, lut.to(torch.bfloat16)[0][_unpacked(layer)])
    assert layer(torch.ones(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer.float()
    assert torch.equal(layer.weight, dense32)
    assert layer.packed_bytes() == 8 + 8 and layer.dense_fp16_bytes() == 64


def _unpacked(layer: PalettizedLinear) -> torch.Tensor:
    from edkm.nn.bitpack import unpack_indices

    return unpack_indices(layer.packed_indices, 2, 32).view(4, 8).long()


@pytest.mark.parametrize("group_size", [None, 2, 3])
def test_forward_decodes_lut_of_indices(group_size):
    layer, idx = _layer(group_size=group_size)
    expected = lut_lookup(layer.lut.float(), idx, group_size)
    assert torch.equal(layer.weight, expected) and torch.equal(layer.indices(), idx)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer(x), nn.functional.linear(x, expected, layer.bias))
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert sorted(layer.state_dict()) == ["bias", "lut", "packed_indices"]  # no index cache


def test_editing_the_decoded_weight_changes_nothing():
    layer, _ = _layer()
    before = layer.weight
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(layer.weight, before) and not layer.weight.requires_grad


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_lut_trainable_mode_trains_through_the_gather_and_freezes_like_bake(weight_dtype):
    layer, idx = _layer()
    layer.to(weight_dtype)
    frozen_weight = layer.weight
    lut16 = layer.lut.clone()
    assert layer.lut_trainable_(True) is layer
    assert layer.lut_trainable and isinstance(layer.lut, nn.Parameter)
    assert layer.lut.dtype == torch.float32 and torch.equal(layer.lut.detach(), lut16.float())
    assert sorted(layer.state_dict()) == ["bias", "lut", "packed_indices"]
    assert torch.equal(layer.weight, frozen_weight)  # the same forward as the frozen layer
    assert "lut=trainable fp32" in repr(layer)
    # the LUT gradient: each entry sums the gradients of the weights that use it
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(2), dtype=weight_dtype)
    layer(x).float().square().sum().backward()
    ref = layer.lut.detach().clone().requires_grad_(True)
    w = lut_gather_reference(ref, idx, layer.group_size, weight_dtype)
    w.retain_grad()
    nn.functional.linear(x, w, layer.bias).float().square().sum().backward()
    assert layer.lut.grad is not None and ref.grad is not None and w.grad is not None
    rows = (torch.arange(6) // 2).unsqueeze(1).expand(6, 10)
    oracle = torch.zeros(3, 8, dtype=torch.float64)
    oracle.index_put_((rows, idx.long()), w.grad.double(), accumulate=True)
    torch.testing.assert_close(layer.lut.grad.double(), oracle, rtol=1e-5, atol=1e-5)
    if weight_dtype == torch.float32:  # the reference accumulates in bf16 otherwise
        torch.testing.assert_close(layer.lut.grad, ref.grad, rtol=1e-5, atol=1e-5)
    # a trained LUT rounds to fp16 when frozen again; the indices never change
    with torch.no_grad():
        layer.lut.add_(1e-3)
    trained = layer.lut.detach().clone()
    layer.lut_trainable_(False)
    assert not layer.lut_trainable and "lut" in dict(layer.named_buffers())
    assert layer.lut.dtype == torch.float16 and torch.equal(layer.lut, trained.half())
    assert torch.equal(layer.indices(), idx)
    expected = lut_lookup(trained.half().to(weight_dtype), idx, layer.group_size)
    assert torch.equal(layer.weight, expected)


def test_trainable_lut_keeps_fp32_through_dtype_moves_and_overflow_is_an_error():
    layer, _ = _layer()
    layer.lut_trainable_(True)
    lut = layer.lut
    layer.to(torch.bfloat16)
    assert layer.lut is lut and layer.lut.dtype == torch.float32  # the optimizer's Parameter
    assert layer.weight_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lut[0, 0] = 1e6
    with pytest.raises(InputError, match=r"not finite in fp16"):
        layer.lut_trainable_(False)
    assert layer.lut_trainable  # left as it was


def test_autocast_decodes_in_the_autocast_dtype():
    layer, _ = _layer()
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    for trainable in (False, True):
        layer.lut_trainable_(trainable)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            y_ref = nn.functional.linear(x, layer.weight, layer.bias)  # autocast casts it
        assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)


def test_index_cache_follows_the_packed_indices():
    layer, idx = _layer()
    assert layer.index_cache is None  # built on first use
    first = layer.indices()
    assert layer.indices() is first  # cached
    flipped = (idx ^ 1).to(torch.uint8)
    layer.packed_indices.copy_(pack_indices(flipped, layer.bits))  # an in-place edit
    assert torch.equal(layer.indices(), flipped)
    other, other_idx = _layer(seed=5)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.indices(), other_idx) and torch.equal(layer.weight, other.weight)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.indices(), other_idx)


def test_without_the_index_cache_the_frozen_layer_keeps_only_the_packed_indices():
    _, idx = _layer()
    palette = _layer()[0].to_palette()
    layer = PalettizedLinear.from_palette(palette, cache_indices=False)
    assert torch.equal(layer.indices(), idx) and layer.index_cache is None
    layer.lut_trainable_(True)  # the gather needs the unpacked indices: kept while trainable
    assert layer.index_cache is not None
    layer.lut_trainable_(False)
    assert layer.index_cache is None


def test_from_palette_checks_what_it_is_given():
    layer, _ = _layer()
    palette = layer.to_palette()
    with pytest.raises(ValueError, match=r"the LUT must be float16 \(3, 8\)"):
        PalettizedLinear.from_palette(Palette(palette.lut.float(), *_rest(palette)))
    bad = Palette(palette.lut, palette.packed_indices[:-1], 3, 2, (6, 10))
    with pytest.raises(ValueError, match=r"6x10 indices of 3 bits need 23 bytes, got 22"):
        PalettizedLinear.from_palette(bad)
    with pytest.raises(ValueError, match=r"group_size 4 does not divide 6"):
        PalettizedLinear(10, 6, bits=3, group_size=4)
    with pytest.raises(InputError, match=r"bits must be an integer in 1..8, got 9"):
        PalettizedLinear(10, 6, bits=9)


def _rest(palette: Palette) -> tuple:
    return (palette.packed_indices, palette.bits, palette.group_size, palette.shape)


def test_repr_names_the_layout():
    layer, _ = _layer()
    text = repr(layer)
    assert "in_features=10, out_features=6, bias=True, bits=3, group_size=2" in text
    assert "lut=frozen fp16" in text and "weight_dtype=torch.float32" in text
