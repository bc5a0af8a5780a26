"""Resumable training checkpoints, written atomically.

Layout inside a run folder::

    checkpoints/
        step-00000050/      model.safetensors  optimizer.pt  scheduler.pt  rng.pt  state.json
        step-00000100/      ...
        latest              the name of the newest complete checkpoint folder

A checkpoint is written into a hidden temporary folder next to its final place and renamed
into place only when every file is on disk; ``latest`` is replaced the same way afterwards. An
interruption at any moment therefore leaves either the previous checkpoint or the new one, never
a half-written folder that ``--resume`` could pick up. The model file holds the full state dict,
DKM centroids (buffers) included, so a resumed run continues the warm start exactly.

Example:
    >>> from edkm.train.checkpoint import latest_checkpoint
    >>> latest_checkpoint("runs/demo") is None  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError
from edkm.io import atomic

CHECKPOINT_DIR = "checkpoints"
_LATEST = "latest"
_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


@dataclass
class TrainState:
    """Counters that a resumed run continues from."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Write a checkpoint for ``state.step`` atomically and prune all but the newest ``keep``.

    Example:
        >>> save_checkpoint("runs/demo", model=m, optimizer=o, scheduler=s, state=st)  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        # tied weights share storage; safetensors refuses shared tensors, so store copies
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=1))

    atomic.write_dir(final, write)
    atomic.write_text(root / _LATEST, final.name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / _LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if (path / "sharded.json").is_file():  # a DCP checkpoint of a sharded run (edkm.shard)
        return path
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise InputError(f"checkpoint '{path}' is incomplete: missing {', '.join(missing)}")
    return path


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The training step a checkpoint folder holds, from its name (``step-00000150``).

    Plain and sharded checkpoints are named the same way.

    Example:
        >>> checkpoint_step("runs/demo/checkpoints/step-00000150")
        150
    """
    name = Path(path).name
    prefix, _, digits = name.partition("-")
    if prefix != "step" or not digits.isdigit():
        raise InputError(
            f"'{path}' is not a checkpoint folder (expected a name like step-00000150)"
        )
    return int(digits)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states; return the counters.

    Example:
        >>> state = load_checkpoint(latest_checkpoint("runs/demo"), model=m, optimizer=o, scheduler=s)  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(f"cannot read checkpoint '{path / 'model.safetensors'}': {err}") from err
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise InputError(f"checkpoint '{path}' does not match the model: {str(err)[:200]}") from err
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return TrainState(**json.loads((path / "state.json").read_text()))
