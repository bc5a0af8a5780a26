"""Load any model folder edkm understands: a Hugging Face folder, ``"default"``, a pre-passed
(sliced or pruned) folder written by :func:`edkm.prepass.save_structured` (through
:func:`edkm.prepass.load_structured`), or a palettized folder written by
:func:`edkm.save_palettized` (``edkm compress`` also stores the tokenizer there), whose Linear
layers then decode their LUT on the fly.

Example:
    >>> model, tokenizer = load_any_model("runs/smollm2-3bit/model")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError
from edkm.io.models import DEFAULT_MODEL, load_model, set_offline


def is_palettized_dir(spec: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``save_palettized``."""
    from edkm.export.format import META_FILE

    return str(spec) != DEFAULT_MODEL and (Path(spec).expanduser() / META_FILE).is_file()


def load_any_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face folder, ``"default"`` or a palettized folder."""
    if not is_palettized_dir(spec):
        from edkm.prepass import is_structured_dir

        if str(spec) != DEFAULT_MODEL and is_structured_dir(Path(spec).expanduser()):
            return _load_structured(Path(spec).expanduser(), dtype=dtype, device=device)
        return load_model(spec, dtype=dtype, device=device)
    from edkm.export.palettized import load_palettized

    path = Path(spec).expanduser()
    set_offline()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"palettized folder '{spec}' holds no tokenizer (save one with "
            "tokenizer.save_pretrained next to save_palettized)"
        ) from err
    model = load_palettized(path, dtype=dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_structured(
    path: Path, *, dtype: torch.dtype | None, device: str | torch.device | None
) -> tuple[Any, Any]:
    from edkm.prepass import load_structured

    set_offline()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"pre-passed folder '{path}' holds no tokenizer") from err
    return load_structured(path, dtype=dtype, device=device), tokenizer
