"""A whole ``edkm compress`` run (``Recipe``): model, data and one config per concern.

Example:
    >>> Recipe.from_yaml_str("dkm: {bits: 3}\\ntrain: {steps: 10}").train.steps
    10
"""

from __future__ import annotations

import dataclasses

from edkm.config.base import ConfigBase
from edkm.config.dkm import DKMConfig
from edkm.config.eval import EvalConfig
from edkm.config.train import LUTTuneConfig, TrainConfig

__all__ = ["Recipe"]


@dataclasses.dataclass(frozen=True)
class Recipe(ConfigBase):
    """A whole ``edkm compress`` run, as written in ``recipes/*.yaml``.

    Fields:
        model: a local Hugging Face folder or ``"default"``; data: a local text file/folder or
        ``"default"``; eval_fraction: share of documents held out for evaluation; dkm, train,
        lut_tune, eval: the configs of each concern.
    """

    model: str = "default"
    data: str = "default"
    eval_fraction: float = 0.2
    dkm: DKMConfig = dataclasses.field(default_factory=DKMConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lut_tune: LUTTuneConfig = dataclasses.field(default_factory=LUTTuneConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        if not 0 < self.eval_fraction < 1:
            self._fail("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")

    def with_overrides(self, **changes: object) -> Recipe:
        """A copy with dotted keys replaced, e.g. ``{"dkm.bits": 4, "train.steps": 10}``.

        Example:
            >>> Recipe().with_overrides(**{"dkm.bits": 4}).dkm.bits
            4
        """
        data = self.to_dict()
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return Recipe.from_dict(data)
