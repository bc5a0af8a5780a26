"""The four per-weight operations of the uniquified DKM, as ``torch.library`` custom ops.

The uniquified DKM (``edkm.dkm.unique``) touches the N weights only in four passes; everything
else runs on the (G, 65536) table. Each pass is one custom op, so ``torch.compile``, FSDP2 and
``make_fx`` see it as a single op, and each picks its implementation by its ``backend`` argument:

- ``edkm::bit_histogram(weight, groups, backend, chunk)``: (G, 65536) int32 count of each 16-bit
  pattern per LUT group;
- ``edkm::gather_table(table, weight, groups, backend, chunk)``: ``table[g, b_i]`` for every
  weight, in the table's dtype and the weight's shape (the soft weight ``T[b]``);
- ``edkm::scatter_bins(grad, weight, groups, backend, chunk)``: (G, 65536) fp32 sum of the
  upstream gradient over each pattern's weights (``G_u``);
- ``edkm::unique_grad(grad, weight, slope_path, groups, backend, chunk)``: the fused per-weight
  backward ``g_i * D[b_i] + H[b_i]`` in the weight's dtype, from the interleaved (G, 65536, 2)
  fp32 table of ``[D, H]``.

``backend`` is ``"torch"`` (the chunked pure-PyTorch implementation below, the reference the
Triton kernels are held to) or ``"triton"`` (the kernels of :mod:`edkm.kernels.unique_triton`,
imported only then). Every op has a fake implementation (output shape and dtype only), so the
engine runs under ``FakeTensorMode`` and ``torch.compile`` with no data-dependent shape.

A weight's row is ``g * 65536 + pattern``, with ``pattern`` its 16-bit bit pattern (fp16 for
fp16 weights, else the weight rounded to bf16, to nearest even: the value the clustering sees).
``groups`` splits the flattened weight into that many equal consecutive parts (consecutive
output channels of a 2-D weight). Reads top to bottom: the torch implementation -> the custom
ops -> the functional API (checks arguments, resolves ``backend="auto"``).

Memory measurement: a dispatch-mode tracker (PyTorch's ``MemTracker``, real or under
``FakeTensorMode``) sees each op's output but not the torch implementation's block scratch
inside it (about 5 MiB at most, at ``CHUNK`` = 2^18 weights: int32 rows, a bf16 copy of fp32
weights, fp32 gradients, 8-byte [D, H] pairs), as for any other op's internal workspace;
``torch.cuda.max_memory_allocated`` counts it.

Example:
    >>> import torch
    >>> w = (torch.randn(32, 16) * 0.02).to(torch.bfloat16)
    >>> bit_histogram(w).sum().item()
    512
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from edkm.kernels._common import BINS, KERNEL_DTYPES, SIXTEEN_BIT, resolve_backend

__all__ = [
    "CHUNK",
    "bit_histogram",
    "block_rows",
    "gather_table",
    "scatter_bins",
    "unique_grad",
]

# Weights per block in the torch passes: 2^18 keeps one block's int32 rows and fp32 gradients
# (1 MiB each) in L2, so each pass reads the weight once from memory.
CHUNK = 1 << 18


# ----------------------------------------------------------------------------------------------
# The torch implementation: N-sized passes, block by block
# ----------------------------------------------------------------------------------------------


def _blocks(groups: int, per_group: int, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks ``(g0, g1, m0, m1)`` of a (groups, per_group) view, about ``chunk`` weights each.

    Several whole groups per block when groups are small, else a slice of one group, so a
    block's rows are ``pattern + g * BINS`` with one broadcast offset per group.
    """
    if per_group >= chunk:
        for g in range(groups):
            for m0 in range(0, per_group, chunk):
                yield g, g + 1, m0, min(m0 + chunk, per_group)
    else:
        step = max(1, chunk // max(per_group, 1))
        for g0 in range(0, groups, step):
            yield g0, min(g0 + step, groups), 0, per_group


def block_rows(block: torch.Tensor, g0: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Table row ``g * 65536 + pattern`` of every weight in a (groups, m) block, int32.

    fp32 weights are rounded to bf16 first (the pattern the clustering sees). ``out`` is a
    reusable buffer of the block's shape (int64 when rows reach 2^31, beyond 32,767 groups).

    Example:
        >>> block_rows(torch.tensor([[1.0, -2.0]]).bfloat16(), 0).tolist()
        [[16256, 49152]]
    """
    if block.dtype not in SIXTEEN_BIT:
        block = block.to(torch.bfloat16)
    if out is None:
        big = (g0 + block.shape[0]) * BINS > torch.iinfo(torch.int32).max
        out = torch.empty(
            block.shape, dtype=torch.int64 if big else torch.int32, device=block.device
        )
    # Widen the signed int16 view and mask: a uint16 source has no vectorized copy on CPU
    # (measured ~10x slower); both steps stay in cache when the block does.
    rows = out.copy_(block.view(torch.int16)).bitwise_and_(0xFFFF)
    if g0 or block.shape[0] > 1:
        offsets = torch.arange(g0, g0 + block.shape[0], device=block.device, dtype=rows.dtype)
        rows.add_(offsets.mul_(BINS).unsqueeze(1))
    return rows


class _Blocks:
    """Blocks of a weight viewed as (groups, per_group), with one scratch buffer for the rows
    (and one for bf16 rounding of fp32 weights) reused by every block: fresh N- or block-sized
    allocations cost page faults that dominate these cheap passes."""

    def __init__(self, weight: torch.Tensor, groups: int, chunk: int) -> None:
        self.w = weight.detach().reshape(groups, -1)
        self.groups, self.per_group = groups, self.w.shape[1]
        self.spans = list(_blocks(groups, self.per_group, chunk))
        self.size = max(((g1 - g0) * (m1 - m0) for g0, g1, m0, m1 in self.spans), default=0)
        big = groups * BINS > torch.iinfo(torch.int32).max
        dev = weight.device
        self._rows = torch.empty(self.size, dtype=torch.int64 if big else torch.int32, device=dev)
        self._w16 = None
        if self.w.dtype not in SIXTEEN_BIT:
            self._w16 = torch.empty(self.size, dtype=torch.bfloat16, device=dev)

    def scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """A block-sized buffer for a pass's own temporaries."""
        return torch.empty(self.size, dtype=dtype, device=self.w.device)

    def __iter__(self) -> Iterator[tuple[slice, tuple[slice, slice], torch.Tensor]]:
        """``(flat slice, (group slice, column slice), rows)``; ``rows`` (flat, int) is
        overwritten by the next block: use it before advancing."""
        for g0, g1, m0, m1 in self.spans:
            shape = (g1 - g0, m1 - m0)
            n = shape[0] * shape[1]
            block = self.w[g0:g1, m0:m1]
            if self._w16 is not None:
                block = self._w16[:n].view(shape).copy_(block)  # round to nearest even
            rows = block_rows(block, g0, self._rows[:n].view(shape))
            start = g0 * self.per_group + m0
            yield slice(start, start + n), (slice(g0, g1), slice(m0, m1)), rows.view(-1)


def _grad_block(grad2d: torch.Tensor, span: tuple[slice, slice], buf: torch.Tensor) -> torch.Tensor:
    """The fp32 flat upstream gradient of one block (a view when it already is one)."""
    block = grad2d[span]
    if block.dtype == torch.float32 and block.is_contiguous():
        return block.reshape(-1)
    return buf[: block.numel()].view(block.shape).copy_(block).view(-1)


class TorchBins:
    """The chunked torch implementation of the four operations (the reference of the kernels).

    Memory beyond the output is one block: O(``chunk`` + table), never N-sized.
    """

    @staticmethod
    def histogram(weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
        # int32, not fp32: fp32 stops counting at 2^24, and one value (zeros of a pruned
        # layer) can occur more often than that
        counts = torch.zeros(groups * BINS, dtype=torch.int32, device=weight.device)
        blocks = _Blocks(weight, groups, chunk)
        one = torch.ones((), dtype=torch.int32, device=weight.device).expand(blocks.size)
        for _, _, rows in blocks:
            counts.index_add_(0, rows, one[: rows.numel()])
        return counts.view(groups, BINS)

    @staticmethod
    def gather(table: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
        flat_table = table.reshape(-1)
        out = torch.empty(weight.numel(), dtype=table.dtype, device=weight.device)
        for part, _, rows in _Blocks(weight, groups, chunk):
            torch.index_select(flat_table, 0, rows, out=out[part])
        return out.view(weight.shape)

    @staticmethod
    def scatter(grad: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor:
        out = torch.zeros(groups * BINS, dtype=torch.float32, device=weight.device)
        blocks = _Blocks(weight, groups, chunk)
        grad2d, buf = grad.reshape(groups, -1), blocks.scratch(torch.float32)
        for _, span, rows in blocks:
            out.index_add_(0, rows, _grad_block(grad2d, span, buf))
        return out.view(groups, BINS)

    @staticmethod
    def grad(
        grad: torch.Tensor, weight: torch.Tensor, slope_path: torch.Tensor, groups: int, chunk: int
    ) -> torch.Tensor:
        # D and H side by side: one 8-byte gather per weight instead of two 4-byte ones
        pair64 = slope_path.contiguous().view(torch.float64).view(-1)
        out = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
        blocks = _Blocks(weight, groups, chunk)
        grad2d, gbuf = grad.reshape(groups, -1), blocks.scratch(torch.float32)
        dh_buf = blocks.scratch(torch.float64)
        vbuf = None if weight.dtype == torch.float32 else blocks.scratch(torch.float32)
        for part, span, rows in blocks:
            n = rows.numel()
            g = _grad_block(grad2d, span, gbuf)
            dh = torch.index_select(pair64, 0, rows, out=dh_buf[:n]).view(torch.float32)
            dh = dh.view(n, 2)
            if vbuf is None:
                torch.addcmul(dh[:, 1], g, dh[:, 0], out=out[part])
            else:
                out[part].copy_(torch.addcmul(dh[:, 1], g, dh[:, 0], out=vbuf[:n]))
        return out.view(weight.shape)


class Bins(Protocol):
    """The four operations, as ``TorchBins`` and ``unique_triton.TritonBins`` implement them."""

    def histogram(self, weight: torch.Tensor, groups: int, chunk: int) -> torch.Tensor: ...

    def gather(
        self, table: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int
    ) -> torch.Tensor: ...

    def scatter(
        self, grad: torch.Tensor, weight: torch.Tensor, groups: int, chunk: int
    ) -> torch.Tensor: ...

    def grad(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        slope_path: torch.Tensor,
        groups: int,
        chunk: int,
    ) -> torch.Tensor: ...


def bins_for(backend: str) -> Bins:
    """The implementation behind a resolved ``backend`` ("torch" or "triton").

    Example:
        >>> type(bins_for("torch")).__name__
        'TorchBins'
    """
    if backend == "triton":
        from edkm.kernels.unique_triton import TritonBins  # imports triton

        return TritonBins()
    if backend == "torch":
        return TorchBins()
    raise ValueError(f"the per-weight ops take backend 'torch' or 'triton', got {backend!r}")


# ----------------------------------------------------------------------------------------------
# Custom ops: one op per pass, opaque to torch.compile / FSDP2, with fake (meta) shapes
# ----------------------------------------------------------------------------------------------


def _define(
    name: str, method: str, tensors: str, fake: Callable[..., torch.Tensor]
) -> torch.library.CustomOpDef:
    """Register ``edkm::<name>(<tensors>, int groups, str backend, int chunk) -> Tensor``.

    Its implementation is ``bins_for(backend).<method>(*tensors, groups, chunk)``; ``fake``
    gives the output's shape and dtype from ``(*tensors, groups)``, for FakeTensor / meta
    tensors and tracing (no data-dependent shapes).
    """
    schema = f"({tensors}, int groups, str backend, int chunk) -> Tensor"

    def impl(*args: Any) -> torch.Tensor:
        *inputs, groups, backend, chunk = args
        out: torch.Tensor = getattr(bins_for(backend), method)(*inputs, groups, chunk)
        return out

    op = torch.library.custom_op(f"edkm::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(lambda *args: fake(*args[:-2]))
    return op


_histogram_op = _define(
    "bit_histogram",
    "histogram",
    "Tensor weight",
    lambda weight, groups: weight.new_empty((groups, BINS), dtype=torch.int32),
)
_gather_op = _define(
    "gather_table",
    "gather",
    "Tensor table, Tensor weight",
    lambda table, weight, groups: weight.new_empty(weight.shape, dtype=table.dtype),
)
_scatter_op = _define(
    "scatter_bins",
    "scatter",
    "Tensor grad, Tensor weight",
    lambda grad, weight, groups: weight.new_empty((groups, BINS), dtype=torch.float32),
)
_grad_op = _define(
    "unique_grad",
    "grad",
    "Tensor grad, Tensor weight, Tensor slope_path",
    lambda grad, weight, slope_path, groups: weight.new_empty(weight.shape),
)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------


def _check(weight: torch.Tensor, groups: int, backend: str, chunk: int) -> str:
    """Check the arguments every op shares; returns the resolved backend."""
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if groups < 1 or weight.numel() % groups:
        raise ValueError(f"{groups} LUT group(s) do not divide the {weight.numel()} weights")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    resolved = resolve_backend(backend, weight)
    if resolved == "triton" and weight.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels take fp32, bf16 or fp16 weights, got {weight.dtype}")
    return resolved


def _check_like(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def bit_histogram(
    weight: Tensor, groups: int = 1, *, backend: str = "auto", chunk: int = CHUNK
) -> Tensor:
    """(G, 65536) int32 count of each 16-bit pattern in each LUT group (op ``edkm::bit_histogram``).

    Example:
        >>> w = torch.tensor([[1.0, 1.0], [2.0, 1.0]], dtype=torch.float16)
        >>> h = bit_histogram(w)
        >>> h[0, 0x3C00].item(), h[0, 0x4000].item()
        (3, 1)
    """
    resolved = _check(weight, groups, backend, chunk)
    return _histogram_op(weight.detach(), groups, resolved, chunk)


def gather_table(
    table: Tensor, weight: Tensor, groups: int = 1, *, backend: str = "auto", chunk: int = CHUNK
) -> Tensor:
    """``table[g, pattern(w_i)]`` in the weight's shape and the table's dtype (op
    ``edkm::gather_table``); the values are moved bit-exactly.

    Example:
        >>> t = torch.zeros(1, 65536); t[0, 0x3F80] = 5.0
        >>> gather_table(t, torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)).tolist()
        [[5.0, 0.0]]
    """
    resolved = _check(weight, groups, backend, chunk)
    _check_like("table", table, (groups, BINS))
    return _gather_op(table.detach().contiguous(), weight.detach(), groups, resolved, chunk)


def scatter_bins(
    grad: Tensor, weight: Tensor, groups: int = 1, *, backend: str = "auto", chunk: int = CHUNK
) -> Tensor:
    """(G, 65536) fp32 sum of ``grad`` over the weights of each table row (``G_u``; op
    ``edkm::scatter_bins``).

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.bfloat16)
        >>> scatter_bins(torch.tensor([[1.0, 2.0, 4.0]]), w)[0, 0x3F80].item()
        3.0
    """
    resolved = _check(weight, groups, backend, chunk)
    _check_like("grad", grad, tuple(weight.shape))
    return _scatter_op(grad.detach(), weight.detach(), groups, resolved, chunk)


def unique_grad(
    grad: Tensor,
    weight: Tensor,
    slope_path: Tensor,
    groups: int = 1,
    *,
    backend: str = "auto",
    chunk: int = CHUNK,
) -> Tensor:
    """The fused per-weight backward ``g_i * D[b_i] + H[b_i]`` in the weight's dtype (op
    ``edkm::unique_grad``).

    ``slope_path`` is (G, 65536, 2) fp32: the local slope D and the per-copy centroid-path
    gradient H of every table row, interleaved so that one 8-byte gather fetches both.

    Example:
        >>> w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
        >>> dh = torch.zeros(1, 65536, 2); dh[0, 0x3F80] = torch.tensor([2.0, 1.0])
        >>> unique_grad(torch.tensor([[3.0, 3.0]]), w, dh).tolist()
        [[7.0, 0.0]]
    """
    resolved = _check(weight, groups, backend, chunk)
    _check_like("grad", grad, tuple(weight.shape))
    _check_like("slope_path", slope_path, (groups, BINS, 2))
    if slope_path.dtype != torch.float32:
        raise ValueError(f"slope_path must be fp32, got {slope_path.dtype}")
    return _grad_op(
        grad.detach(), weight.detach(), slope_path.detach().contiguous(), groups, resolved, chunk
    )
