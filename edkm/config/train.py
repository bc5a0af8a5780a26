"""Configs of the training loops: ``TrainConfig`` (DKM fine-tuning, recipe section ``train``)
and ``LUTTuneConfig`` (the optional LUT fine-tuning after finalize, section ``lut_tune``).

Example:
    >>> cfg = TrainConfig(steps=100, lr=2e-4)
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from edkm.config.base import ConfigBase

__all__ = ["LUTTuneConfig", "TrainConfig"]


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """The optimisation loop of DKM fine-tuning.

    Fields:
        steps: optimizer steps.
        batch_size: blocks per micro-batch; ``grad_accum`` micro-batches make one step.
        seq_len: tokens per training block.
        lr, weight_decay: AdamW (betas 0.9/0.95); the learning rate warms up linearly over
            ``warmup_steps`` then decays with a cosine to ``min_lr_ratio * lr``.
        max_grad_norm: gradient clipping (global L2 norm).
        tau_start, tau_end: DKM temperature schedule, multipliers of ``DKMConfig.tau``
            interpolated geometrically over the steps (a falling tau makes the soft weights
            converge onto the hard ones by the end).
        trainable: ``"all"`` parameters, only the ``"palettized"`` weights, or
            ``"palettized+norms"``.
        autocast: ``"bf16"`` (autocast where the device runs bf16 natively: a GPU with bf16,
            a CPU with AVX-512 bf16 or AMX; elsewhere fp32) or ``"off"``.
        device: ``"auto"`` (accelerate's choice: a GPU when present) or ``"cpu"``.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        seed: seeds the data order and every random number generator.
        max_train_tokens: cap on the tokens of the training split that are cut into blocks
            (0 = all of them).
        weights_dtype: dtype the model is loaded and trained in: ``"float32"`` (fp32 master
            weights; the uniquified DKM clusters their bf16 rounding) or ``"bfloat16"``
            (half the memory for weights, gradients and AdamW state; DKM is exact on them).
        distill: weight in [0, 1] of knowledge distillation from a frozen copy of the original
            model (:mod:`edkm.train.distill`): the loss is ``(1 - distill) * cross-entropy +
            distill * KL(teacher || student)``. 0 (the default) keeps no teacher; above 0
            the teacher costs one more copy of the weights and one forward pass per step.
        activation_checkpointing: recompute each decoder layer's forward during backward
            (transformers' gradient checkpointing, non-reentrant) instead of keeping its
            activations: only each layer's input stays saved. DKM layers recompute from the
            centroids the forward started from, so gradients are unchanged.
    """

    steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 8
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    tau_start: float = 1.0
    tau_end: float = 0.1
    trainable: Literal["all", "palettized", "palettized+norms"] = "all"
    autocast: Literal["bf16", "off"] = "bf16"
    device: Literal["auto", "cpu"] = "auto"
    checkpoint_every: int = 20
    seed: int = 0
    max_train_tokens: int = 0
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    distill: float = 0.0
    activation_checkpointing: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            self._fail("seq_len", f"must be at least 2, got {self.seq_len}")
        for name in ("lr", "tau_start", "tau_end", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                self._fail(name, f"must be a finite number > 0, got {value}")
        if not 0 <= self.warmup_steps <= self.steps:
            self._fail(
                "warmup_steps", f"must be in 0..steps ({self.steps}), got {self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            self._fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            self._fail("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.distill) and 0 <= self.distill <= 1):
            self._fail("distill", f"must be in [0, 1], got {self.distill}")
        if self.max_train_tokens < 0:
            self._fail("max_train_tokens", f"must be >= 0, got {self.max_train_tokens}")


@dataclasses.dataclass(frozen=True)
class LUTTuneConfig(ConfigBase):
    """LUT fine-tuning after finalize (:mod:`edkm.train.lut_tune`): the shipped model's LUT entries
    train with every index fixed, so the phase lowers the loss of exactly the model that ships.

    Batch, sequence length, gradient accumulation and clipping, precision, device and
    distillation are the ``train`` section's; this section sets the rest.

    Fields:
        steps: optimizer steps (0 = no LUT phase).
        lr, warmup_steps, min_lr_ratio: AdamW learning rate, linear warm-up, cosine decay to
            ``min_lr_ratio * lr``.
        trainable: ``"lut"`` (the LUT entries only), ``"lut+norms"``, or ``"all"`` (the LUTs
            and every parameter that is not palettized: norms, embeddings, biases).
        checkpoint_every: steps between checkpoints of the phase (one is written at its end).

    Example:
        >>> LUTTuneConfig(steps=40).trainable
        'all'
    """

    steps: int = 0
    lr: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    trainable: Literal["lut", "lut+norms", "all"] = "all"
    checkpoint_every: int = 25

    def validate(self) -> None:
        if self.steps < 0:
            self._fail("steps", f"must be >= 0 (0 = no LUT phase), got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            self._fail("lr", f"must be a finite number > 0, got {self.lr}")
        # the default warm-up applies once steps are set; with the phase off it is unused
        if self.warmup_steps < 0 or (self.steps and self.warmup_steps > self.steps):
            self._fail(
                "warmup_steps", f"must be in 0..steps ({self.steps}), got {self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            self._fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.checkpoint_every < 1:
            self._fail("checkpoint_every", f"must be at least 1, got {self.checkpoint_every}")
