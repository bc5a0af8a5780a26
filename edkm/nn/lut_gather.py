"""The LUT lookup with a gradient to the LUT: the fast path and its reference, side by side.

``W = LUT[group(row), index]``. The gradient of one LUT entry is the sum of the weight gradients
of the weights that use it. :func:`lut_gather` computes it with one ``bincount`` per layer and
saves only the layer's own uint8 index tensor for backward (the fast path);
:func:`lut_gather_reference` is the same lookup in plain autograd indexing
(:func:`edkm.nn.palette.lut_lookup`), and the tests hold the fast path to it. A LUT-trainable
:class:`~edkm.nn.palettized_linear.PalettizedLinear` decodes its weight with :func:`lut_gather`.

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

from edkm.nn.palette import lut_lookup

__all__ = ["lut_gather", "lut_gather_reference"]


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
        # keep the layer's own (uint8) index tensor, not the int64 flat copy: saving costs
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
