"""The trainer's side of a sharded run: what ``edkm.train.loop`` calls under a launcher.

Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` set), :func:`launched_run` starts the
process group, shards the palettized model (:func:`edkm.shard.fsdp.shard_model_`) and returns a
:class:`ShardedRun`, which stands in for the ``Accelerator`` in the loop: its ``device``,
``backward`` and ``clip_grad_norm_``. The model is not passed to ``accelerator.prepare``:
accelerate would wrap it in DDP (``torchrun``) or apply its own FSDP2 wrapping (an ``accelerate``
FSDP2 config), neither of which knows the DKM weights are already sharded by edkm. Each rank
trains on its share of every micro-batch (``local_batch``), so a step sees the same global batch
as one process; the logged loss is the mean over the ranks; checkpoints are DCP folders.

Example:
    >>> launched_run(model, cfg, accelerator) is None  # not under a launcher  # doctest: +SKIP
    True
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edkm.errors import InputError
from edkm.shard.launch import LaunchInfo, device_for, init_distributed, launched

__all__ = [
    "ShardedRun",
    "gather_to_main",
    "is_main_process",
    "launched_run",
    "leave_group",
    "rebuild_on_main",
    "start_group",
]

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def start_group(device: str = "auto") -> LaunchInfo | None:
    """Start the process group when launched (None otherwise); safe to call again."""
    info = launched()
    if info is None:
        return None
    init_distributed(device_for(info, device), info=info)
    return info


def is_main_process() -> bool:
    """True on rank 0 of a launch, and in a process started alone.

    Example:
        >>> is_main_process()
        True
    """
    info = launched()
    return info is None or info.rank == 0


def leave_group() -> None:
    """Destroy the process group and forget the launcher's environment: what follows (evaluation,
    finalize, export on rank 0) runs as a single process.

    Drop every reference to the sharded model first: its FSDP2 device mesh and DTensors hold the
    process group, and a gloo group that outlives ``destroy_process_group`` is torn down while
    the interpreter exits, where its worker threads can abort the rank ("terminate called
    without an active exception", seen once in CI on a rank with nothing left to do). The
    ``gc.collect`` here frees the model's reference cycles before the group goes.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for key in _LAUNCH_ENV:
        os.environ.pop(key, None)


class ShardedRun:
    """One rank of a sharded training run; stands in for the ``Accelerator`` in the loop."""

    def __init__(self, model: nn.Module, info: LaunchInfo, device: torch.device) -> None:
        self.model, self.info, self.device = model, info, device

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a micro-batch (``batch_size`` must divide by the world size)."""
        world, rank = self.info.world, self.info.rank
        if batch.shape[0] % world:
            raise InputError(
                f"train.batch_size {batch.shape[0]} must be a multiple of the {world} ranks"
            )
        per = batch.shape[0] // world
        return batch[rank * per : (rank + 1) * per]

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over the ranks (the global-batch loss)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.info.world

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def save_checkpoint(
        self, run_dir: Path, *, optimizer: Any, scheduler: Any, state: Any, keep: int = 2
    ) -> Path:
        """A DCP checkpoint in the trainer's layout (``checkpoints/step-N``, ``latest``)."""
        import shutil

        from edkm.io import atomic
        from edkm.shard.fsdp import save_sharded
        from edkm.train.checkpoint import CHECKPOINT_DIR

        root = Path(run_dir) / CHECKPOINT_DIR
        final = root / f"step-{state.step:08d}"
        extra = {"scheduler": scheduler.state_dict(), "state": dict(state.__dict__)}
        save_sharded(final, model=self.model, optimizer=optimizer, extra=extra)
        if self.is_main:
            atomic.write_text(root / "latest", final.name + "\n")
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load_checkpoint(self, path: Path, *, optimizer: Any, scheduler: Any) -> Any:
        from edkm.shard.fsdp import load_sharded
        from edkm.train.checkpoint import TrainState

        extra = load_sharded(path, model=self.model, optimizer=optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        return TrainState(**extra["state"])


def launched_run(model: nn.Module, cfg: Any, accelerator: Any) -> ShardedRun | None:
    """Shard ``model`` for this launch and return the run (None when not launched).

    Call it before the optimizer is built: sharding replaces the parameters.
    """
    info = launched()
    if info is None:
        return None
    device = device_for(info, cfg.device)
    init_distributed(device, info=info)
    from edkm.shard.fsdp import shard_model_

    shard_model_(model, device=device)
    return ShardedRun(model, info, device)


def gather_to_main(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """After sharded training: the trained model's full state dict on rank 0's CPU (None elsewhere).

    Collective. Then drop every reference to the sharded model, call :func:`leave_group`, and
    load the state on rank 0 with :func:`rebuild_on_main`.
    """
    from edkm.shard.fsdp import full_state_dict

    state = full_state_dict(model)
    return state if is_main_process() else None


def rebuild_on_main(state: dict[str, torch.Tensor], recipe: Any) -> nn.Module:
    """The model rebuilt as the recipe builds it (loaded and palettized the same way), holding
    ``state`` (from :func:`gather_to_main`), on the training device: what follows (evaluation,
    finalize, LUT fine-tuning, export) runs there as in a single-process run.
    """
    import edkm
    from edkm.io.models import load_model
    from edkm.nn.palettize import set_tau_scale
    from edkm.train.loop import tau_scale, training_device

    full, _ = load_model(recipe.model, dtype=getattr(torch, recipe.train.weights_dtype))
    edkm.palettize_(full, recipe.dkm)
    full.load_state_dict(state, strict=True)
    set_tau_scale(full, tau_scale(recipe.train.steps - 1, recipe.train))  # as train() leaves it
    full.eval()
    return full.to(training_device(recipe.train))
