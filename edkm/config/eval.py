"""How the report measures perplexity (``EvalConfig``, recipe section ``eval``).

Example:
    >>> EvalConfig(seq_len=256).max_windows
    16
"""

from __future__ import annotations

import dataclasses

from edkm.config.base import ConfigBase

__all__ = ["EvalConfig"]


@dataclasses.dataclass(frozen=True)
class EvalConfig(ConfigBase):
    """How the report measures perplexity (protocol in :mod:`edkm.eval.perplexity`).

    Fields:
        seq_len: tokens per window; max_windows: first N windows of the held-out text (0 = all);
        batch_size: windows per forward pass; baselines: also evaluate round-to-nearest
        (per tensor and per group of 128) and post-training k-means at the same bits.
    """

    seq_len: int = 512
    max_windows: int = 16
    batch_size: int = 4
    baselines: bool = True

    def validate(self) -> None:
        if self.seq_len < 2:
            self._fail("seq_len", f"must be at least 2, got {self.seq_len}")
        if self.max_windows < 0:
            self._fail("max_windows", f"must be >= 0 (0 = all windows), got {self.max_windows}")
        if self.batch_size < 1:
            self._fail("batch_size", f"must be at least 1, got {self.batch_size}")
