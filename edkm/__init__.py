"""edkm: memory-efficient train-time weight clustering (eDKM palettization) for LLMs.

The public API is loaded lazily so that ``import edkm`` stays light: it imports neither torch,
``transformers`` nor ``triton``, and never queries CUDA. It registers edkm's quantization
config with transformers (so ``AutoModelForCausalLM.from_pretrained`` loads edkm folders,
:mod:`edkm.export.hf_quantizer`) at once if transformers' quantizer registry is already
imported, else as soon as it is (an import hook, :func:`_install_hf_hook`).

Example:
    >>> import edkm
    >>> cfg = edkm.DKMConfig(bits=3)
    >>> cfg.bits
    3
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
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


_HF_REGISTRY = "transformers.quantizers.auto"


def _register_hf() -> None:
    # the module registers itself when it runs; importing it while it is being imported (it
    # imports the registry itself) returns the partial module, which registers at its end
    importlib.import_module("edkm.export.hf_quantizer")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' quantizer registry so that edkm's
    quantizer is registered right after that module runs (a post-import hook)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _HF_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader

                def exec_then_register(
                    module: ModuleType, exec_module: Any = loader.exec_module
                ) -> None:
                    exec_module(module)
                    try:
                        _register_hf()
                    except Exception as err:  # never break transformers itself
                        import warnings

                        warnings.warn(
                            f"edkm: from_pretrained support not registered: {err}", stacklevel=2
                        )

                loader.exec_module = exec_then_register  # type: ignore[method-assign]
                return spec
        return None


def _install_hf_hook() -> None:
    """Register with transformers now if its quantizer registry is loaded, else when it is."""
    if _HF_REGISTRY in sys.modules:
        _register_hf()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install_hf_hook()
