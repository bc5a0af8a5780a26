"""``PalettizedLinear``: a Linear layer stored as a LUT plus packed b-bit indices (finalized).

This is the layer every stage after ``finalize`` works on (the whole lifecycle is drawn in
:mod:`edkm.nn.palettize`). The LUT and the bit-packed indices are the truth; the weight is
``LUT[group(row), index]``, decoded in forward, so a model never holds all its dense weights at
once. The layer has two states:

- **frozen** (what ``finalize`` and ``load_palettized`` give): ``lut`` is an fp16 buffer (G, 2**b).
  ``.to(dtype)`` changes the decoded weight's dtype (``weight_dtype``) but keeps the LUT fp16:
  converting it would round the stored centroids.
- **LUT trainable** (``layer.lut_trainable_(True)``, what ``edkm.train.lut_tune`` trains):
  ``lut`` is an fp32 ``nn.Parameter``; the weight is decoded by
  :func:`edkm.nn.lut_gather.lut_gather`, which passes each weight's gradient to its LUT entry.
  ``lut_trainable_(False)`` rounds the trained LUT to fp16 and freezes it again.

The unpacked uint8 indices are cached in the non-persistent buffer ``index_cache`` (1 byte per
weight: half of a dense fp16 weight, 8/b times the packed indices) because unpacking costs about
three times the lookup itself on every forward. ``cache_indices=False`` trades that speed for
memory in the frozen state; a LUT-trainable layer always keeps them (its gather saves them for
backward). The cache follows ``packed_indices``: an in-place edit or a ``load_state_dict``
rebuilds it.

Example:
    >>> import torch
    >>> layer = PalettizedLinear(8, 4, bits=2)
    >>> layer(torch.zeros(1, 8)).shape
    torch.Size([1, 4])
    >>> layer.lut_trainable_(True).lut.dtype, layer.lut_trainable_(False).lut.dtype
    (torch.float32, torch.float16)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edkm.errors import InputError, check_bits
from edkm.nn.bitpack import packed_size, unpack_indices
from edkm.nn.lut_gather import lut_gather
from edkm.nn.palette import Palette, lut_lookup

__all__ = ["PalettizedLinear"]


class PalettizedLinear(nn.Module):
    """A Linear layer stored as a LUT plus packed b-bit indices, decoded in forward.

    State: ``lut`` (G, 2**bits) — an fp16 buffer when frozen, an fp32 Parameter when LUT
    trainable — ``packed_indices`` (uint8 buffer, layout of :mod:`edkm.nn.bitpack`) and the
    optional ``bias`` Parameter. Build one from a :class:`~edkm.nn.palette.Palette` with
    :meth:`from_palette` (``finalize`` and ``load_palettized`` do); the constructor gives a
    zero LUT for a ``load_state_dict`` to fill.

    Example:
        >>> p = Palette(torch.tensor([[-1.0, 2.0]], dtype=torch.float16),
        ...             torch.tensor([0b101], dtype=torch.uint8), 1, None, (1, 3))
        >>> layer = PalettizedLinear.from_palette(p)
        >>> layer.weight.tolist(), layer(torch.ones(1, 3)).tolist()
        ([[2.0, -1.0, 2.0]], [[3.0]])
    """

    lut: torch.Tensor
    packed_indices: torch.Tensor
    index_cache: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        bias: bool = False,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        cache_indices: bool = True,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if group_size is not None and out_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide {out_features} channels")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.weight_dtype = weight_dtype
        self.cache_indices = cache_indices
        count = packed_size(in_features * out_features, bits)
        self.register_buffer(
            "lut", torch.zeros(self.num_groups, 1 << bits, dtype=torch.float16, device=device)
        )
        self.register_buffer("packed_indices", torch.zeros(count, dtype=torch.uint8, device=device))
        self.register_buffer("index_cache", None, persistent=False)
        self._cache_key: tuple[int, int] | None = None  # (id, version) of the unpacked tensor
        zeros = torch.zeros(out_features, dtype=weight_dtype, device=device) if bias else None
        self.bias = nn.Parameter(zeros) if zeros is not None else None

    @classmethod
    def from_palette(
        cls,
        palette: Palette,
        *,
        bias: torch.Tensor | None = None,
        weight_dtype: torch.dtype = torch.float32,
        indices: torch.Tensor | None = None,
        cache_indices: bool = True,
    ) -> PalettizedLinear:
        """A frozen layer on ``palette``'s tensors (no copies) and ``bias`` (kept as it is).

        ``indices``, the already unpacked (out, in) uint8 indices, seeds the index cache.

        Example:
            >>> p = Palette(torch.zeros(1, 4, dtype=torch.float16),
            ...             torch.zeros(2, dtype=torch.uint8), 2, None, (2, 4))
            >>> PalettizedLinear.from_palette(p, bias=torch.ones(2)).bias.tolist()
            [1.0, 1.0]
        """
        out_features, in_features = palette.shape
        layer = cls(
            in_features,
            out_features,
            palette.bits,
            palette.group_size,
            weight_dtype=weight_dtype,
            device="meta",
            cache_indices=cache_indices,
        )
        lut_shape = (layer.num_groups, 1 << palette.bits)
        if palette.lut.dtype != torch.float16 or tuple(palette.lut.shape) != lut_shape:
            raise ValueError(
                f"the LUT must be float16 {lut_shape}, got {palette.lut.dtype} "
                f"{tuple(palette.lut.shape)}"
            )
        if palette.packed_indices.shape != layer.packed_indices.shape:
            raise ValueError(
                f"{out_features}x{in_features} indices of {palette.bits} bits need "
                f"{layer.packed_indices.numel()} bytes, got {palette.packed_indices.numel()}"
            )
        layer.lut = palette.lut
        layer.packed_indices = palette.packed_indices
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        if indices is not None and cache_indices:
            layer._keep_indices(indices.to(torch.uint8).view(out_features, in_features))
        return layer

    @property
    def num_groups(self) -> int:
        """LUT groups G (1 per tensor, or out_features // group_size)."""
        return 1 if self.group_size is None else self.out_features // self.group_size

    @property
    def lut_trainable(self) -> bool:
        """True while the LUT is an fp32 Parameter (LUT fine-tuning), False when frozen fp16."""
        return isinstance(self.lut, nn.Parameter)

    def lut_trainable_(self, trainable: bool = True) -> PalettizedLinear:
        """Switch the LUT between frozen (fp16 buffer) and trainable (fp32 Parameter); in place.

        Freezing rounds the LUT to fp16, the checkpoint's LUT dtype, so the frozen layer is
        exactly what ``save_palettized`` writes and ``load_palettized`` rebuilds. A LUT entry
        that overflows fp16 is an ``InputError`` (the layer then stays trainable).

        Example:
            >>> layer = PalettizedLinear(4, 2, bits=1).lut_trainable_()
            >>> layer.lut_trainable, [n for n, _ in layer.named_parameters()]
            (True, ['lut'])
        """
        if trainable == self.lut_trainable:
            return self
        lut = self.lut.detach()
        if trainable:
            del self._buffers["lut"]
            self.lut = nn.Parameter(lut.float())
            self.indices()  # cached from now on: the gather saves them for backward
            return self
        frozen = lut.to(torch.float16)
        if not bool(torch.isfinite(frozen).all()):
            raise InputError("a trained LUT entry is not finite in fp16 (|c| > 65504)")
        del self._parameters["lut"]
        self.register_buffer("lut", frozen)
        if not self.cache_indices:
            self._drop_indices()
        return self

    def _cache_is_current(self) -> bool:
        packed = self.packed_indices
        return self.index_cache is not None and self._cache_key == (id(packed), packed._version)

    def indices(self) -> torch.Tensor:
        """The (out, in) uint8 indices, unpacked from ``packed_indices`` (cached, see module)."""
        if self._cache_is_current():
            assert self.index_cache is not None
            return self.index_cache
        count = self.in_features * self.out_features
        indices = unpack_indices(self.packed_indices, self.bits, count).view(
            self.out_features, self.in_features
        )
        if self.cache_indices or self.lut_trainable:
            self._keep_indices(indices)
        return indices

    def _keep_indices(self, indices: torch.Tensor) -> None:
        self.index_cache = indices
        self._cache_key = (id(self.packed_indices), self.packed_indices._version)

    def _drop_indices(self) -> None:
        self.index_cache = None
        self._cache_key = None

    def to_palette(self) -> Palette:
        """The layer as a ``Palette``; a trainable LUT is given as it would freeze (fp16)."""
        lut = self.lut.detach().to(torch.float16) if self.lut_trainable else self.lut
        return Palette(
            lut=lut,
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

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``LUT[indices]`` in ``dtype`` (default ``weight_dtype``); with a gradient to a
        trainable LUT, through the fast gather."""
        dtype = self.weight_dtype if dtype is None else dtype
        if self.lut_trainable:
            return lut_gather(self.lut, self.indices(), self.group_size, dtype)
        return lut_lookup(self.lut.to(dtype), self.indices(), self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a fresh tensor, no gradient; editing it does not change the layer)."""
        with torch.no_grad():
            return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = self.weight_dtype
        if torch.is_autocast_enabled(device_type):
            # the dtype the matmul would cast the weight to: decode into it directly
            dtype = torch.get_autocast_dtype(device_type)
        return F.linear(x, self.dense_weight(dtype), self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # Keep the LUT's dtype (fp16 frozen, fp32 trainable) through .to(dtype)/.half()/...:
        # the LUT (and its gradient) follow only fn's device; weight_dtype follows fn's dtype,
        # probed on an empty tensor.
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.lut.device))
        keep = {id(self.lut), id(self.lut.grad)} if self.lut.grad is not None else {id(self.lut)}

        def apply(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=probe.device) if id(t) in keep else fn(t)

        current = self._cache_is_current()
        super()._apply(apply, recurse)
        self.weight_dtype = probe.dtype
        if current and self.index_cache is not None:  # moved along with the packed indices
            self._keep_indices(self.index_cache)
        else:
            self._drop_indices()
        return self

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"bits={self.bits}",
            "per_tensor" if self.group_size is None else f"group_size={self.group_size}",
            f"lut={'trainable fp32' if self.lut_trainable else 'frozen fp16'}",
            f"weight_dtype={self.weight_dtype}",
        ]
        return ", ".join(parts)
