"""What a finalized layer is: a LUT per group of output channels plus one index per weight.

``Palette`` holds a finalized layer's fp16 LUT (G, 2**bits), its bit-packed indices and its
layout; ``lut_lookup`` builds the dense weight ``LUT[group(row), index]`` from them. Every
stage after ``finalize`` (LUT fine-tuning, export, reload) reads and writes this one form.

Example:
    >>> import torch
    >>> lut_lookup(torch.tensor([[0.0, 1.0]]), torch.tensor([[1, 0]]), None).tolist()
    [[1.0, 0.0]]
"""

from __future__ import annotations

import dataclasses

import torch

from edkm.nn.bitpack import unpack_indices

__all__ = ["Palette", "lut_lookup"]


def lut_lookup(lut: torch.Tensor, indices: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Dense weight ``LUT[group(row), index]`` for (out, in) ``indices`` and (G, K) ``lut``.

    Groups are ``group_size`` consecutive output channels (rows); ``None`` means one LUT.

    Example:
        >>> lut = torch.tensor([[0.0, 1.0], [10.0, 11.0]])
        >>> lut_lookup(lut, torch.tensor([[1, 0], [0, 1]]), group_size=1).tolist()
        [[1.0, 0.0], [10.0, 11.0]]
    """
    idx = indices.long()
    if group_size is None:
        return lut[0][idx]
    rows = torch.arange(idx.shape[0], device=idx.device) // group_size
    return lut[rows.unsqueeze(1), idx]


@dataclasses.dataclass
class Palette:
    """A finalized layer's LUT (fp16, (G, K)), packed indices and layout; see ``finalize``."""

    lut: torch.Tensor
    packed_indices: torch.Tensor
    bits: int
    group_size: int | None
    shape: tuple[int, int]

    def indices(self) -> torch.Tensor:
        """The uint8 (out, in) indices."""
        count = self.shape[0] * self.shape[1]
        return unpack_indices(self.packed_indices, self.bits, count).view(self.shape)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``LUT[indices]`` in ``dtype`` (fp16 LUT values converted once, as on reload)."""
        return lut_lookup(self.lut.to(dtype), self.indices(), self.group_size)
