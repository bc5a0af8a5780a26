"""LUT fine-tuning: train the shipped (hard-assigned) model with its indices fixed.

DKM trains soft weights; ``finalize`` then snaps every weight to its nearest LUT entry, and the
model loses some accuracy in that step (at 4 bits per tensor on the default model, 9-10% of
perplexity). This phase trains what the shipped model can still change without changing its
format: the LUT entries themselves, with every weight's index fixed, and optionally the
parameters that are not palettized (norms; embeddings and biases too). The forward pass is
exactly the finalized model's, so the loss it lowers is the shipped model's loss.

This phase is a mode of the finalized layer (the state machine is drawn in
:mod:`edkm.nn.palettize`). ``swap_in_luts(model)`` makes every frozen ``PalettizedLinear``'s LUT
trainable (an fp32 Parameter, gradient through :func:`edkm.nn.lut_gather.lut_gather`, indices
fixed); ``bake_luts(model)`` freezes them again, rounding each trained LUT to fp16, so
``save_palettized`` and ``load_palettized`` give bit-identical weights as after ``finalize``.
``tune_luts`` runs the whole phase with the DKM training loop (:func:`edkm.train.loop.train`):
same data, distillation, progress, JSON-lines log and resumable checkpoints (the checkpoints
hold the fp32 LUTs, so a resumed phase continues exactly).

Example:
    >>> tune_luts(edkm.finalize(model), blocks, train_cfg, LUTTuneConfig(steps=24))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.config import LUTTuneConfig, TrainConfig
from edkm.errors import InputError
from edkm.nn.dense import undensify_
from edkm.nn.palettize import finalized_layers
from edkm.train.checkpoint import TrainState

__all__ = [
    "bake_luts",
    "lut_train_config",
    "swap_in_luts",
    "tune_luts",
]


def swap_in_luts(model: nn.Module) -> int:
    """Make the LUT of every frozen ``PalettizedLinear`` trainable; returns how many.

    Layers densified by :func:`edkm.nn.dense.densify_` (``load_palettized(dense=True)``) are
    first turned back into ``PalettizedLinear`` layers.

    Example:
        >>> from edkm.nn.palettized_linear import PalettizedLinear
        >>> model = nn.Sequential(PalettizedLinear(4, 2, bits=1))
        >>> swap_in_luts(model), model[0].lut_trainable, model[0].lut.dtype
        (1, True, torch.float32)
    """
    undensify_(model)
    layers = [layer for _, layer in finalized_layers(model) if not layer.lut_trainable]
    for layer in layers:
        layer.lut_trainable_(True)
    return len(layers)


def bake_luts(model: nn.Module) -> nn.Module:
    """Freeze every trainable LUT again, rounded to fp16, as ``finalize`` leaves a layer.

    The indices are unchanged, so the frozen layers are exactly what ``save_palettized``
    writes. A LUT entry that overflows fp16 is an ``InputError`` naming the layer.

    Example:
        >>> from edkm.nn.palettized_linear import PalettizedLinear
        >>> model = nn.Sequential(PalettizedLinear(4, 2, bits=1).lut_trainable_())
        >>> bake_luts(model)[0].lut_trainable, model[0].lut.dtype
        (False, torch.float16)
    """
    for name, layer in finalized_layers(model):
        try:
            layer.lut_trainable_(False)
        except InputError as err:
            raise InputError(f"layer '{name}': {err}") from None
    return model


_PHASE_FIELDS = ("steps", "lr", "warmup_steps", "min_lr_ratio", "checkpoint_every")


def lut_train_config(train: TrainConfig, lut: LUTTuneConfig) -> TrainConfig:
    """The training-loop config of the LUT phase: ``train``'s data, batch, precision, device
    and distillation with ``lut``'s steps, schedule and checkpoints.

    The seed is ``train.seed + 1``, so the phase does not start on the blocks that DKM training
    started on.

    Example:
        >>> cfg = lut_train_config(TrainConfig(seed=0), LUTTuneConfig(steps=20, lr=1e-4))
        >>> cfg.steps, cfg.lr, cfg.seed
        (20, 0.0001, 1)
    """
    if lut.steps < 1:
        raise ValueError("LUTTuneConfig.steps is 0: the LUT phase is off")
    # the fields both configs name alike come from the LUT phase's config
    phase: dict[str, Any] = {name: getattr(lut, name) for name in _PHASE_FIELDS}
    # what trains is chosen by requires_grad (tune_luts); no DKM temperature to anneal
    fixed: dict[str, Any] = {
        "trainable": "all",
        "tau_start": 1.0,
        "tau_end": 1.0,
        "seed": train.seed + 1,
    }
    return dataclasses.replace(train, **phase, **fixed)


def _choose_trainable(model: nn.Module, trainable: str) -> None:
    from edkm.train.loop import norm_parameters

    keep = {id(m.lut) for _, m in finalized_layers(model) if m.lut_trainable}
    if trainable == "lut+norms":
        keep |= {id(p) for p in norm_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(trainable == "all" or id(p) in keep)


def tune_luts(
    model: nn.Module,
    blocks: torch.Tensor,
    train: TrainConfig,
    lut: LUTTuneConfig,
    *,
    run_dir: str | os.PathLike[str],
    resume: bool = False,
    show_progress: bool = True,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, TrainState]:
    """Fine-tune the LUTs of a finalized model (module docstring); returns it baked.

    ``run_dir`` receives the phase's ``train_log.jsonl`` and ``checkpoints/``; ``resume``
    continues from the newest checkpoint there. The returned model's LUTs are frozen again
    (fp16), ready for ``save_palettized``.

    Example:
        >>> model, state = tune_luts(edkm.finalize(model), blocks, TrainConfig(),
        ...                          LUTTuneConfig(steps=20), run_dir="runs/x/lut")  # doctest: +SKIP
    """
    from edkm.train.loop import train as train_loop

    cfg = lut_train_config(train, lut)
    if swap_in_luts(model) == 0:
        raise InputError("LUT fine-tuning found no finalized layer (call edkm.finalize first)")
    _choose_trainable(model, lut.trainable)
    state = train_loop(
        model,
        blocks,
        cfg,
        run_dir=Path(run_dir),
        resume=resume,
        show_progress=show_progress,
        teacher=teacher,
    )
    model = bake_luts(model)
    model.requires_grad_(True)
    return model, state
