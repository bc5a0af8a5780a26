"""Load any model folder edkm understands: a Hugging Face folder, ``"default"``, or a
palettized checkpoint written by :func:`edkm.save_palettized` (which also holds the tokenizer
when written by ``edkm compress``).

Example:
    >>> model, tokenizer = load_any_model("default")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch

from edkm.models import load_model


def load_any_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face folder, ``"default"`` or a palettized folder."""
    return load_model(spec, dtype=dtype, device=device)
