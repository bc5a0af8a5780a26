"""Pack b-bit indices (b = 1..8) densely into bytes, and back; vectorised torch, exact.

Layout: the indices form one little-endian bit stream. Index ``i`` occupies stream bits
``[i*b, (i+1)*b)``, least significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte
``k // 8``. N indices take exactly ``ceil(N*b/8)`` bytes; only the last byte can hold unused
(zero) bits. The layout does not depend on b dividing 8, so 3-, 5-, 6- and 7-bit indices cost no
padding.

Memory: both directions expand to one byte per bit (N*b bytes) in chunks of ``_CHUNK``
indices, so a 7B-model layer never needs more than a few tens of MB of scratch.

Example:
    >>> import torch
    >>> idx = torch.tensor([5, 1, 7, 0, 3], dtype=torch.uint8)
    >>> packed = pack_indices(idx, bits=3)
    >>> packed.numel()  # ceil(5 * 3 / 8)
    2
    >>> unpack_indices(packed, bits=3, count=5).tolist()
    [5, 1, 7, 0, 3]
"""

from __future__ import annotations

import torch

from edkm.errors import check_bits

__all__ = ["pack_indices", "packed_size", "unpack_indices"]

# A multiple of 8 indices, so every chunk starts on a byte boundary for every b.
_CHUNK = 1 << 22


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits take: ``ceil(count * bits / 8)``.

    Example:
        >>> packed_size(10, 3)
        4
    """
    check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices (any shape, flattened row-major) into a 1-D uint8 tensor.

    Every index must lie in ``[0, 2**bits)``; larger ones are an error (never truncated).

    Example:
        >>> pack_indices(torch.tensor([1, 0, 1, 1], dtype=torch.uint8), bits=1).tolist()
        [13]
    """
    check_bits(bits)
    flat = indices.reshape(-1)
    if flat.dtype.is_floating_point or flat.dtype.is_complex or flat.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {flat.dtype}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"indices must lie in [0, {1 << bits}) for {bits} bits, "
            f"got range [{int(flat.min())}, {int(flat.max())}]"
        )
    flat = flat.to(torch.uint8)
    out = torch.empty(packed_size(flat.numel(), bits), dtype=torch.uint8, device=flat.device)
    if bits == 8:
        out.copy_(flat)
        return out
    index_shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        stream = ((chunk.unsqueeze(1) >> index_shifts) & 1).reshape(-1)  # one byte per bit
        pad = (-stream.numel()) % 8  # only the last chunk can end inside a byte
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.view(-1, 8) << byte_shifts).sum(dim=1, dtype=torch.uint8)
        first = start * bits // 8  # exact: start is a multiple of 8
        out[first : first + packed.numel()] = packed
    return out


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` indices of ``bits`` bits from ``pack_indices`` output (1-D uint8).

    The byte count must be exactly ``packed_size(count, bits)``.

    Example:
        >>> unpack_indices(torch.tensor([13], dtype=torch.uint8), bits=1, count=4).tolist()
        [1, 0, 1, 1]
    """
    expected = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed indices must be a 1-D uint8 tensor, got {packed.dtype} "
            f"with shape {tuple(packed.shape)}"
        )
    if packed.numel() != expected:
        raise ValueError(
            f"{count} indices of {bits} bits need {expected} bytes, got {packed.numel()}"
        )
    if bits == 8:
        return packed.clone()
    out = torch.empty(count, dtype=torch.uint8, device=packed.device)
    index_shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk = packed[first : first + packed_size(n, bits)]
        stream = ((chunk.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: n * bits]
        out[start : start + n] = (stream.view(n, bits) << index_shifts).sum(
            dim=1, dtype=torch.uint8
        )
    return out
