"""edkm: memory-efficient train-time weight clustering (eDKM palettization) for LLMs.

The public API is loaded lazily so that ``import edkm`` stays light: it imports torch but
neither ``transformers`` nor ``triton``, and never queries CUDA.

Example:
    >>> import edkm
    >>> cfg = edkm.DKMConfig(bits=3)
    >>> cfg.bits
    3
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "DKMConfig": "edkm.config.dkm",
    "dkm_soft": "edkm.dkm.soft",
    "palettize_": "edkm.nn.palettize",
    "finalize": "edkm.nn.palettize",
    "save_palettized": "edkm.export.palettized",
    "load_palettized": "edkm.export.palettized",
    "PalettizedLinear": "edkm.nn.palettized_linear",
    "perplexity": "edkm.eval.perplexity",
    "TrainConfig": "edkm.config.train",
    "compress": "edkm.compress",
}

__all__ = [
    "DKMConfig",
    "PalettizedLinear",
    "TrainConfig",
    "compress",
    "dkm_soft",
    "finalize",
    "load_palettized",
    "palettize_",
    "perplexity",
    "save_palettized",
]

if TYPE_CHECKING:  # pragma: no cover
    from edkm.compress import compress
    from edkm.config import DKMConfig, TrainConfig
    from edkm.dkm.soft import dkm_soft
    from edkm.eval.perplexity import perplexity
    from edkm.export.palettized import load_palettized, save_palettized
    from edkm.nn.palettize import finalize, palettize_
    from edkm.nn.palettized_linear import PalettizedLinear


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edkm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
