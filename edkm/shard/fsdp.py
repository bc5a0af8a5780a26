"""FSDP2 wrapping of a palettized model, and its checkpoints through ``torch.distributed.checkpoint``.

:func:`shard_model_` shards a model that ``edkm.palettize_`` has wrapped:

1. every ``DKMLinear`` becomes a :class:`~edkm.shard.layer.ShardedDKMLinear`: its weight a
   ``Shard(0)`` DTensor of the rank's rows, its forward edkm's sharded uniquified DKM;
2. every decoder block, then the root, goes through FSDP2's ``fully_shard`` with those DKM
   weights in ``ignored_params``: FSDP2 shards, all-gathers and reduce-scatters everything else
   (embeddings, norms, biases) as usual, and leaves the DKM weights to edkm.

:func:`save_sharded` / :func:`load_sharded` write and read a training checkpoint with DCP
(``torch.distributed.checkpoint``): each rank writes its own shards of the model (DKM weights
included, as DTensors with their global shape) and of the AdamW state, plus the replicated
centroids once; rank 0 writes ``extra`` (scheduler state, counters) with ``torch.save``, and
each rank its RNG state, into files of their own. DCP reshards on load, so a checkpoint also loads on another world
size (model and optimizer states; the RNG streams then differ, so the continuation is not
bit-identical to an uninterrupted run, see ``docs/sharding.md``).

Example:
    >>> model = shard_model_(model)  # doctest: +SKIP
    >>> optimizer = torch.optim.AdamW(model.parameters())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edkm.adapters import get_adapter
from edkm.errors import InputError
from edkm.nn.palettize import dkm_layers
from edkm.shard.comm import Comm
from edkm.shard.layer import ShardedDKMLinear, shard_dkm_layer_

__all__ = [
    "full_state_dict",
    "is_sharded",
    "load_sharded",
    "save_sharded",
    "shard_model_",
    "sharded_layers",
]


def sharded_layers(model: nn.Module) -> list[tuple[str, ShardedDKMLinear]]:
    """The ``ShardedDKMLinear`` layers of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShardedDKMLinear)]


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_model_` sharded ``model``.

    Example:
        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    return any(isinstance(m, ShardedDKMLinear) for m in model.modules())


def shard_model_(
    model: nn.Module,
    *,
    mesh: Any = None,
    device: torch.device | str | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a palettized model across the default process group (module docstring); returns it.

    Every rank must hold the same model (same weights, centroids and temperatures: load and
    palettize it the same way on every rank). ``mesh`` defaults to a 1-D mesh over all ranks on
    ``device`` (default: the model's). Build the optimizer afterwards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise InputError("shard_model_ needs a process group (edkm.shard.init_distributed)")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    comm = Comm(mesh.get_group())
    layers = list(dkm_layers(model))
    if not layers:
        raise InputError("the model has no DKM layers: call edkm.palettize_ before sharding")
    for _, layer in layers:
        shard_dkm_layer_(layer, mesh, comm)
    ignored = {id(layer.weight) for _, layer in layers}

    def own(module: nn.Module) -> set[nn.Parameter]:
        return {p for p in module.parameters() if id(p) in ignored}

    for _, block in get_adapter(model).blocks():
        fully_shard(
            block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=own(block)
        )
    fully_shard(
        model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=own(model)
    )
    return model


# ---- checkpoints ----------------------------------------------------------------------------------

_RNG = "rng-rank{rank:05d}.pt"
_META = "sharded.json"
_EXTRA = "extra.pt"


def save_sharded(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a DCP checkpoint folder atomically (a hidden folder, renamed when complete).

    Collective: every rank calls it. ``extra`` holds picklable objects (scheduler state,
    counters) stored once.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from edkm.train.checkpoint import rng_state

    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / _RNG.format(rank=rank))
    if rank == 0:
        torch.save(extra or {}, tmp / _EXTRA)
    dist.barrier()
    if rank == 0:
        meta = {"format": "edkm-sharded-checkpoint", "version": 1, "world": dist.get_world_size()}
        (tmp / _META).write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_sharded(
    path: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG state from :func:`save_sharded`; returns
    ``extra``. On another world size the shards are redistributed by DCP; the RNG state of rank
    ``r`` is taken when it exists (else the one of rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from edkm.train.checkpoint import set_rng_state

    path = Path(path)
    if not (path / _META).is_file():
        raise InputError(f"'{path}' is not a sharded edkm checkpoint ({_META} is missing)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rng = path / _RNG.format(rank=dist.get_rank())
    set_rng_state(
        torch.load(rng if rng.is_file() else path / _RNG.format(rank=0), weights_only=False)
    )
    extra: dict[str, Any] = torch.load(path / _EXTRA, weights_only=False)
    return extra


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model, on the CPU of rank 0 (empty on the
    other ranks). Collective. Load it into the same model built without sharding, e.g. to
    finalize and save it (``edkm.finalize``, ``edkm.save_palettized``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full: dict[str, torch.Tensor] = get_model_state_dict(model, options=opts)  # type: ignore[assignment]
    return full
