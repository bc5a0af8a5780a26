"""Row shards and the three collectives of the sharded DKM, with a byte counter.

A weight of R rows is split along dim 0 the way FSDP2 and ``DTensor``'s ``Shard(0)`` split it
(``torch.chunk`` semantics): every rank but the last ones holds ``ceil(R / W)`` rows, the rest
fewer, possibly none. The collectives need equal-sized buffers, so the soft weight's shards are
padded to ``ceil(R / W)`` rows for the all-gather and the reduce-scatter, as FSDP2 pads its own.

:class:`Comm` is the process group the engine talks to: ``all_reduce`` (histogram counts, bin
sums), ``all_gather_rows`` (soft shards -> full soft weight for the matmul) and
``reduce_scatter_rows`` (full weight gradient -> this rank's rows, averaged over the ranks as
FSDP2 averages its gradients). Every call is counted (:class:`CommStats`) so the benchmark
reports the bytes each rank sends and receives, from the calls the engine really makes.

Example:
    >>> shard_rows(11008, 3, 2)
    (7340, 11008)
    >>> [shard_rows(4, 3, r) for r in range(3)]
    [(0, 2), (2, 4), (4, 4)]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Comm", "CommStats", "shard_rows", "shard_size"]


def shard_size(rows: int, world: int) -> int:
    """Rows of the largest shard (the padded size of every shard in the collectives).

    Example:
        >>> shard_size(11008, 3), shard_size(10, 5)
        (3670, 2)
    """
    return -(-rows // world) if rows else 0


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s rows: ``torch.chunk`` / FSDP2 / ``Shard(0)`` semantics."""
    size = shard_size(rows, world)
    return min(rank * size, rows), min((rank + 1) * size, rows)


@dataclasses.dataclass
class CommStats:
    """Calls and bytes per collective, as seen by one rank.

    ``sent``/``received`` follow the ring algorithms' per-rank traffic (what NCCL and gloo move):
    an all-reduce of B bytes sends and receives ``2 B (W - 1) / W``, an all-gather or a
    reduce-scatter whose full buffer is B bytes ``B (W - 1) / W``. ``buffer_bytes`` is the sum of
    the full buffers (the collective's size, independent of the algorithm).
    """

    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    buffer_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    sent_bytes: int = 0

    def add(self, kind: str, buffer: int, world: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.buffer_bytes[kind] = self.buffer_bytes.get(kind, 0) + buffer
        factor = 2 if kind == "all_reduce" else 1
        self.sent_bytes += factor * buffer * (world - 1) // world

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "buffer_bytes": dict(self.buffer_bytes),
            "sent_bytes": self.sent_bytes,
        }


def _gather(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None)  # torch >= 2.13; older: the _into_tensor name
    (fn or dist.all_gather_into_tensor)(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None)
    (fn or dist.reduce_scatter_tensor)(out, inp, group=group)


class Comm:
    """A process group (default: the global one) and the engine's collectives on it.

    ``world == 1`` runs no collective at all (every call is the identity), so a one-process
    run of the sharded engine is the single-process engine.

    Example:
        >>> c = Comm.single()
        >>> c.world, c.rank, c.all_gather_rows(torch.ones(2, 3), 2).shape
        (1, 0, torch.Size([2, 3]))
    """

    def __init__(
        self,
        group: Any = None,
        *,
        world: int | None = None,
        rank: int | None = None,
        dry: bool = False,
    ):
        self.group = group
        self.world = dist.get_world_size(group) if world is None else world
        self.rank = dist.get_rank(group) if rank is None else rank
        self.dry = dry
        self.stats = CommStats()

    @classmethod
    def single(cls) -> Comm:
        """A one-rank group without torch.distributed (for tests and the memory benchmark)."""
        return cls(world=1, rank=0)

    @classmethod
    def counting(cls, world: int, rank: int = 0) -> Comm:
        """Rank ``rank`` of a ``world``-rank group that only counts: no process group, no data
        moved, results of the right shape but unset values. For measuring one rank's memory and
        traffic under ``FakeTensorMode`` (``benchmarks/sharding.py``); never for training.

        Example:
            >>> c = Comm.counting(4, 0)
            >>> c.all_gather_rows(torch.ones(3, 2), 10).shape, c.stats.sent_bytes
            (torch.Size([10, 2]), 72)
        """
        return cls(world=world, rank=rank, dry=True)

    def rows(self, total: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of ``total`` rows."""
        return shard_rows(total, self.world, self.rank)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (integer sums are exact: the same on every rank)."""
        self.stats.add("all_reduce", t.numel() * t.element_size(), self.world)
        if self.world > 1 and not self.dry:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The full ``(total, ...)`` tensor from every rank's row shard."""
        size = shard_size(total, self.world)
        full = local.new_empty((size * self.world, *local.shape[1:]))
        self.stats.add("all_gather", full.numel() * full.element_size(), self.world)
        if self.world == 1:
            return local
        if self.dry:
            return full[:total]
        if local.shape[0] != size:  # the short last shards: pad as FSDP2 does
            padded = local.new_zeros((size, *local.shape[1:]))
            padded[: local.shape[0]] = local
            local = padded
        _gather(full, local.contiguous(), self.group)
        return full[:total]

    def reduce_scatter_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the average over the ranks of ``full`` (FSDP2's default)."""
        total = full.shape[0]
        size = shard_size(total, self.world)
        start, stop = self.rows(total)
        self.stats.add(
            "reduce_scatter", size * self.world * full[:1].numel() * full.element_size(), self.world
        )
        if self.world == 1:
            return full
        if self.dry:
            return full.new_empty((stop - start, *full.shape[1:]))
        if total != size * self.world:
            padded = full.new_zeros((size * self.world, *full.shape[1:]))
            padded[:total] = full
            full = padded
        out = full.new_empty((size, *full.shape[1:]))
        _reduce_scatter(out, full.contiguous(), self.group)
        return out[: stop - start].div_(self.world)
