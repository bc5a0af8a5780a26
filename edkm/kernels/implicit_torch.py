"""Chunked pure-PyTorch engine of the implicit-attention DKM (the CPU, memory-lean path).

It computes exactly what the Triton kernels of ``implicit_triton`` compute, one chunk of weights
at a time, so the N x K soft-assignment map only ever exists for one (G, chunk, K) tile and the
memory of a DKM step stays O(N + T*K). Chunk bounds depend on shapes only (no data-dependent
shapes), so the engine also runs under ``FakeTensorMode`` for memory measurement.

The engine API (shared with the Triton engine, see ``implicit.DKMEngine``); ``w`` is (G, n)
(the weights of each LUT group), ``c`` (G, K) centroids, ``tau`` (G,) temperatures:

- ``sums(w, c, tau) -> (S0, S1)``: S0_j = sum_i A_ij, S1_j = sum_i A_ij w_i.
- ``soft(w, c, tau, out)``: out_i = sum_j A_ij c_j, written in ``out``'s dtype.
- ``backward_final(w, c, tau, g, out) -> dc``: backward of ``soft`` for upstream g: ``out`` =
  g_i D_i (D_i = d what_i / d w_i, the local slope), returns dL/dc.
- ``backward_update(w, c, c_next, a, tau, acc) -> dc``: backward of one centroid update
  c_next = S1 / S0 for a_j = (dL/dc_next)_j / S0_j; adds each row's gradient to ``acc``.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.1, 0.9, 1.0]])
    >>> c = torch.tensor([[0.0, 1.0]])
    >>> s0, s1 = TorchEngine().sums(w, c, torch.tensor([0.01]))
    >>> [round(v, 3) for v in (s1 / s0)[0].tolist()]
    [0.05, 0.95]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# Elements of one (G, chunk, K) tile: 2^20 fp32 elements = 4 MiB per live temporary.
TILE_ELEMENTS = 1 << 20


def chunk_rows(groups: int, n: int, k: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Rows per chunk so that one (groups, rows, k) tile holds about ``tile_elements``.

    Example:
        >>> chunk_rows(1, 10_000, 8, tile_elements=4096)
        512
    """
    return max(1, min(n, tile_elements // max(1, groups * k)))


def _attention(w: Tensor, c: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    # w (G, C) and c (G, K) in the compute dtype: returns A (G, C, K) and d = w - c.
    d = w.unsqueeze(-1) - c.unsqueeze(1)
    a = torch.softmax(-(d * d) / tau.view(-1, 1, 1), dim=-1)
    return a, d


class TorchEngine:
    """The chunked engine; computes in ``c``'s dtype (fp32, or fp64 for fp64 weights).

    Per-chunk reductions run in the compute dtype; the running totals across chunks are kept in
    fp64, so the result does not drift with the number of chunks.
    """

    def __init__(self, tile_elements: int = TILE_ELEMENTS) -> None:
        self.tile_elements = int(tile_elements)

    def _chunks(
        self, w: Tensor, c: Tensor, tau: Tensor
    ) -> Iterator[tuple[slice, Tensor, Tensor, Tensor]]:
        """``(columns, w chunk in the compute dtype, A, d)`` for each chunk of ``w``'s rows."""
        step = chunk_rows(w.shape[0], w.shape[1], c.shape[1], self.tile_elements)
        for lo in range(0, w.shape[1], step):
            cols = slice(lo, lo + step)
            wc = w[:, cols].to(c.dtype)
            yield (cols, wc, *_attention(wc, c, tau))

    def sums(self, w: Tensor, c: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        s0 = torch.zeros_like(c, dtype=torch.float64)  # chunk totals add up in fp64
        s1 = torch.zeros_like(c, dtype=torch.float64)
        for _, wc, a, _ in self._chunks(w, c, tau):
            s0 += a.sum(1)
            s1 += (a * wc.unsqueeze(-1)).sum(1)
        return s0.to(c.dtype), s1.to(c.dtype)

    def soft(self, w: Tensor, c: Tensor, tau: Tensor, out: Tensor) -> None:
        for cols, _, a, _ in self._chunks(w, c, tau):
            out[:, cols] = (a * c.unsqueeze(1)).sum(-1).to(out.dtype)

    def backward_final(self, w: Tensor, c: Tensor, tau: Tensor, g: Tensor, out: Tensor) -> Tensor:
        dc = torch.zeros_like(c, dtype=torch.float64)  # chunk totals add up in fp64
        scale = (2.0 / tau).view(-1, 1, 1)
        for cols, _, a, d in self._chunks(w, c, tau):
            gc = g[:, cols].to(c.dtype)
            what = (a * c.unsqueeze(1)).sum(-1, keepdim=True)
            # q_ij = dA-softmax term times dz/dc_j; dz/dw_i is its negative
            q = a * (c.unsqueeze(1) - what) * d * scale
            slope = -q.sum(-1)
            dc += (gc.unsqueeze(-1) * (a + q)).sum(1)
            out[:, cols] = (gc * slope).to(out.dtype)
        return dc.to(c.dtype)

    def backward_update(
        self, w: Tensor, c: Tensor, c_next: Tensor, a_coef: Tensor, tau: Tensor, acc: Tensor
    ) -> Tensor:
        dc = torch.zeros_like(c, dtype=torch.float64)  # chunk totals add up in fp64
        scale = (2.0 / tau).view(-1, 1, 1)
        for cols, wc, a, d in self._chunks(w, c, tau):
            da = a_coef.unsqueeze(1) * (wc.unsqueeze(-1) - c_next.unsqueeze(1))
            dz = a * (da - (a * da).sum(-1, keepdim=True))
            q = dz * d * scale
            h = (a * a_coef.unsqueeze(1)).sum(-1) - q.sum(-1)
            dc += q.sum(1)
            acc[:, cols] += h.to(acc.dtype)
        return dc.to(c.dtype)
