"""Coupled channel groups: weights that must be removed together for a block to stay valid.

Structured pruning (:mod:`edkm.prepass.prune`) removes whole channels. Removing one output
channel of a Linear layer also removes an input channel of every layer that reads it, and for
attention the unit is a whole head. A :class:`GroupSet` describes every group of one kind in one
block at once: group ``g`` covers, in each member layer (a :class:`Slot`), the channels
``g * width .. (g + 1) * width - 1`` along that slot's axis (``0``: output rows, ``1``: input
columns). The adapter of a model family writes its groups by hand
(:meth:`edkm.adapters.llama.LlamaAdapter.coupled_groups`); a test cross-checks them against a
dependency graph traced by torch-pruning.

Example:
    >>> s = GroupSet("mlp", 0, 4, (Slot("mlp.gate_proj", 0, 1), Slot("mlp.down_proj", 1, 1)))
    >>> s.channels(s.members[1], [1, 3])
    [1, 3]
    >>> a = GroupSet("attention", 0, 2, (Slot("self_attn.q_proj", 0, 32),))
    >>> a.channels(a.members[0], [1])[:2], len(a.channels(a.members[0], [1]))
    ([32, 33], 32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["GroupSet", "Slot"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """One member layer of a group kind: its path in the block, the axis pruned, the channels
    one group covers along that axis (consecutive)."""

    path: str
    axis: int  # 0: output channels (weight rows, bias); 1: input channels (weight columns)
    width: int


@dataclasses.dataclass(frozen=True)
class GroupSet:
    """All ``count`` groups of one kind (``"attention"`` or ``"mlp"``) in block ``block``."""

    kind: str
    block: int
    count: int
    members: tuple[Slot, ...]

    def channels(self, slot: Slot, groups: Sequence[int]) -> list[int]:
        """The channels of ``slot`` (along its axis) that ``groups`` cover, in order."""
        return [g * slot.width + j for g in groups for j in range(slot.width)]

    def size(self, slot: Slot) -> int:
        """Channels of ``slot`` along its axis (all groups)."""
        return self.count * slot.width
