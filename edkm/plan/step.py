"""One training step of a recipe, run for its memory: under FakeTensorMode (nothing allocated) or
for real, measured by PyTorch's ``MemTracker``.

The step is the trainer's (:mod:`edkm.train.loop`): the same model class built from the model's
``config.json`` in ``train.weights_dtype``, the same DKM layers (``DKMLinear`` on the layers the
recipe's ``dkm`` section selects), the same trainable set (:func:`trainable_parameters`), the
same optimizer (:func:`build_optimizer`: AdamW on the device or ``HostOffloadAdamW``), the same
hook-ups (:func:`activation_checkpointing`, :func:`offload_decoder_layers`,
:func:`offload_dkm_layers`), ``batch_size`` x ``seq_len`` token blocks, autocast as the
trainer decides it, and per micro-batch forward + backward, then clipping, ``step`` and
``zero_grad``. Three steps run: the first creates the optimizer state (an optimizer step on
zero gradients stands for it), the last is the steady state (state, gradients being
accumulated and activations together; with ``grad_accum > 1`` it runs two micro-batches, so
gradients exist while the second one runs); :func:`run_steps` says why. The reported peak is
the largest.

What is written by hand, and why: the step body itself (:func:`run_steps`). The trainer's
``_train_step`` reads the loss as a Python float for its log, which a FakeTensor cannot give,
and it moves batches through ``accelerate``; the body here is those same calls without the
logging. A FakeTensor weight has no values to initialise centroids from, so the DKM layers
start from evenly spaced centroids (:func:`palettize_symbolic`): the shapes, and so the memory,
are those of ``edkm.palettize_``. Everything else is torch's: ``FakeTensorMode``
(``torch._subclasses.fake_tensor``) runs the real model code on shapes, and ``MemTracker``
(``torch.distributed._tools.mem_tracker``, through :func:`edkm.memory.tracker.measure_peak`)
files every storage under parameter, buffer, gradient, activation, temporary or optimizer
state, with the offload hooks' and ``HostOffloadAdamW``'s host copies in a separate host pool.

DKM's share is measured, not estimated: :func:`measure_step` with ``dkm=False`` runs the same
step with each DKM layer's soft weight replaced by its weight (the same module tree, parameters
and hooks, no clustering), and the difference of the two peaks is what DKM costs.

Example:
    >>> from edkm.config import Recipe
    >>> from edkm.plan.step import measure_step, model_config
    >>> cfg = model_config("tests/data/tiny_llama_config.json")  # doctest: +SKIP
    >>> measure_step(cfg, Recipe()).peak_bytes > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edkm.config import Recipe
from edkm.errors import InputError

__all__ = [
    "DeviceKind",
    "StepMemory",
    "build_model",
    "measure_step",
    "model_config",
    "palettize_symbolic",
    "run_steps",
]

DeviceKind = Literal["gpu", "cpu"]


def model_config(spec: str | os.PathLike[str]) -> Any:
    """The transformers config of ``spec``: ``"default"``, a model folder, or a ``config.json``.

    A folder needs only its ``config.json`` (no weights are read).

    Example:
        >>> model_config("no/such/config.json")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: model 'no/such/config.json' does not exist (a model folder, a config.json or 'default')
    """
    from transformers import AutoConfig

    if str(spec) == "default":
        from edkm.io.models import default_model_dir

        spec = default_model_dir()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(
            f"model '{spec}' does not exist (a model folder, a config.json or 'default')"
        )
    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise InputError(f"'{path}' is not a transformers config.json: {err}") from err
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise InputError(f"'{path}': {str(err).splitlines()[0]}") from err


def palettize_symbolic(model: nn.Module, recipe: Recipe) -> int:
    """Wrap the layers ``recipe.dkm`` selects in ``DKMLinear`` without reading weight values.

    ``edkm.palettize_`` initialises centroids from the weights (k-means++), which FakeTensors
    do not have; here they start evenly spaced, the same shapes. Returns the number of layers.

    Example:
        >>> from tests.conftest import make_tiny_llama  # doctest: +SKIP
        >>> palettize_symbolic(make_tiny_llama(), Recipe())  # doctest: +SKIP
        14
    """
    from edkm.nn.dkm_linear import DKMLinear
    from edkm.nn.palettize import select_layers

    selected = select_layers(model, recipe.dkm)
    for name, module, spec in selected:
        groups = spec.num_groups(module.out_features)
        start = torch.linspace(-0.05, 0.05, spec.num_centroids, device=module.weight.device)
        layer = DKMLinear(module, spec, name, centroids=start.expand(groups, -1).contiguous())
        layer.train(module.training)
        model.set_submodule(name, layer)
    return len(selected)


def build_model(config: Any, recipe: Recipe) -> nn.Module:
    """The causal LM of ``config`` in ``train.weights_dtype``, randomly initialised, DKM-wrapped.

    Call it inside ``FakeTensorMode`` to build a model of any size without allocating it.

    Example:
        >>> m = build_model(cfg, Recipe())  # doctest: +SKIP
    """
    model = _new_model(config, getattr(torch, recipe.train.weights_dtype))
    model.train()
    palettize_symbolic(model, recipe)
    return model


def _new_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config``, randomly initialised and built in ``dtype`` (no fp32 copy
    first; under FakeTensorMode a later ``.to(dtype)`` cannot swap the tied embedding)."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        config._attn_implementation = "sdpa"  # the trainer's (transformers' default)
        model: nn.Module = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _autocast(recipe: Recipe, kind: DeviceKind) -> contextlib.AbstractContextManager[Any]:
    if recipe.train.autocast == "off":
        return contextlib.nullcontext()
    if kind == "cpu":
        from edkm.train.loop import bf16_supported

        if not bf16_supported(torch.device("cpu")):
            return contextlib.nullcontext()
    # on the CPU, torch's CPU autocast policy stands in for CUDA's (both run matmuls in bf16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


_LAYER = threading.local()


@contextlib.contextmanager
def _table_bound(model: nn.Module, rows: dict[str, int] | None = None) -> Iterator[None]:
    """Under FakeTensorMode, size the uniquified engine's tables (``rows``, else a bound).

    The engine picks a compact table (only the patterns present) when a group holds few
    distinct 16-bit patterns, which depends on values a FakeTensor does not have; by itself it
    then always builds the fixed 65,536-row table. Here a group of ``N`` weights gets the
    table it would get if all its weights had distinct patterns: ``min(N, 65,536)`` rows, in
    the compact form where the engine's own rule (``COMPACT_RATIO``) would choose it. Real
    tables are never larger (fewer distinct patterns only shrink them). ``rows`` (layer name
    -> rows, :func:`table_rows`) gives the exact widths where the weights are known.
    """
    import edkm.dkm.unique as unique
    from edkm.nn.palettize import dkm_layers

    original = unique.build_table
    bins = unique.BINS

    rows_of = rows or {}

    def remember(layer: Any, _args: Any) -> None:
        bound = layer.weight.numel() // layer.num_groups
        _LAYER.rows = rows_of.get(layer.layer_name, bound)

    def build(counts: torch.Tensor, dtype: torch.dtype, *, compact: bool | None = None) -> Any:
        if compact is False or not unique.is_symbolic(counts):
            return original(counts, dtype, compact=compact)
        groups = counts.shape[0]
        rows = max(1, min(int(getattr(_LAYER, "rows", bins)), bins))
        if compact is None and groups * rows > unique.COMPACT_RATIO * groups * bins:
            return original(counts, dtype, compact=False)
        size = groups * rows
        dev = counts.device
        return unique.Table(
            torch.zeros(groups, rows, device=dev),
            torch.zeros(groups, rows, device=dev),
            torch.zeros(size, dtype=torch.long, device=dev),
            torch.arange(size, device=dev),
        )

    handles = [layer.register_forward_pre_hook(remember) for _, layer in dkm_layers(model)]
    unique.build_table = build  # type: ignore[assignment]
    try:
        yield
    finally:
        unique.build_table = original
        for handle in handles:
            handle.remove()


def pattern_rows(weight: torch.Tensor, groups: int = 1) -> int:
    """Rows of the uniquified table of ``weight``: the most distinct 16-bit patterns in one of
    its ``groups`` LUT groups (what the engine's compact table holds), counted with the
    engine's own histogram (:func:`edkm.kernels.unique.bit_histogram`).

    Example:
        >>> pattern_rows(torch.tensor([[1.0, 1.0], [2.0, 3.0]]))
        3
    """
    from edkm.kernels.unique import bit_histogram

    counts = bit_histogram(weight.detach(), groups, backend="torch")
    return int((counts > 0).sum(1).max())


def table_rows(model: nn.Module) -> dict[str, int]:
    """:func:`pattern_rows` of every DKM layer of a model with real weights (layer name ->
    rows), for :func:`measure_step`'s ``rows``.

    Example:
        >>> table_rows(torch.nn.Linear(2, 2))
        {}
    """
    from edkm.nn.palettize import dkm_layers

    return {name: pattern_rows(layer.weight, layer.num_groups) for name, layer in dkm_layers(model)}


def folder_table_rows(
    folder: str | os.PathLike[str], groups: dict[str, int], dtype: torch.dtype
) -> dict[str, int]:
    """:func:`pattern_rows` of the layers in ``groups`` (name -> LUT groups), their weights read
    one at a time from a model folder's ``*.safetensors`` and cast to ``dtype`` (the trainer's
    ``weights_dtype``); empty when the folder has none (a bare ``config.json``).

    Example:
        >>> folder_table_rows("no/such/folder", {"x": 1}, torch.float32)
        {}
    """
    from safetensors import safe_open

    path = Path(folder)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    out: dict[str, int] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                name = key.removesuffix(".weight")
                if key.endswith(".weight") and name in groups:
                    out[name] = pattern_rows(f.get_tensor(key).to(dtype), groups[name])
    return out


@contextlib.contextmanager
def _without_dkm() -> Iterator[None]:
    """DKM layers use their weight as is (the same step minus the clustering)."""
    from edkm.nn.dkm_linear import DKMLinear

    original = DKMLinear.soft_weight
    DKMLinear.soft_weight = lambda self: self.weight  # type: ignore[method-assign,assignment,return-value]
    try:
        yield
    finally:
        DKMLinear.soft_weight = original  # type: ignore[method-assign]


def run_steps(
    model: nn.Module,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    *,
    kind: DeviceKind = "gpu",
    steps: int = 3,
    teacher: nn.Module | None = None,
) -> None:
    """A warm-up, then ``steps - 1`` training steps of the trainer's body (module docstring)
    on random tokens: one micro-batch each, the last ``min(grad_accum, 2)``.

    The warm-up stands for the very first step: an optimizer step on zero gradients creates
    the optimizer state exactly as a first real step does (the same tensors, with every
    gradient alive), and a first step's forward and backward hold less than later ones (no
    optimizer state yet). Then at least two real steps: a step after a real step holds a
    little more than the first (measured on the tiny model: 0.47 MiB more activations,
    which the trainer shows too), so the last step is the steady state.

    Example:
        >>> run_steps(model, Recipe(), torch.optim.AdamW(model.parameters()))  # doctest: +SKIP
    """
    from edkm.nn.palettize import set_tau_scale
    from edkm.train.distill import distill_loss

    cfg = recipe.train
    device = next(model.parameters()).device
    hf: Any = model
    vocab = int(hf.get_input_embeddings().weight.shape[0])
    _warm_up(optimizer)
    for step in range(1, steps):
        set_tau_scale(model, 1.0)
        for _ in range(1 if step < steps - 1 else min(cfg.grad_accum, 2)):
            batch = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=device)
            with _autocast(recipe, kind):
                out = model(input_ids=batch, labels=batch)
                loss = out.loss
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=batch).logits
                    kd = distill_loss(out.logits, teacher_logits)
                    loss = (1 - cfg.distill) * loss + cfg.distill * kd
                    del teacher_logits, kd
            del out
            (loss / cfg.grad_accum).backward()
            del loss, batch
        clip = getattr(optimizer, "clip_grad_norm_", None)
        if clip is not None:
            clip(cfg.max_grad_norm)
        else:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _warm_up(optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: the state of a first step, without the step."""
    from edkm.offload.host import host_allocation

    host = getattr(optimizer, "host_params", None)  # HostOffloadAdamW: its gradients are there
    with torch.no_grad():
        if host is not None:
            with host_allocation():
                for p in host:
                    p.grad = torch.zeros_like(p)
        else:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclasses.dataclass
class StepMemory:
    """Peak tensor memory of the planned training steps (one :func:`measure_step` run).

    Attributes:
        peak_bytes: device bytes at the peak (everything but the host pool).
        by_category: device bytes per MemTracker category at the peak.
        host_pool_bytes: peak bytes of the host pool (offloaded saved tensors, and
            ``HostOffloadAdamW``'s parameter copies, gradients and moments).
        baseline_bytes: device bytes before the step (weights and buffers).
        method: ``"memtracker-fake"`` or ``"memtracker"``.
        dkm_layers: DKM layers in the model.
        trained_params: parameters the optimizer updates.
    """

    peak_bytes: int
    by_category: dict[str, int]
    host_pool_bytes: int
    baseline_bytes: int
    method: str
    dkm_layers: int
    trained_params: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_step(
    config: Any,
    recipe: Recipe,
    *,
    fake: bool = True,
    kind: DeviceKind = "gpu",
    dkm: bool = True,
    model: nn.Module | None = None,
    rows: dict[str, int] | None = None,
) -> StepMemory:
    """Build the recipe's model from ``config`` and measure its training steps (module doc).

    ``fake=False`` runs for real on the CPU (small models: the measured side of the check);
    ``dkm=False`` replaces each DKM layer's clustering by its weight. ``model``: a model
    built already (real runs, e.g. one ``edkm.palettize_`` wrapped), used instead of building.
    ``rows``: the uniquified tables' widths per layer (:func:`table_rows`) when the weights
    are known; without them a fake run sizes each table by its upper bound.

    Example:
        >>> rep = measure_step(model_config("default"), Recipe())  # doctest: +SKIP
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from edkm.memory.tracker import measure_peak
    from edkm.nn.palettize import dkm_layers
    from edkm.train.loop import (
        activation_checkpointing,
        build_optimizer,
        offload_decoder_layers,
        offload_dkm_layers,
        trainable_parameters,
    )

    mode: contextlib.AbstractContextManager[Any]
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext()
    cfg = recipe.train
    with mode, _without_dkm() if not dkm else contextlib.nullcontext():
        if model is None:
            torch.manual_seed(cfg.seed)
            model = build_model(config, recipe)
        teacher = None
        if cfg.distill > 0:  # a frozen dense copy, forward only (edkm.train.distill)
            teacher = _new_model(config, next(model.parameters()).dtype).eval()
            teacher.requires_grad_(False)
        params = trainable_parameters(model, cfg)
        optimizer = build_optimizer(params, cfg, recipe.offload)
        existing: list[Any] = [model] + ([teacher] if teacher is not None else [])
        with (
            _table_bound(model, rows) if fake else contextlib.nullcontext(),
            activation_checkpointing(model, cfg.activation_checkpointing),
            offload_decoder_layers(model, recipe.offload),
            offload_dkm_layers(model, recipe.offload),
        ):
            rep = measure_peak(
                lambda: run_steps(model, recipe, optimizer, kind=kind, teacher=teacher),
                existing=existing,
            )
        remove = getattr(optimizer, "remove_hooks", None)
        if remove is not None:
            remove()
        return StepMemory(
            peak_bytes=rep.peak_bytes,
            by_category=rep.by_category,
            host_pool_bytes=int(rep.peak_host_bytes or 0),
            baseline_bytes=rep.baseline_bytes,
            method=rep.method,
            dkm_layers=sum(1 for _ in dkm_layers(model)),
            trained_params=sum(p.numel() for p in params),
        )
