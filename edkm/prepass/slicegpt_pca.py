"""The rotations of SliceGPT: PCA of the normalised residual signal, and random orthogonal ones.

SliceGPT (Ashkboos et al., ICLR 2024) rotates the residual stream of a transformer at each
norm by an orthogonal matrix Q whose columns are the principal directions of the signal the
norm sees, sorted by decreasing eigenvalue; slicing then keeps the first d columns. Here the
signal is the *normalised* one, ``x / rms(x)`` (the output of an RMSNorm whose weight was fused
into the following Linear layers), accumulated as ``C = sum_t x_t^T x_t`` in float64 over the
calibration tokens, padding masked out. ``C`` is damped by ``0.01 * mean(diag C)`` on its
diagonal (so that directions the calibration text never excites still get a well-defined
eigenvector), and ``torch.linalg.eigh`` gives the eigenvectors, reversed to descending order.

Why by hand: the reference code (microsoft/TransformerCompression) is not a library one can
call on a transformers model (it pickles its own model wrappers); the math is twenty lines.

Example:
    >>> import torch
    >>> acc = PCAAccumulator(3)
    >>> acc.add(torch.tensor([[[3.0, 0.1, 0.0], [-3.0, 0.0, 0.1]]]))
    >>> values, q = acc.finish()
    >>> q.dtype, bool(values[0] >= values[1] >= values[2]), round(abs(float(q[0, 0])), 3)
    (torch.float64, True, 1.0)
"""

from __future__ import annotations

import torch

from edkm.errors import InputError

__all__ = ["DAMPING", "PCAAccumulator", "random_orthogonal", "rms_normalize"]

DAMPING = 0.01  # times the mean diagonal of X^T X, added to its diagonal before eigh


def rms_normalize(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, in float64 (an RMSNorm of weight 1).

    Example:
        >>> rms_normalize(torch.tensor([[3.0, 4.0]])).pow(2).mean().item()
        1.0
    """
    x = x.to(torch.float64)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class PCAAccumulator:
    """Accumulates ``X^T X`` (float64) of ``(..., dim)`` signals and returns their principal axes.

    Example:
        >>> acc = PCAAccumulator(2)
        >>> acc.add(torch.ones(1, 3, 2), mask=torch.tensor([[1, 1, 0]]))
        >>> acc.tokens
        2
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (``(..., dim)``) whose ``mask`` (``x.shape[:-1]``) is nonzero."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"signal has {x.shape[-1]} channels, expected {self.dim}")
        rows = x.reshape(-1, self.dim).to(device="cpu", dtype=torch.float64)
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"mask shape {tuple(mask.shape)} != {tuple(x.shape[:-1])}")
            rows = rows[mask.reshape(-1).to("cpu") != 0]
        self.gram += rows.T @ rows
        self.tokens += rows.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eigenvalues, Q)``, both float64, eigenvalues descending, ``Q[:, i]`` the i-th axis."""
        if self.tokens == 0:
            raise InputError("SliceGPT calibration saw no token (all padding?)")
        gram = self.gram.clone()
        damp = DAMPING * gram.diagonal().mean()
        gram.diagonal().add_(damp)
        values, vectors = torch.linalg.eigh(gram)
        order = torch.arange(self.dim - 1, -1, -1)
        return values[order], vectors[:, order].contiguous()


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``(dim, dim)`` float64 matrix (Haar-distributed: QR with sign fix).

    Example:
        >>> q = random_orthogonal(4, torch.Generator().manual_seed(0))
        >>> torch.allclose(q @ q.T, torch.eye(4, dtype=torch.float64))
        True
    """
    g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
