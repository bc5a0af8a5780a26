"""``LUTLinear``: a finalized layer whose LUT trains while its indices stay fixed.

The gradient of one LUT entry is the sum of the weight gradients of the weights that use it.
``lut_gather`` computes it with one ``bincount`` per layer (the fast path);
``lut_gather_reference`` is the same lookup in plain autograd indexing, and the tests hold the
fast path to it.

Example:
    >>> import torch
    >>> lut = torch.tensor([[-1.0, 0.5]], requires_grad=True)
    >>> idx = torch.tensor([[0, 1, 1]], dtype=torch.uint8)
    >>> w = lut_gather(lut, idx, None)
    >>> w.tolist()
    [[-1.0, 0.5, 0.5]]
    >>> w.sum().backward()
    >>> lut.grad.tolist()
    [[1.0, 2.0]]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edkm.errors import InputError
from edkm.nn.palette import Palette, lut_lookup

__all__ = ["LUTLinear", "lut_gather", "lut_gather_reference"]


def _flat_indices(indices: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """Indices into the flattened (G*K) LUT: ``group(row) * K + index``, int64 (out*in)."""
    idx = indices.long()
    if group_size is not None:
        rows = torch.arange(idx.shape[0], device=idx.device) // group_size
        idx = idx + (rows * k).unsqueeze(1)
    return idx.reshape(-1)


class _LUTGather(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        lut: torch.Tensor,
        indices: torch.Tensor,
        group_size: int | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        flat = _flat_indices(indices, lut.shape[1], group_size)
        # keep the layer's own (uint8) index buffer, not the int64 flat copy: saving costs
        # nothing more than the module already holds; backward rebuilds the flat indices
        ctx.save_for_backward(indices)
        ctx.group_size = group_size
        ctx.lut_shape = lut.shape
        # one gather from a (G*K)-entry table already in the output dtype
        return torch.take(lut.detach().to(out_dtype).reshape(-1), flat).view(indices.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        groups, k = ctx.lut_shape
        flat = _flat_indices(indices, k, ctx.group_size)
        # the gradient of a LUT entry sums the gradients of the weights that use it
        g = torch.bincount(flat, weights=grad.reshape(-1).float(), minlength=groups * k)
        return g.view(groups, k).to(torch.float32), None, None, None


def lut_gather(
    lut: torch.Tensor,
    indices: torch.Tensor,
    group_size: int | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense weight ``LUT[group(row), index]`` with a gradient to the (G, K) ``lut``.

    ``indices`` is the (out, in) integer index tensor; ``group_size`` output channels share a
    LUT (``None``: one LUT). The weight is written in ``out_dtype`` (default: the LUT's).
    Forward equals :func:`lut_gather_reference` exactly; the LUT gradient equals it to float
    summation order.

    Example:
        >>> lut = torch.tensor([[0.0, 1.0], [10.0, 11.0]])
        >>> lut_gather(lut, torch.tensor([[1, 0], [0, 1]]), group_size=1).tolist()
        [[1.0, 0.0], [10.0, 11.0]]
    """
    out = lut.dtype if out_dtype is None else out_dtype
    result: torch.Tensor = _LUTGather.apply(lut, indices, group_size, out)
    return result


def lut_gather_reference(
    lut: torch.Tensor,
    indices: torch.Tensor,
    group_size: int | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The same lookup as :func:`lut_gather` in plain autograd indexing (the reference).

    Example:
        >>> lut_gather_reference(torch.tensor([[2.0, 3.0]]), torch.tensor([[1, 1]]), None).tolist()
        [[3.0, 3.0]]
    """
    out = lut.dtype if out_dtype is None else out_dtype
    return lut_lookup(lut.to(out), indices, group_size)


class LUTLinear(nn.Module):
    """A finalized Linear layer whose LUT trains while its indices stay fixed.

    Parameters: ``lut`` (G, 2**bits) fp32 and the original ``bias``; buffer: ``indices``
    (out, in) uint8. Forward builds ``LUT[indices]`` in the autocast dtype (or the original
    weight's dtype) and applies it like ``nn.Linear``. Build it with :func:`swap_in_luts`.

    Example:
        >>> lin = nn.Linear(3, 2, bias=False)
        >>> lin.palette = Palette(torch.zeros(1, 2, dtype=torch.float16),
        ...     torch.zeros(1, dtype=torch.uint8), 1, None, (2, 3))
        >>> LUTLinear(lin)(torch.ones(1, 3)).tolist()
        [[0.0, 0.0]]
    """

    indices: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        palette = getattr(linear, "palette", None)
        if not isinstance(palette, Palette):
            raise InputError("LUT fine-tuning needs a finalized Linear layer (edkm.finalize)")
        device = linear.weight.device
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bits = palette.bits
        self.group_size = palette.group_size
        self.weight_dtype = linear.weight.dtype
        self.packed_indices = palette.packed_indices  # unchanged by tuning: reused when baking
        self.lut = nn.Parameter(palette.lut.to(device=device, dtype=torch.float32))
        self.register_buffer("indices", palette.indices().to(device))
        self.bias = linear.bias

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``LUT[indices]`` in ``dtype`` (default: the original weight's dtype)."""
        return lut_gather(self.lut, self.indices, self.group_size, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = self.weight_dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)  # the dtype the matmul would cast to
        return F.linear(x, self.dense_weight(dtype), self.bias)

    def extra_repr(self) -> str:
        group = "per_tensor" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, {group}"
        )
