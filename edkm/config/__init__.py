"""Configs, one module per concern, all on the validated YAML-serialisable ``ConfigBase``.

- :mod:`edkm.config.base`: ``ConfigBase`` (type coercion, validation, dict/YAML) and ``ConfigError``
- :mod:`edkm.config.dkm`: ``DKMConfig`` (recipe section ``dkm``), ``LayerOverride``, ``LayerSpec``
- :mod:`edkm.config.train`: ``TrainConfig`` (``train``), ``LUTTuneConfig`` (``lut_tune``)
- :mod:`edkm.config.eval`: ``EvalConfig`` (``eval``)
- :mod:`edkm.config.offload`: ``OffloadConfig`` (``offload``: marshaling of saved tensors)
- :mod:`edkm.config.recipe`: ``Recipe``, a whole ``edkm compress`` run

Example:
    >>> from edkm.config import DKMConfig, Recipe
    >>> Recipe(dkm=DKMConfig(bits=4)).dkm.bits
    4
"""

from __future__ import annotations

from edkm.config.base import ConfigBase, ConfigError
from edkm.config.dkm import DKMConfig, LayerOverride, LayerSpec
from edkm.config.eval import EvalConfig
from edkm.config.offload import OffloadConfig
from edkm.config.recipe import Recipe
from edkm.config.train import LUTTuneConfig, TrainConfig

__all__ = [
    "ConfigBase",
    "ConfigError",
    "DKMConfig",
    "EvalConfig",
    "LUTTuneConfig",
    "LayerOverride",
    "LayerSpec",
    "OffloadConfig",
    "Recipe",
    "TrainConfig",
]
