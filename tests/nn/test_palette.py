"""Tests for edkm.nn.palette: the shared value form of a finalized layer and its lookup."""

from __future__ import annotations

import pytest
import torch

from edkm.nn.bitpack import pack_indices
from edkm.nn.palette import Palette, lut_lookup


@pytest.mark.parametrize("group_size", [None, 1, 3])
def test_lookup_picks_each_rows_lut(group_size):
    gen = torch.Generator().manual_seed(0)
    groups = 1 if group_size is None else 6 // group_size
    lut = torch.randn(groups, 4, generator=gen)
    idx = torch.randint(0, 4, (6, 5), generator=gen, dtype=torch.uint8)
    out = lut_lookup(lut, idx, group_size)
    for r in range(6):
        g = 0 if group_size is None else r // group_size
        assert out[r].tolist() == [lut[g, int(i)].item() for i in idx[r]]


def test_palette_unpacks_and_decodes():
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 8, (4, 7), generator=gen, dtype=torch.uint8)
    lut = torch.randn(2, 8, generator=gen).half()
    palette = Palette(lut, pack_indices(idx, 3), 3, 2, (4, 7))
    assert torch.equal(palette.indices(), idx)
    dense = palette.dense(torch.bfloat16)
    assert dense.dtype == torch.bfloat16
    assert torch.equal(dense, lut_lookup(lut.to(torch.bfloat16), idx, 2))
