"""Process-group set-up from the launcher's environment (``torchrun``, ``accelerate launch``).

Both launchers export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`launched` reads them, :func:`init_distributed` starts the default
process group from them (NCCL when the ranks have GPUs, gloo on CPU) with a timeout, so a rank
that dies or hangs makes the others fail with an error instead of waiting forever.

Example:
    >>> launched({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    LaunchInfo(world=2, rank=1, local_rank=1)
    >>> launched({}) is None
    True
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from edkm.errors import InputError

__all__ = ["DEFAULT_TIMEOUT_S", "LaunchInfo", "device_for", "init_distributed", "launched"]

# How long a collective waits for the other ranks before failing (seconds); EDKM_DIST_TIMEOUT_S
# overrides it. A rank that dies is usually noticed at once (its sockets close); the timeout
# bounds the rest (a rank stuck elsewhere). 30 minutes, because under `edkm compress` rank 0
# measures the baselines alone while the other ranks wait for it at the first collective.
DEFAULT_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """This process's place in a multi-process launch."""

    world: int
    rank: int
    local_rank: int


def launched(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The launch this process belongs to, or None when it was started alone.

    ``WORLD_SIZE`` 1 counts as a launch too (``torchrun --nproc-per-node 1``): the sharded path
    then runs with one rank, which equals the single-process path.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise InputError(f"bad launcher environment (WORLD_SIZE/RANK/LOCAL_RANK): {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad launcher environment: RANK {rank} of WORLD_SIZE {world}")
    return LaunchInfo(world=world, rank=rank, local_rank=local)


def device_for(info: LaunchInfo, device: str = "auto") -> torch.device:
    """The rank's device: ``cuda:LOCAL_RANK`` when GPUs are present and wanted, else the CPU."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(
    device: torch.device, *, timeout_s: float | None = None, info: LaunchInfo | None = None
) -> LaunchInfo:
    """Start the default process group for this launch (no-op when one is running).

    Backend: ``nccl`` for CUDA devices, ``gloo`` otherwise. ``timeout_s`` (default
    ``EDKM_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`) bounds every collective.
    """
    info = info or launched()
    if info is None:
        raise InputError("not started by a launcher (torchrun / accelerate launch): no WORLD_SIZE")
    if dist.is_initialized():
        return info
    if timeout_s is None:
        timeout_s = float(os.environ.get("EDKM_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=info.rank,
        world_size=info.world,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return info
