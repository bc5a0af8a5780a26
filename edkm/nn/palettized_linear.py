"""``PalettizedLinear``: a Linear layer stored as a fp16 LUT plus packed b-bit indices.

Example:
    >>> import torch
    >>> PalettizedLinear(8, 4, bits=2)(torch.zeros(1, 8)).shape
    torch.Size([1, 4])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edkm.nn.bitpack import packed_size, unpack_indices
from edkm.nn.palette import Palette, lut_lookup

__all__ = ["PalettizedLinear"]


class PalettizedLinear(nn.Module):
    """A Linear layer stored as a fp16 LUT plus packed b-bit indices, decoded in forward.

    Buffers: ``lut`` (G, 2**bits) fp16 and ``packed_indices`` (uint8). The weight is rebuilt as
    ``LUT[indices]`` in ``weight_dtype`` on every forward, so only the compressed form stays in
    memory. ``module.to(dtype)`` changes ``weight_dtype`` but keeps the LUT fp16 (converting it
    would round the stored centroids).

    Example:
        >>> layer = PalettizedLinear(8, 4, bits=2)
        >>> layer(torch.zeros(1, 8)).shape
        torch.Size([1, 4])
    """

    lut: torch.Tensor
    packed_indices: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        bias: bool = False,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if group_size is not None and out_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide {out_features} channels")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.weight_dtype = weight_dtype
        groups = 1 if group_size is None else out_features // group_size
        count = packed_size(in_features * out_features, bits)
        self.register_buffer(
            "lut", torch.zeros(groups, 1 << bits, dtype=torch.float16, device=device)
        )
        self.register_buffer("packed_indices", torch.zeros(count, dtype=torch.uint8, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device))
            if bias
            else None
        )

    def to_palette(self) -> Palette:
        """The LUT, packed indices and layout of this layer."""
        return Palette(
            lut=self.lut,
            packed_indices=self.packed_indices,
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.out_features, self.in_features),
        )

    def packed_bytes(self) -> int:
        """Bytes of the compressed weight: packed indices plus the fp16 LUT."""
        return self.packed_indices.numel() + 2 * self.lut.numel()

    def dense_fp16_bytes(self) -> int:
        """Bytes the same weight takes as a dense fp16 matrix."""
        return 2 * self.in_features * self.out_features

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) weight ``LUT[indices]`` in ``weight_dtype``."""
        count = self.in_features * self.out_features
        indices = unpack_indices(self.packed_indices, self.bits, count)
        indices = indices.view(self.out_features, self.in_features)
        return lut_lookup(self.lut.to(self.weight_dtype), indices, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a fresh tensor; editing it does not change the layer)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # Keep the LUT fp16 through .to(dtype)/.half()/.bfloat16(): follow only fn's device,
        # and let weight_dtype follow fn's dtype (probed on an empty tensor).
        lut = self.lut
        del self._buffers["lut"]
        try:
            super()._apply(fn, recurse)
            moved = fn(lut)
            probe = fn(torch.empty(0, dtype=self.weight_dtype, device=lut.device))
            self.weight_dtype = probe.dtype
            lut = lut.to(device=moved.device)
        finally:
            self._buffers["lut"] = lut
        return self

    def extra_repr(self) -> str:
        group = "per_tensor" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, {group}, "
            f"weight_dtype={self.weight_dtype}"
        )
