"""``report.json`` and ``report.md`` of an ``edkm compress`` run, and the host-memory figures
they hold (:func:`host_memory`).

``report["memory"]`` (MiB): ``peak_rss_mib``, the process's peak resident set, from
``resource.getrusage`` (psutil has no peak figure on Linux or macOS; on Windows, which has no
``resource``, psutil's ``peak_wset``); ``rss_mib``, the resident set when the report is
written; ``host_total_mib`` and ``host_available_mib``, the machine's memory and what is
available then (all three from psutil); with CUDA, ``peak_cuda_allocated_mib`` (torch's
``max_memory_allocated``, added by :mod:`edkm.compress`). ``report.md`` prints them as a table.

**Bits per weight.** Each result row may carry ``bits_per_weight``: the stored bits per weight
of the Linear layers that row quantized (the recipe's selected layers), counted from the
tensors themselves, never from the config. For the eDKM rows
(:func:`palettized_bits_per_weight`) those are the shipped ``packed_indices`` (8 bits a byte)
and the fp16 ``lut`` of every ``PalettizedLinear``, over the layers' weights: ``b + G * 2**b *
16 / N`` for G LUTs of 2**b entries (plus under one byte of index padding per layer); for the
post-training baselines (``edkm.eval.baselines``) the indices and fp16 LUT (k-means) or the
codes, fp16 scales and b-bit zero points (RTN); for the original / pre-passed model, the dtype
of the same layers' weights. Biases, embeddings, norms and layers that are not quantized are
not counted in any row. ``report.md`` prints them as a column.

Example:
    >>> mem = host_memory()
    >>> 0 < mem["rss_mib"] <= mem["peak_rss_mib"] and mem["host_available_mib"] <= mem["host_total_mib"]
    True
    >>> print(render_markdown(report))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil

from edkm.io import atomic

_LABELS = {
    "original": "original (fp32)",
    "edkm_soft": "eDKM soft (DKM weights, before finalize)",
    "edkm_hard": "eDKM hard, before LUT fine-tuning",
    "edkm_hard_reloaded": "**eDKM hard, reloaded from disk (shipped)**",
}


def _label(key: str) -> str:
    if key in _LABELS:
        return _LABELS[key]
    kind, bits, scope = ([*key.split("_", 2), "", ""])[:3]
    name = {
        "rtn": "round-to-nearest",
        "kmeans": "post-training k-means",
        "skm": "sensitive k-means (coremltools, data-aware)",
    }.get(kind, kind)
    return f"{name}, {bits.replace('bit', '-bit')}, {scope.replace('_', ' ')}"


def _distill_note(recipe: dict[str, Any]) -> str:
    weight = recipe.get("train", {}).get("distill", 0.0)
    return f", distilled from the original model (weight {weight:g})" if weight else ""


def _lut_note(report: dict[str, Any]) -> str:
    lut = report.get("lut_tune")
    if not lut:
        return ""
    what = report["recipe"].get("lut_tune", {}).get("trainable", "all")
    return (
        f"LUT fine-tuning (indices fixed, trainable: {what}): {lut['steps']} steps, "
        f"{lut['tokens_seen']:,} tokens, {lut['train_time_s']:.0f} s. "
    )


def palettized_bits_per_weight(model: Any) -> float | None:
    """Stored bits per weight of ``model``'s ``PalettizedLinear`` layers, from their tensors:
    ``8 * packed_indices bytes + 16 * LUT entries`` (the LUT ships as fp16) over their weights;
    ``None`` without such layers (module docstring, "Bits per weight").

    Example:
        >>> import torch
        >>> from edkm.nn.palettized_linear import PalettizedLinear
        >>> layer = PalettizedLinear(64, 16, bits=3, group_size=8)  # 2 LUTs of 8 entries
        >>> palettized_bits_per_weight(torch.nn.Sequential(layer))  # 3 + 2 * 8 * 16 / 1024
        3.25
    """
    from edkm.nn.palettized_linear import PalettizedLinear

    stored = weights = 0
    for module in model.modules():
        if isinstance(module, PalettizedLinear):
            stored += 8 * module.packed_indices.numel() + 16 * module.lut.numel()
            weights += module.out_features * module.in_features
    return stored / weights if weights else None


def _bits(res: dict[str, Any]) -> str:
    bits = res.get("bits_per_weight")
    return "" if bits is None else f"{bits:.3f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


_MEMORY_LABELS = {
    "peak_rss_mib": "process peak resident set (getrusage)",
    "rss_mib": "process resident set at the end (psutil)",
    "host_total_mib": "host memory, total (psutil)",
    "host_available_mib": "host memory, available at the end (psutil)",
    "peak_cuda_allocated_mib": "CUDA peak allocated (torch)",
}


def _peak_rss_bytes(info: Any) -> int:
    peak = getattr(info, "peak_wset", None)  # Windows: psutil knows the peak
    if peak is not None:
        return int(peak)
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes vs KiB


def host_memory() -> dict[str, float]:
    """Host-memory figures of this process and machine in MiB, as ``report.json`` holds them.

    Keys (module docs): ``peak_rss_mib``, ``rss_mib``, ``host_total_mib``,
    ``host_available_mib``.

    Example:
        >>> sorted(host_memory())
        ['host_available_mib', 'host_total_mib', 'peak_rss_mib', 'rss_mib']
    """
    info = psutil.Process().memory_info()
    host = psutil.virtual_memory()
    rss = int(info.rss)
    return {
        # the kernel updates its high-water mark lazily: the RSS read now can be a little above it
        "peak_rss_mib": round(max(_peak_rss_bytes(info), rss) / 2**20, 1),
        "rss_mib": round(rss / 2**20, 1),
        "host_total_mib": round(host.total / 2**20, 1),
        "host_available_mib": round(host.available / 2**20, 1),
    }


def _memory_rows(memory: dict[str, float]) -> list[str]:
    rows = ["| memory | MiB |", "|---|---:|"]
    for key, value in memory.items():
        label = _MEMORY_LABELS.get(key, key.removesuffix("_mib").replace("_", " "))
        rows.append(f"| {label} | {value:,.0f} |")
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report (a Markdown table plus run facts)."""
    recipe = report["recipe"]
    ev = report["eval"]
    lines = [
        f"# edkm compress report: {recipe['model']} at {recipe['dkm']['bits']} bits",
        "",
        f"Held-out perplexity on {recipe['data']} text: {ev['windows']} windows x "
        f"{ev['seq_len']} tokens, each scored on its own (edkm.eval.perplexity). All rows were "
        "computed in this run.",
        "",
        *_result_rows(report),
    ]
    size = report["size"]
    train = report["train"]
    mem = report["memory"]
    lines += [
        "",
        f"Reloaded model's logits identical to the finalized in-memory model: "
        f"{report['reload_logits_identical']}.",
        "",
        "| size | bytes |",
        "|---|---:|",
        f"| palettized layers, fp16 | {_mib(size['palettized_layers_fp16_bytes'])} |",
        f"| palettized layers, LUT + packed indices | "
        f"{_mib(size['palettized_layers_lut_indices_bytes'])} "
        f"({size['palettized_layers_ratio']}x smaller) |",
        f"| whole model, fp16 | {_mib(size['model_fp16_bytes'])} |",
        f"| whole model, palettized | {_mib(size['model_palettized_bytes'])} |",
        "",
        f"Training: {train['steps']} steps, {train['tokens_seen']:,} tokens seen "
        f"({train['train_blocks']} training blocks), {train['train_time_s']:.0f} s"
        + _distill_note(recipe)
        + ". "
        + _lut_note(report)
        + _run_label(train)
        + f"{report['wall_time_s']:.0f} s on {report['device']} "
        f"(torch {report['torch']}{_precision_note(train)})" + _phases_note(report) + ".",
        "",
        *_memory_rows(mem),
        "",
    ]
    return "\n".join(lines)


_PHASE_NAMES = {
    "load": "loading",
    "prepass": "pre-pass",
    "baselines": "original and baselines",
    "dkm_init": "DKM init",
    "train": "training",
    "after_training": "evaluation, finalize and export",
}


def _run_label(train: dict[str, Any]) -> str:
    step = train.get("resumed_from_step", 0)  # reports written before it was recorded lack it
    if step:
        return f"This invocation, resumed after step {step} (its time only): "
    return "Whole run: "


def _precision_note(train: dict[str, Any]) -> str:
    precision = train.get("precision")  # reports written before it was recorded lack it
    return f", {precision}" if precision else ""


def _phases_note(report: dict[str, Any]) -> str:
    phases = report.get("phases_s")
    if not phases:
        return ""
    names = dict(_PHASE_NAMES)
    if report.get("lut_tune"):  # the LUT phase runs between the evaluations, in the same phase
        names["after_training"] = "evaluation, LUT fine-tuning, finalize and export"
    parts = [f"{names.get(name, name)} {value:.0f} s" for name, value in phases.items()]
    return ": " + ", ".join(parts)


_BITS_NOTE = (
    "bits/weight: stored bits per weight of the quantized Linear layers, counted from the "
    "tensors: packed indices + fp16 LUTs (eDKM, k-means), codes + fp16 scales + zero points "
    "(round-to-nearest), the weights' dtype (dense rows); biases, embeddings, norms and other "
    "layers not counted."
)


def _result_rows(report: dict[str, Any]) -> list[str]:
    """The perplexity table; after a pre-pass (``report["prepass"]``) with a parameter column
    and the rows dense, after the pre-pass, and pre-passed + palettized."""
    results = report["results"]
    base = results["original"]["ppl"]
    prepass = report.get("prepass")
    if not prepass:
        rows = ["| model | perplexity | x original | bits/weight |", "|---|---:|---:|---:|"]
        for key, res in results.items():
            rows.append(
                f"| {_label(key)} | {res['ppl']:.2f} | {res['ppl'] / base:.2f} | {_bits(res)} |"
            )
        return [*rows, "", _BITS_NOTE]
    steps = " + ".join(prepass["steps"])
    recovery = [
        (m.get("recovery") or {}).get("steps", 0)
        for m in prepass.get("manifests", [])
        if m.get("kind") == "prune"
    ]
    recovered = f" + LoRA recovery ({max(recovery)} steps)" if recovery and max(recovery) else ""
    labels = {
        "original": "dense (original)",
        "prepass_pruned": f"after pre-pass ({steps}), before LoRA recovery",
        "prepass": f"after pre-pass ({steps}){recovered}",
        "edkm_hard_reloaded": f"**{steps} + eDKM hard, reloaded from disk (shipped)**",
    }
    rows = [
        "| model | perplexity | x dense | parameters | bits/weight |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, res in results.items():
        params = f"{res['params']:,}" if "params" in res else ""
        label = labels.get(key, _label(key))
        rows.append(
            f"| {label} | {res['ppl']:.2f} | {res['ppl'] / base:.2f} | {params} | {_bits(res)} |"
        )
    rows += ["", _BITS_NOTE]
    dense, after = results["original"].get("params"), results.get("prepass", {}).get("params")
    if dense and after:
        note = (
            f"Parameters after the pre-pass: {after:,} ({after / dense:.3f}x the dense {dense:,})"
        )
        if after > dense and not recovery:
            note += (
                "; more than dense: the LM head untied from the embeddings and the residual "
                "shortcut matrices add more than slicing removed at this size"
            )
        rows += [
            "",
            note + f". Pre-pass calibration: {prepass['calib_blocks']} blocks x "
            f"{prepass['calib_seq_len']} tokens of the training split, {prepass['time_s']:.0f} s.",
        ]
    return rows


def write_report(report: dict[str, Any], out: str | os.PathLike[str]) -> None:
    """Write ``report.json`` and ``report.md`` into ``out`` (each atomically)."""
    out = Path(out)
    for name, text in (
        ("report.json", json.dumps(report, indent=2) + "\n"),
        ("report.md", render_markdown(report)),
    ):
        atomic.write_text(out / name, text)
