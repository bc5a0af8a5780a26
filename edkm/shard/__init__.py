"""Sharding across workers: uniquified DKM on FSDP2 shards (``torchrun``, ``accelerate launch``).

What PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) does here: it shards every
parameter of the model along dim 0 across the ranks, all-gathers a block's parameters before its
forward (and again before its backward), frees them after, and reduce-scatters (averages) their
gradients, so each rank keeps 1/W of the parameters, gradients and optimizer state. DCP
(``torch.distributed.checkpoint``) saves and loads those shards, resharding on load.

What edkm adds by hand, and why. FSDP2 would all-gather a palettized weight and run DKM on the
full weight on every rank: every rank would do all of the DKM work and keep the full soft weight
(386 MiB per LLaMA-7B layer in bf16) alive from forward to backward. FSDP2 has no hook to run a
computation on the shards before the all-gather; and the uniquified DKM needs only a small
global quantity, the (G, 65,536) histogram of bit patterns, to make every rank's table identical.
So the DKM weights are left out of FSDP2's all-gather (``ignored_params``) and sharded by edkm as
``Shard(0)`` DTensors (the same split as FSDP2's, so the optimizer, gradient clipping and DCP
treat them like FSDP2's parameters), and their forward is
:mod:`edkm.shard.engine`:

- forward: local histogram of the rank's rows (``edkm::bit_histogram``) -> ``all_reduce`` of the
  int32 counts -> every rank builds the same table and runs the same k-means iterations (the
  centroids stay bitwise identical across ranks) -> local gather ``T[b]`` for its rows
  (``edkm::gather_table``) -> ``all_gather`` of the soft rows for the matmul, freed after it;
- backward: all-gather the soft rows again for ``dL/dx`` -> ``reduce_scatter`` of ``dL/dsoft``
  -> local scatter-add into bins (``edkm::scatter_bins``) -> ``all_reduce`` of the (G, 65,536)
  bin sums -> local ``g*D[b] + H[b]`` (``edkm::unique_grad``).

The non-finite check and the choice of table form run after the all-reduce, so every rank
raises, or branches, the same way. Process groups come from the launcher's environment
(:mod:`edkm.shard.launch`): NCCL on GPUs, gloo on CPU, with a timeout on every collective.

Modules: :mod:`~edkm.shard.comm` (row shards, the collectives, their byte counter),
:mod:`~edkm.shard.engine` (the sharded uniquified DKM and the sharded matmul),
:mod:`~edkm.shard.layer` (``ShardedDKMLinear``), :mod:`~edkm.shard.fsdp` (``shard_model_``,
DCP checkpoints), :mod:`~edkm.shard.launch` (``torchrun`` / ``accelerate launch`` detection),
:mod:`~edkm.shard.train` (the trainer's hooks).

Example:
    >>> from edkm.shard import shard_rows
    >>> [shard_rows(11008, 3, r) for r in range(3)]
    [(0, 3670), (3670, 7340), (7340, 11008)]
"""

from __future__ import annotations

from edkm.shard.comm import Comm, CommStats, shard_rows, shard_size
from edkm.shard.engine import sharded_linear, sharded_unique_dkm
from edkm.shard.launch import LaunchInfo, init_distributed, launched

__all__ = [
    "Comm",
    "CommStats",
    "LaunchInfo",
    "init_distributed",
    "launched",
    "shard_rows",
    "shard_size",
    "sharded_linear",
    "sharded_unique_dkm",
]
