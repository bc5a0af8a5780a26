"""DKM tests share the kernel tests' fixtures (``tests/kernels/conftest.py``): the engine's
Triton backend runs compiled on CUDA, else in Triton's interpreter on CPU tensors (importing
that conftest sets ``TRITON_INTERPRET=1`` before any ``@triton.jit`` module is imported)."""

from __future__ import annotations

from tests.kernels.conftest import (  # noqa: F401  (pytest finds fixtures by name)
    device,
    error_rule,
    make_inputs,
    reference_dkm,
    run_dkm,
    triton_backend,
)
