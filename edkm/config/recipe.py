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
from edkm.config.offload import OffloadConfig
from edkm.config.train import LUTTuneConfig, TrainConfig

__all__ = ["Recipe"]


@dataclasses.dataclass(frozen=True)
class Recipe(ConfigBase):
    """A whole ``edkm compress`` run, as written in ``recipes/*.yaml``.

    Fields:
        model: a local Hugging Face folder or ``"default"``; data: a local text or data file, a
        folder, a saved dataset or ``"default"`` (:mod:`edkm.io.data`); text_column: the column
        (or ``.jsonl`` field) holding the text of data read through ``datasets``; eval_fraction: share of documents held out for evaluation; dkm, train,
        lut_tune, eval, offload: the configs of each concern (``offload``: marshaling of the
        DKM layers' saved tensors to host memory during training, off by default);
        prepass: pre-passes run before palettization, in order, each ``"NAME:AMOUNT"`` (e.g.
        ``"slice:0.25"``, SliceGPT at 25% sparsity; a single string is one pre-pass);
        prepass_calib_blocks: calibration blocks (of ``train.seq_len`` tokens, from the
        training split) the pre-passes see; prepass_recovery_steps: LoRA recovery steps after a
        ``prune`` pre-pass (on those blocks; 0: none).
    """

    model: str = "default"
    data: str = "default"
    text_column: str = "text"
    eval_fraction: float = 0.2
    dkm: DKMConfig = dataclasses.field(default_factory=DKMConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lut_tune: LUTTuneConfig = dataclasses.field(default_factory=LUTTuneConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    offload: OffloadConfig = dataclasses.field(default_factory=OffloadConfig)
    prepass: str | list[str] = dataclasses.field(default_factory=list)
    prepass_calib_blocks: int = 128
    prepass_recovery_steps: int = 50

    def validate(self) -> None:
        if not 0 < self.eval_fraction < 1:
            self._fail("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        if not self.text_column:
            self._fail("text_column", "must be a column name, got an empty string")
        from edkm.errors import InputError
        from edkm.prepass import parse_spec

        specs = [self.prepass] if isinstance(self.prepass, str) else list(self.prepass)
        for i, spec in enumerate(specs):
            try:
                parse_spec(spec)
            except InputError as err:
                self._fail(f"prepass[{i}]", str(err))
        object.__setattr__(self, "prepass", specs)
        if self.prepass_recovery_steps < 0:
            self._fail(
                "prepass_recovery_steps", f"must be at least 0, got {self.prepass_recovery_steps}"
            )
        if self.prepass_calib_blocks < 1:
            self._fail(
                "prepass_calib_blocks", f"must be at least 1, got {self.prepass_calib_blocks}"
            )

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
