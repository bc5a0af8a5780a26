"""Chunked pure-PyTorch engine of the implicit-attention DKM (the CPU, memory-lean path).

It computes exactly what the Triton kernels of ``implicit_triton`` compute, one chunk of weights
at a time, so the N x K soft-assignment map only ever exists for one (G, chunk, K) tile and the
memory of a DKM step stays O(N + T*K). Chunk bounds depend on shapes only (no data-dependent
shapes), so the engine also runs under ``FakeTensorMode`` for memory measurement.

The engine API (shared with the Triton engine, see ``implicit.DKMEngine``); ``w`` is (G, n)
(the weights of each LUT group, or a 65,536-row table of bit-pattern values per group), ``mult``
an optional (G, n) multiplicity of each row (the histogram counts for a table), ``c`` (G, K)
centroids, ``tau`` (G,) temperatures:

- ``sums(w, mult, c, tau) -> (S0, S1)``: S0_j = sum_i m_i A_ij, S1_j = sum_i m_i A_ij w_i.
- ``soft(w, c, tau, out)``: out_i = sum_j A_ij c_j, written in ``out``'s dtype.
- ``backward_final(w, c, tau, g, out, scale_by_g) -> dc``: backward of ``soft`` for upstream g:
  ``out`` = g_i D_i (or the slope D_i = d what_i / d w_i alone), returns dL/dc.
- ``backward_update(w, mult, c, c_next, a, tau, acc) -> dc``: backward of one centroid update
  c_next = S1 / S0 for a_j = (dL/dc_next)_j / S0_j; adds each row's per-copy gradient to ``acc``.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.1, 0.9, 1.0]])
    >>> c = torch.tensor([[0.0, 1.0]])
    >>> s0, s1 = TorchEngine().sums(w, None, c, torch.tensor([0.01]))
    >>> [round(v, 3) for v in (s1 / s0)[0].tolist()]
    [0.05, 0.95]
"""

from __future__ import annotations

import torch

# Elements of one (G, chunk, K) tile: 2^20 fp32 elements = 4 MiB per live temporary.
TILE_ELEMENTS = 1 << 20


def chunk_rows(groups: int, n: int, k: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Rows per chunk so that one (groups, rows, k) tile holds about ``tile_elements``.

    Example:
        >>> chunk_rows(1, 10_000, 8, tile_elements=4096)
        512
    """
    return max(1, min(n, tile_elements // max(1, groups * k)))


def _attention(
    w: torch.Tensor, c: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _step(self, w: torch.Tensor, k: int) -> int:
        return chunk_rows(w.shape[0], w.shape[1], k, self.tile_elements)

    def sums(
        self, w: torch.Tensor, mult: torch.Tensor | None, c: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = torch.zeros_like(c, dtype=torch.float64)  # chunk totals add up in fp64
        s1 = torch.zeros_like(c, dtype=torch.float64)
        step = self._step(w, c.shape[1])
        for lo in range(0, w.shape[1], step):
            wc = w[:, lo : lo + step].to(c.dtype)
            a, _ = _attention(wc, c, tau)
            if mult is not None:
                a = a * mult[:, lo : lo + step].to(c.dtype).unsqueeze(-1)
            s0 += a.sum(1)
            s1 += (a * wc.unsqueeze(-1)).sum(1)
        return s0.to(c.dtype), s1.to(c.dtype)

    def soft(self, w: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, out: torch.Tensor) -> None:
        step = self._step(w, c.shape[1])
        for lo in range(0, w.shape[1], step):
            a, _ = _attention(w[:, lo : lo + step].to(c.dtype), c, tau)
            out[:, lo : lo + step] = (a * c.unsqueeze(1)).sum(-1).to(out.dtype)

    def backward_final(
        self,
        w: torch.Tensor,
        c: torch.Tensor,
        tau: torch.Tensor,
        g: torch.Tensor,
        out: torch.Tensor,
        scale_by_g: bool,
    ) -> torch.Tensor:
        dc = torch.zeros_like(c, dtype=torch.float64)  # chunk totals add up in fp64
        step = self._step(w, c.shape[1])
        scale = (2.0 / tau).view(-1, 1, 1)
        for lo in range(0, w.shape[1], step):
            a, d = _attention(w[:, lo : lo + step].to(c.dtype), c, tau)
            gc = g[:, lo : lo + step].to(c.dtype)
            what = (a * c.unsqueeze(1)).sum(-1, keepdim=True)
            # q_ij = dA-softmax term times dz/dc_j; dz/dw_i is its negative
            q = a * (c.unsqueeze(1) - what) * d * scale
            slope = -q.sum(-1)
            dc += (gc.unsqueeze(-1) * (a + q)).sum(1)
            out[:, lo : lo + step] = (gc * slope if scale_by_g else slope).to(out.dtype)
        return dc.to(c.dtype)

    def backward_update(
        self,
        w: torch.Tensor,
        mult: torch.Tensor | None,
        c: torch.Tensor,
        c_next: torch.Tensor,
        a_coef: torch.Tensor,
        tau: torch.Tensor,
        acc: torch.Tensor,
    ) -> torch.Tensor:
        dc = torch.zeros_like(c, dtype=torch.float64)  # chunk totals add up in fp64
        step = self._step(w, c.shape[1])
        scale = (2.0 / tau).view(-1, 1, 1)
        for lo in range(0, w.shape[1], step):
            wc = w[:, lo : lo + step].to(c.dtype)
            a, d = _attention(wc, c, tau)
            da = a_coef.unsqueeze(1) * (wc.unsqueeze(-1) - c_next.unsqueeze(1))
            dz = a * (da - (a * da).sum(-1, keepdim=True))
            q = dz * d * scale
            h = (a * a_coef.unsqueeze(1)).sum(-1) - q.sum(-1)
            if mult is not None:
                q = q * mult[:, lo : lo + step].to(c.dtype).unsqueeze(-1)
            dc += q.sum(1)
            acc[:, lo : lo + step] += h.to(acc.dtype)
        return dc.to(c.dtype)
