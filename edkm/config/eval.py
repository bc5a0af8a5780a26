"""How the report measures perplexity (``EvalConfig``, recipe section ``eval``).

Example:
    >>> EvalConfig(seq_len=256).max_windows
    16
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from edkm.config.base import ConfigBase

__all__ = ["EvalConfig"]


@dataclasses.dataclass(frozen=True)
class EvalConfig(ConfigBase):
    """How the report measures perplexity (protocol in :mod:`edkm.eval.perplexity`).

    Fields:
        seq_len: tokens per window; max_windows: first N windows of the held-out text (0 = all);
        batch_size: windows per forward pass; baselines: also evaluate round-to-nearest
        (per tensor and per group of 128) and post-training k-means at the same bits.
        peer: ``"skm"`` also evaluates a data-aware post-training peer at the same bits and
        LUT layout, coremltools' sensitive k-means (:mod:`edkm.eval.peer`; needs the ``coreml``
        extra), on ``peer_calib_blocks`` training blocks; ``"none"`` (the default) skips it.
    """

    seq_len: int = 512
    max_windows: int = 16
    batch_size: int = 4
    baselines: bool = True
    peer: Literal["none", "skm"] = "none"
    peer_calib_blocks: int = 16

    def validate(self) -> None:
        if self.seq_len < 2:
            self._fail("seq_len", f"must be at least 2, got {self.seq_len}")
        if self.max_windows < 0:
            self._fail("max_windows", f"must be >= 0 (0 = all windows), got {self.max_windows}")
        if self.batch_size < 1:
            self._fail("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.peer_calib_blocks < 1:
            self._fail("peer_calib_blocks", f"must be at least 1, got {self.peer_calib_blocks}")
