"""DKM kernels: the uniquified DKM's per-weight ops and the implicit-attention DKM.

The lowest layer of edkm's DKM: it imports no other edkm package (``edkm.dkm`` builds on it).

- :mod:`edkm.kernels._common`: ``BINS``, ``MIN_MASS``, LUT groups, temperatures, the
  ``backend`` word (``"auto"``, ``"torch"``, ``"triton"``);
- :mod:`edkm.kernels.unique`: the four per-weight passes of the uniquified DKM as
  ``torch.library`` custom ops (``edkm::bit_histogram``, ``edkm::gather_table``,
  ``edkm::scatter_bins``, ``edkm::unique_grad``), each with a chunked torch implementation and
  the Triton kernels of :mod:`edkm.kernels.unique_triton`;
- :mod:`edkm.kernels.implicit`: the implicit-attention DKM (FlashAttention-style, O(N + T*K)
  memory), with a chunked torch engine (:mod:`edkm.kernels.implicit_torch`) and Triton kernels
  (:mod:`edkm.kernels.implicit_triton`);
- :mod:`edkm.kernels.triton_ops`: ``@triton.jit`` building blocks (casts, in-register sort).

Importing this package imports neither Triton nor the ``@triton.jit`` modules and never queries
CUDA: those load on the first Triton launch (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), so tests can set the interpreter first.

Example:
    >>> import torch, edkm.kernels as K
    >>> w = torch.randn(16, 8)
    >>> soft, c = K.implicit_dkm(w, torch.tensor([[-1.0, 1.0]]), tau=0.5, iters=2)
    >>> soft.shape
    torch.Size([16, 8])
"""

from __future__ import annotations

from edkm.kernels.implicit import implicit_dkm
from edkm.kernels.unique import bit_histogram, gather_table, scatter_bins, unique_grad

__all__ = ["bit_histogram", "gather_table", "implicit_dkm", "scatter_bins", "unique_grad"]
