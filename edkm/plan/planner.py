"""``edkm plan``: will a recipe's training step fit this device? A prediction by category, a
verdict, and the switches that make it fit.

:func:`make_plan` runs the training steps of the recipe's model under FakeTensorMode
(:mod:`edkm.plan.step`: nothing is allocated, a LLaMA-7B config plans on a laptop) and reads
MemTracker's categories at the device peak: weights, buffers (DKM centroids), gradients,
optimizer state, activations (tensors the forward created and still holds, saved tensors
included), temporaries (tensors created in backward), other (inputs). DKM's share is the
difference to the same step without clustering, also measured. The host side is the host pool
(what the offload hooks and ``HostOffloadAdamW`` keep in host memory), plus this process's
resident memory before planning (the interpreter with torch and transformers, from psutil),
plus, when larger than the pool, the weights while the model is loaded (the loader reads them
into host memory before they move to the device).

When the recipe does not fit, the switches are tried one after the other, each on top of the
previous ones, cheapest first: ``train.activation_checkpointing``, ``offload.enabled``
(marshaling of DKM's saved tensors), ``offload.optimizer``, ``offload.activations``, then
halving ``train.batch_size`` while doubling ``train.grad_accum`` (same tokens per step);
every one is a planned step, not a guess.

How exact it is (``docs/plan.md`` has the measurements): on the CPU, the fake step equals the
real one to the byte without DKM, and with DKM when the uniquified tables' widths are known
(:func:`edkm.plan.step.table_rows`, read from a model folder's weights); without weights each
table is sized by its upper bound ``min(N, 65,536)`` rows. The ``reference`` and ``unique``
methods are modelled exactly (torch ops on shapes). On a GPU the kernels differ: the Triton
per-weight passes, the attention kernel (flash / memory-efficient on CUDA, the CPU's flash
kernel here) and CUDA's autocast op list can move the figure; ``benchmarks/llama7b_gpu.py``
measures that gap. The caching allocator's fragmentation is not modelled (the prediction is
what ``torch.cuda.max_memory_allocated`` reports, not ``nvidia-smi``), so keep a margin.

Example:
    >>> plan = make_plan("tests/data/tiny_llama_config.json", Recipe(),
    ...                  device_memory=parse_bytes("24GiB"))  # doctest: +SKIP
    >>> plan.fits  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import torch

from edkm.config import Recipe
from edkm.errors import InputError
from edkm.plan.step import DeviceKind, StepMemory, measure_step, model_config

__all__ = ["Plan", "Variant", "format_bytes", "make_plan", "parse_bytes", "render"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

# MemTracker category -> row label, in table order
CATEGORIES = {
    "Parameter": "weights",
    "Buffer": "buffers (DKM centroids, rotary)",
    "Gradient": "gradients",
    "Optstate": "optimizer state",
    "Activation": "activations (forward, saved)",
    "Temp": "temporaries (backward)",
    "Other": "other (inputs)",
}


def parse_bytes(text: str) -> int:
    """A memory size such as ``24GiB``, ``80GB``, ``512MiB`` or ``1e9`` in bytes.

    Example:
        >>> parse_bytes("24GiB"), parse_bytes("80 GB"), parse_bytes("1.5mib")
        (25769803776, 80000000000, 1572864)
        >>> parse_bytes("lots")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: memory size 'lots' is not a number with an optional unit (e.g. 24GiB, 80GB)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise InputError(
            f"memory size '{text}' is not a number with an optional unit (e.g. 24GiB, 80GB)"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise InputError(f"memory size '{text}' must be above 0")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), two decimals.

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(5 * 2**20)
        ('3.00 GiB', '5.00 MiB')
    """
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass
class Variant:
    """One planned configuration: the switches changed from the recipe and its peaks."""

    changes: dict[str, Any]
    step: StepMemory
    host_bytes: int
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": self.changes,
            "device_peak_bytes": self.step.peak_bytes,
            "host_peak_bytes": self.host_bytes,
            "fits": self.fits,
        }


@dataclasses.dataclass
class Plan:
    """What ``edkm plan`` predicts for one recipe (module docstring).

    Attributes:
        model: the model argument; kind: ``"gpu"`` or ``"cpu"`` (the device trained on).
        recipe: the recipe planned (as a dict).
        device_memory, host_memory: the budgets in bytes.
        step: the recipe's step (:class:`StepMemory`); dkm_bytes: its peak minus the same
            step without clustering.
        host_bytes: predicted host peak; host_baseline_bytes: this process's RSS before
            planning; load_bytes: the weights while loading.
        table_rows: ``"measured"`` (widths read from the weights) or ``"upper bound"``.
        fits: device and host within budget; advice: the variants tried when it does not.
    """

    model: str
    kind: DeviceKind
    recipe: dict[str, Any]
    device_memory: int
    host_memory: int
    step: StepMemory
    dkm_bytes: int | None
    host_bytes: int
    host_baseline_bytes: int
    load_bytes: int
    table_rows: str
    fits_device: bool
    fits_host: bool
    advice: list[Variant] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    @property
    def device_bytes(self) -> int:
        return self.step.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("step", "advice")}
        out["step"] = self.step.to_dict()
        out["device_peak_bytes"] = self.device_bytes
        out["fits"] = self.fits
        out["advice"] = [v.to_dict() for v in self.advice]
        return out


def _host_bytes(step: StepMemory, baseline: int, load: int, kind: DeviceKind) -> int:
    if kind == "cpu":  # one memory: the device peak is host memory too
        return baseline + max(load, step.peak_bytes + step.host_pool_bytes)
    return baseline + max(load, step.host_pool_bytes)


def _switches(recipe: Recipe) -> list[dict[str, Any]]:
    """The advice's steps, cumulative, for the switches the recipe has not set."""
    steps: list[dict[str, Any]] = []
    if not recipe.train.activation_checkpointing:
        steps.append({"train.activation_checkpointing": True})
    if not recipe.offload.enabled:
        steps.append({"offload.enabled": True})
    if not recipe.offload.optimizer:
        steps.append({"offload.optimizer": True})
    if not recipe.offload.activations:
        steps.append({"offload.activations": True})
    batch, accum = recipe.train.batch_size, recipe.train.grad_accum
    while batch > 1 and batch % 2 == 0:
        batch, accum = batch // 2, accum * 2
        steps.append({"train.batch_size": batch, "train.grad_accum": accum})
    return steps


def make_plan(
    model: str | os.PathLike[str],
    recipe: Recipe,
    *,
    device_memory: int,
    host_memory: int | None = None,
    kind: DeviceKind = "gpu",
    advise: bool = True,
    dkm_share: bool = True,
    progress: Any = None,
) -> Plan:
    """Plan the recipe's training step on ``model`` (a folder, a config.json or ``"default"``).

    Args:
        device_memory: the device's memory in bytes (ignored for ``kind="cpu"``).
        host_memory: host memory in bytes (default: psutil's total of this machine).
        kind: ``"gpu"`` (bf16 autocast as on a GPU) or ``"cpu"`` (as the trainer on this CPU).
        advise: when it does not fit, plan the switches (module docstring).
        dkm_share: also run the step without clustering (DKM's measured share).
        progress: called with a line of text before each planned step.

    Example:
        >>> make_plan("recipes/llama7b_config.json", Recipe(), device_memory=24 * 2**30)  # doctest: +SKIP
    """
    import psutil

    from edkm.plan.step import folder_table_rows

    say = progress or (lambda _line: None)
    config = model_config(model)
    host_total = int(psutil.virtual_memory().total) if host_memory is None else host_memory
    baseline = int(psutil.Process().memory_info().rss)
    if kind == "cpu":
        device_memory = host_total
    rows = _weights_rows(model, config, recipe, folder_table_rows)
    say("planning the recipe's step")
    step = measure_step(config, recipe, kind=kind, rows=rows)
    dtype = getattr(torch, recipe.train.weights_dtype)
    load = step.by_category.get("Parameter", 0)
    if dtype != torch.float32:  # the loader reads the checkpoint's dtype; count the larger
        load = max(load, step.by_category.get("Parameter", 0))
    dkm_bytes = None
    if dkm_share:
        say("planning the same step without DKM clustering")
        dkm_bytes = step.peak_bytes - measure_step(config, recipe, kind=kind, dkm=False).peak_bytes
    host = _host_bytes(step, baseline, load, kind)
    plan = Plan(
        model=str(model),
        kind=kind,
        recipe=recipe.to_dict(),
        device_memory=device_memory,
        host_memory=host_total,
        step=step,
        dkm_bytes=dkm_bytes,
        host_bytes=host,
        host_baseline_bytes=baseline,
        load_bytes=load,
        table_rows="measured" if rows else "upper bound",
        fits_device=kind == "cpu" or step.peak_bytes <= device_memory,
        fits_host=host <= host_total,
    )
    if plan.fits or not advise:
        return plan
    changes: dict[str, Any] = {}
    for switch in _switches(recipe):
        changes.update(switch)
        say("planning with " + ", ".join(f"{k}={v}" for k, v in switch.items()))
        variant = recipe.with_overrides(**changes)
        vstep = measure_step(config, variant, kind=kind, rows=rows)
        vhost = _host_bytes(vstep, baseline, load, kind)
        fits = (kind == "cpu" or vstep.peak_bytes <= device_memory) and vhost <= host_total
        plan.advice.append(Variant(dict(changes), vstep, vhost, fits))
        if fits:
            break
    return plan


def _weights_rows(model: Any, config: Any, recipe: Recipe, reader: Any) -> dict[str, int]:
    """The uniquified tables' widths from the model folder's weights (empty: none there)."""
    from pathlib import Path

    folder = Path(str(model)) if str(model) != "default" else None
    if str(model) == "default":
        from edkm.io.models import default_model_dir

        folder = default_model_dir()
    if folder is None or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return {}
    from torch._subclasses.fake_tensor import FakeTensorMode

    from edkm.nn.palettize import dkm_layers
    from edkm.plan.step import build_model

    with FakeTensorMode():  # only the layer names and groups are needed
        fake = build_model(config, recipe)
    groups = {name: layer.num_groups for name, layer in dkm_layers(fake)}
    rows: dict[str, int] = reader(folder, groups, getattr(torch, recipe.train.weights_dtype))
    return rows


def render(plan: Plan) -> str:
    """The table ``edkm plan`` prints: categories at the peak, totals, verdict, advice.

    Example:
        >>> print(render(plan))  # doctest: +SKIP
    """
    step = plan.step
    dev = "device" if plan.kind == "gpu" else "CPU (device = host)"
    lines = [
        f"edkm plan: {plan.model}, {step.dkm_layers} DKM layers, "
        f"{step.trained_params / 1e6:,.1f}M trained parameters, {plan.kind} step "
        f"({step.method}, DKM tables: {plan.table_rows})",
        "",
        f"| at the {dev} peak | bytes |",
        "|---|---:|",
    ]
    for key, label in CATEGORIES.items():
        lines.append(f"| {label} | {format_bytes(step.by_category.get(key, 0))} |")
    lines.append(f"| **device peak** | **{format_bytes(step.peak_bytes)}** |")
    if plan.dkm_bytes is not None:
        lines.append(
            f"| of which DKM (peak minus the step without clustering) | {format_bytes(plan.dkm_bytes)} |"
        )
    lines += [
        f"| host pool (offloaded saved tensors, optimizer state, gradients) | {format_bytes(step.host_pool_bytes)} |",
        f"| host: process before planning (psutil RSS) | {format_bytes(plan.host_baseline_bytes)} |",
        f"| host: weights while loading | {format_bytes(plan.load_bytes)} |",
        f"| **host peak** | **{format_bytes(plan.host_bytes)}** |",
        "",
    ]
    budget = (
        f"device {format_bytes(plan.device_memory)}, host {format_bytes(plan.host_memory)}"
        if plan.kind == "gpu"
        else f"host {format_bytes(plan.host_memory)}"
    )
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict} ({budget})")
    if plan.advice:
        lines += [
            "",
            "| switches (cumulative) | device peak | host peak | fits |",
            "|---|---:|---:|---|",
        ]
        for v in plan.advice:
            label = ", ".join(f"{k}={_yaml(val)}" for k, val in v.changes.items())
            lines.append(
                f"| {label} | {format_bytes(v.step.peak_bytes)} | {format_bytes(v.host_bytes)} "
                f"| {'yes' if v.fits else 'no'} |"
            )
        good = next((v for v in plan.advice if v.fits), None)
        if good is not None:
            lines.append("")
            lines.append(
                "set in the recipe: "
                + ", ".join(f"{k}: {_yaml(val)}" for k, val in good.changes.items())
            )
        else:
            lines.append("")
            lines.append(
                "no combination of the switches fits: a larger device, fewer trained "
                "layers or a shorter seq_len is needed"
            )
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
