"""LUT fine-tuning: train the shipped (hard-assigned) model with its indices fixed.

DKM trains soft weights; ``finalize`` then snaps every weight to its nearest LUT entry, and the
model loses some accuracy in that step (at 4 bits per tensor on the default model, 9-10% of
perplexity). This phase trains what the shipped model can still change without changing its
format: the LUT entries themselves, with every weight's index fixed, and optionally the
parameters that are not palettized (norms; embeddings and biases too). The forward pass is
exactly the finalized model's, so the loss it lowers is the shipped model's loss.

``swap_in_luts(model)`` replaces each finalized Linear (one with a ``palette``) by a
``LUTLinear`` holding the LUT as an fp32 Parameter and the indices as a uint8 buffer;
``bake_luts(model)`` rounds the trained LUTs to fp16, writes ``weight = LUT[indices]`` and swaps
plain Linear layers with an updated ``palette`` back in, so ``save_palettized`` and
``load_palettized`` give bit-identical weights as after ``finalize``. ``tune_luts`` runs the
whole phase with the DKM training loop (:func:`edkm.train.loop.train`): same data, distillation,
progress, JSON-lines log and resumable checkpoints.

The layer class and its LUT gather live in :mod:`edkm.nn.lut_linear`.

Example:
    >>> tune_luts(edkm.finalize(model), blocks, train_cfg, LUTTuneConfig(steps=24))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from edkm.config import LUTTuneConfig, TrainConfig
from edkm.errors import InputError
from edkm.nn.lut_linear import LUTLinear
from edkm.nn.palette import Palette, lut_lookup
from edkm.nn.palettize import finalized_linear
from edkm.train.checkpoint import TrainState

__all__ = [
    "bake_luts",
    "lut_train_config",
    "swap_in_luts",
    "tune_luts",
]


def swap_in_luts(model: nn.Module) -> int:
    """Replace every finalized Linear (one with a ``palette``) by a ``LUTLinear``; the count.

    Example:
        >>> swap_in_luts(edkm.finalize(model))  # doctest: +SKIP
        210
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and isinstance(getattr(module, "palette", None), Palette)
    ]
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        lut_linear = LUTLinear(linear)
        lut_linear.train(linear.training)
        model.set_submodule(name, lut_linear)
    return len(names)


def bake_luts(model: nn.Module) -> nn.Module:
    """Round each ``LUTLinear``'s LUT to fp16 and swap a finalized ``nn.Linear`` back in.

    The new Linear's weight is ``LUT16[indices]`` and its ``palette`` holds the new LUT and
    the unchanged packed indices, as ``finalize`` leaves a layer (``save_palettized`` ready).

    Example:
        >>> model = bake_luts(model)  # doctest: +SKIP
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LUTLinear)]
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LUTLinear)
        lut = layer.lut.detach().to(torch.float16)
        if not bool(torch.isfinite(lut).all()):
            raise InputError(f"layer '{name}': a trained LUT entry is not finite in fp16")
        with torch.no_grad():
            weight = lut_lookup(lut.to(layer.weight_dtype), layer.indices, layer.group_size)
        palette = Palette(
            lut=lut,
            packed_indices=layer.packed_indices,
            bits=layer.bits,
            group_size=layer.group_size,
            shape=(layer.out_features, layer.in_features),
        )
        weight_param = nn.Parameter(weight, requires_grad=False)
        model.set_submodule(
            name, finalized_linear(weight_param, layer.bias, palette, layer.training)
        )
    return model


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
    return dataclasses.replace(
        train,
        steps=lut.steps,
        lr=lut.lr,
        warmup_steps=lut.warmup_steps,
        min_lr_ratio=lut.min_lr_ratio,
        checkpoint_every=lut.checkpoint_every,
        trainable="all",  # what trains is chosen by requires_grad (tune_luts)
        tau_start=1.0,
        tau_end=1.0,
        seed=train.seed + 1,
    )


def _choose_trainable(model: nn.Module, trainable: str) -> None:
    from edkm.train.loop import norm_parameters

    keep = {id(m.lut) for m in model.modules() if isinstance(m, LUTLinear)}
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
    continues from the newest checkpoint there. The returned model is finalized again (plain
    Linear layers with a ``palette``), ready for ``save_palettized``.

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
