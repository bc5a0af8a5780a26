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
whole phase with the DKM training loop (:func:`edkm.train.train`): same data, distillation,
progress, JSON-lines log and resumable checkpoints.

The gradient of one LUT entry is the sum of the weight gradients of the weights that use it.
``lut_gather`` computes it with one ``bincount`` per layer (the fast path);
``lut_gather_reference`` is the same lookup in plain autograd indexing, and the tests hold the
fast path to it.

Example:
    >>> import torch
    >>> lut = torch.tensor([[-1.0, 0.5]], requires_grad=True)
    >>> idx = torch.tensor([[0, 1, 1]], dtype=torch.uint8)
    >>> w = lut_gather(lut, idx, None)
    >>> w.tolist()
    [[-1.0, 0.5, 0.5]]
    >>> w.sum().backward()
    >>> lut.grad.tolist()
    [[1.0, 2.0]]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edkm.config import LUTTuneConfig, TrainConfig
from edkm.errors import InputError
from edkm.nn.palettize import Palette, finalized_linear, lut_lookup
from edkm.train.checkpoint import TrainState

__all__ = [
    "LUTLinear",
    "bake_luts",
    "lut_gather",
    "lut_gather_reference",
    "lut_train_config",
    "swap_in_luts",
    "tune_luts",
]


def _flat_indices(indices: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """Indices into the flattened (G*K) LUT: ``group(row) * K + index``, int64 (out*in)."""
    idx = indices.long()
    if group_size is not None:
        rows = torch.arange(idx.shape[0], device=idx.device) // group_size
        idx = idx + (rows * k).unsqueeze(1)
    return idx.reshape(-1)


class _LUTGather(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        lut: torch.Tensor,
        indices: torch.Tensor,
        group_size: int | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        flat = _flat_indices(indices, lut.shape[1], group_size)
        # keep the layer's own (uint8) index buffer, not the int64 flat copy: saving costs
        # nothing more than the module already holds; backward rebuilds the flat indices
        ctx.save_for_backward(indices)
        ctx.group_size = group_size
        ctx.lut_shape = lut.shape
        # one gather from a (G*K)-entry table already in the output dtype
        return torch.take(lut.detach().to(out_dtype).reshape(-1), flat).view(indices.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        groups, k = ctx.lut_shape
        flat = _flat_indices(indices, k, ctx.group_size)
        # the gradient of a LUT entry sums the gradients of the weights that use it
        g = torch.bincount(flat, weights=grad.reshape(-1).float(), minlength=groups * k)
        return g.view(groups, k).to(torch.float32), None, None, None


def lut_gather(
    lut: torch.Tensor,
    indices: torch.Tensor,
    group_size: int | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense weight ``LUT[group(row), index]`` with a gradient to the (G, K) ``lut``.

    ``indices`` is the (out, in) integer index tensor; ``group_size`` output channels share a
    LUT (``None``: one LUT). The weight is written in ``out_dtype`` (default: the LUT's).
    Forward equals :func:`lut_gather_reference` exactly; the LUT gradient equals it to float
    summation order.

    Example:
        >>> lut = torch.tensor([[0.0, 1.0], [10.0, 11.0]])
        >>> lut_gather(lut, torch.tensor([[1, 0], [0, 1]]), group_size=1).tolist()
        [[1.0, 0.0], [10.0, 11.0]]
    """
    out = lut.dtype if out_dtype is None else out_dtype
    result: torch.Tensor = _LUTGather.apply(lut, indices, group_size, out)
    return result


def lut_gather_reference(
    lut: torch.Tensor,
    indices: torch.Tensor,
    group_size: int | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The same lookup as :func:`lut_gather` in plain autograd indexing (the reference).

    Example:
        >>> lut_gather_reference(torch.tensor([[2.0, 3.0]]), torch.tensor([[1, 1]]), None).tolist()
        [[3.0, 3.0]]
    """
    out = lut.dtype if out_dtype is None else out_dtype
    return lut_lookup(lut.to(out), indices, group_size)


class LUTLinear(nn.Module):
    """A finalized Linear layer whose LUT trains while its indices stay fixed.

    Parameters: ``lut`` (G, 2**bits) fp32 and the original ``bias``; buffer: ``indices``
    (out, in) uint8. Forward builds ``LUT[indices]`` in the autocast dtype (or the original
    weight's dtype) and applies it like ``nn.Linear``. Build it with :func:`swap_in_luts`.

    Example:
        >>> lin = nn.Linear(3, 2, bias=False)
        >>> lin.palette = Palette(torch.zeros(1, 2, dtype=torch.float16),
        ...     torch.zeros(1, dtype=torch.uint8), 1, None, (2, 3))
        >>> LUTLinear(lin)(torch.ones(1, 3)).tolist()
        [[0.0, 0.0]]
    """

    indices: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        palette = getattr(linear, "palette", None)
        if not isinstance(palette, Palette):
            raise InputError("LUT fine-tuning needs a finalized Linear layer (edkm.finalize)")
        device = linear.weight.device
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bits = palette.bits
        self.group_size = palette.group_size
        self.weight_dtype = linear.weight.dtype
        self.packed_indices = palette.packed_indices  # unchanged by tuning: reused when baking
        self.lut = nn.Parameter(palette.lut.to(device=device, dtype=torch.float32))
        self.register_buffer("indices", palette.indices().to(device))
        self.bias = linear.bias

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``LUT[indices]`` in ``dtype`` (default: the original weight's dtype)."""
        return lut_gather(self.lut, self.indices, self.group_size, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = self.weight_dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)  # the dtype the matmul would cast to
        return F.linear(x, self.dense_weight(dtype), self.bias)

    def extra_repr(self) -> str:
        group = "per_tensor" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, {group}"
        )


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
