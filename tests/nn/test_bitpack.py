"""Tests for edkm.nn.bitpack: exact b-bit packing, layout, sizes and errors."""

from __future__ import annotations

import pytest
import torch

import edkm.nn.bitpack as bitpack
from edkm.nn.bitpack import pack_indices, packed_size, unpack_indices

LENGTHS = [0, 1, 2, 7, 8, 9, 13, 255, 1001]


def _stream_reference(values: list[int], bits: int) -> list[int]:
    """The documented layout built with Python integers: index i at stream bits [i*b, (i+1)*b)."""
    total = 0
    for i, v in enumerate(values):
        total |= v << (i * bits)
    n_bytes = (len(values) * bits + 7) // 8
    return list(total.to_bytes(n_bytes, "little")) if n_bytes else []


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", LENGTHS)
def test_round_trip_and_size(bits, length):
    gen = torch.Generator().manual_seed(1000 * bits + length)
    idx = torch.randint(0, 1 << bits, (length,), generator=gen, dtype=torch.uint8)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (length * bits + 7) // 8 == packed_size(length, bits)
    assert torch.equal(unpack_indices(packed, bits, length), idx)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_matches_little_endian_bit_stream(bits):
    gen = torch.Generator().manual_seed(bits)
    idx = torch.randint(0, 1 << bits, (37,), generator=gen, dtype=torch.uint8)
    assert pack_indices(idx, bits).tolist() == _stream_reference(idx.tolist(), bits)


def test_unused_bits_of_last_byte_are_zero():
    idx = torch.full((3,), 7, dtype=torch.uint8)  # 9 bits: one bit in the second byte
    assert pack_indices(idx, 3).tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", [1, 3, 5, 7])
def test_chunked_path_matches(monkeypatch, bits):
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 1 << bits, (1003,), generator=gen, dtype=torch.uint8)
    whole = pack_indices(idx, bits)
    monkeypatch.setattr(bitpack, "_CHUNK", 16)
    chunked = pack_indices(idx, bits)
    assert torch.equal(chunked, whole)
    assert torch.equal(unpack_indices(chunked, bits, 1003), idx)


def test_accepts_other_integer_dtypes_and_shapes():
    idx = torch.tensor([[3, 0, 2], [1, 3, 3]], dtype=torch.int64)
    packed = pack_indices(idx, 2)
    assert torch.equal(unpack_indices(packed, 2, 6).view(2, 3), idx.to(torch.uint8))


def test_errors():
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\) for 3 bits"):
        pack_indices(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        pack_indices(torch.tensor([-1]), 2)
    with pytest.raises(ValueError, match=r"bits must be an integer in 1..8, got 9"):
        pack_indices(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match=r"bits must be an integer in 1..8, got 0"):
        packed_size(4, 0)
    with pytest.raises(ValueError, match=r"integer tensor"):
        pack_indices(torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match=r"10 indices of 3 bits need 4 bytes, got 3"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 3, 10)
    with pytest.raises(ValueError, match=r"1-D uint8"):
        unpack_indices(torch.zeros(4, dtype=torch.int8), 3, 10)
