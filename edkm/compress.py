"""The main job: fine-tune a model with DKM, ship it palettized, and report what it cost.

``compress(recipe, out=...)`` (and ``edkm compress``) runs, in one process:

1. checks every input before any work (recipe, output folder, data long enough for a block);
2. measures the original model; with ``prepass`` (e.g. ``["slice:0.25"]``), runs each pre-pass
   (:func:`edkm.prepass.run_prepass`) on calibration blocks of the training split, saves the
   pre-passed model to ``prepass/`` (a resumed run loads it from there) and measures it;
   then the post-training baselines at the same bits (round-to-nearest per tensor and per
   group of 128, and k-means) of the model that will be palettized, on the held-out text;
3. palettizes the selected layers and fine-tunes them with DKM (:mod:`edkm.train.loop`), with
   resumable checkpoints;
4. measures the soft (DKM) model and finalizes it (hard assignment);
5. with ``lut_tune.steps > 0``, measures the hard model, then fine-tunes its LUT entries with
   the indices fixed (:mod:`edkm.train.lut_tune`, resumable like training);
6. saves LUT + packed indices with :func:`edkm.save_palettized`, reloads that folder from disk
   and measures the reloaded model: that is the figure a user gets;
7. writes ``report.json`` and ``report.md`` in the output folder.

Output folder layout: ``run.json`` (the recipe), ``train_log.jsonl``, ``checkpoints/``,
``baselines.json`` (kept so a resumed run does not measure them again), ``lut_tune/`` (the LUT
phase's log and checkpoints, when it runs), ``prepass/`` (the pre-passed model, when
``prepass`` is set; distillation then learns from the original, dense model), ``model/`` (the
palettized model and its tokenizer), ``report.json``, ``report.md``.

Example:
    >>> from edkm.compress import compress
    >>> from edkm.config import Recipe
    >>> report = compress(Recipe(), out="runs/smollm2-3bit")  # doctest: +SKIP
    >>> report["results"]["edkm_hard_reloaded"]["ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from edkm.config import Recipe
from edkm.errors import InputError
from edkm.eval.perplexity import PerplexityResult, eval_blocks, perplexity_of_blocks
from edkm.eval.report import host_memory, palettized_bits_per_weight, write_report
from edkm.io import atomic
from edkm.io.data import TextSplit, load_documents, split_documents, token_blocks, tokenize
from edkm.io.models import load_model
from edkm.train.checkpoint import checkpoint_step, latest_checkpoint
from edkm.train.distill import make_teacher
from edkm.train.loop import (
    offload_summary,
    read_log,
    train,
    training_device,
    training_precision,
)
from edkm.train.lut_tune import tune_luts

RUN_FILE = "run.json"
BASELINES_FILE = "baselines.json"
MODEL_DIR = "model"
LUT_DIR = "lut_tune"
PREPASS_DIR = "prepass"


def prepare_output(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an output folder holding another run needs ``resume`` or ``overwrite``.

    Example:
        >>> prepare_output(Path("runs/x"), Recipe(), resume=False, overwrite=False)  # doctest: +SKIP
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path '{out}' exists and is not a folder")
    run_file = out / RUN_FILE
    holds_files = out.is_dir() and any(out.iterdir())
    if holds_files and overwrite:
        if not run_file.is_file() and not (out / "report.json").is_file():
            raise InputError(
                f"output folder '{out}' holds files that are not an edkm run; "
                "refusing to delete them with --overwrite (choose another --out)"
            )
        shutil.rmtree(out)
    elif holds_files and resume:
        if not run_file.is_file():
            raise InputError(f"cannot resume: '{out}' holds no edkm run ({RUN_FILE} is missing)")
        previous = json.loads(run_file.read_text())
        if previous.get("recipe") != recipe.to_dict():
            raise InputError(
                f"cannot resume: the recipe differs from the one '{out}' was started with "
                f"(see {run_file}); use --overwrite to start over"
            )
    elif holds_files:
        raise InputError(
            f"output folder '{out}' already holds a run or other files; "
            "pass --resume to continue it or --overwrite to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not run_file.is_file():
        atomic.write_json(
            run_file, {"format": "edkm-run", "version": 1, "recipe": recipe.to_dict()}
        )


def _peak_memory() -> dict[str, float]:
    """``report["memory"]``: host figures (:func:`edkm.eval.report.host_memory`) and CUDA's peak."""
    peak = host_memory()
    if torch.cuda.is_initialized():
        peak["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _eval(
    model: torch.nn.Module, blocks: torch.Tensor, recipe: Recipe, label: str, show: bool
) -> PerplexityResult:
    return perplexity_of_blocks(
        model, blocks, batch_size=recipe.eval.batch_size, desc=label, show_progress=show
    )


def _load_inputs(recipe: Recipe, tokenizer: Any) -> tuple[TextSplit, torch.Tensor, torch.Tensor]:
    docs = load_documents(recipe.data, text_column=recipe.text_column)
    split = split_documents(docs, recipe.eval_fraction)
    ids = tokenize(tokenizer, split.train_text)
    if recipe.train.max_train_tokens:
        ids = ids[: recipe.train.max_train_tokens]
    train_blocks = token_blocks(ids, recipe.train.seq_len, what="the training text")
    windows = recipe.eval.max_windows or None
    eval_ids = eval_blocks(
        tokenizer, split.eval_text, seq_len=recipe.eval.seq_len, max_windows=windows
    )
    return split, train_blocks, eval_ids


def _cached_baselines(recipe: Recipe, out: Path) -> dict[str, Any] | None:
    cached = out / BASELINES_FILE
    if cached.is_file():
        data: dict[str, Any] = json.loads(cached.read_text())
        if data.get("recipe") == recipe.to_dict():
            return dict(data["results"])
    return None


def _baselines(
    model: torch.nn.Module,
    eval_ids: torch.Tensor,
    recipe: Recipe,
    out: Path,
    show: bool = True,
    *,
    dense: dict[str, Any] | None = None,
    stages: dict[str, Any] | None = None,
    calib: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Perplexity of the original model and of each post-training baseline (cached on disk).

    With ``dense`` (the original model's row, measured before a pre-pass), ``model`` is the
    pre-passed model: it is measured as row ``prepass`` and the baselines quantize it.
    ``stages`` are rows measured inside a pre-pass (``prepass_pruned``: pruned, before LoRA
    recovery); they come between the two.

    Each baseline quantizes the selected weights in place and is measured; the original
    weights are then copied back from a host copy of those weights alone (no second model).
    ``calib`` (training blocks) feeds the data-aware peer (``recipe.eval.peer``).
    """
    from edkm.eval.baselines import kmeans_, rtn_
    from edkm.nn.palettize import select_layers

    previous = _cached_baselines(recipe, out)
    if previous is not None:
        return previous
    bits = recipe.dkm.bits
    weights = [module.weight for _, module, _ in select_layers(model, recipe.dkm)]
    dense_bits = _dense_bits(model, recipe)
    if dense is None:
        results = {"original": _eval(model, eval_ids, recipe, "original", show).to_dict()}
        results["original"]["bits_per_weight"] = dense_bits
    else:
        row = _eval(model, eval_ids, recipe, "after pre-pass", show).to_dict()
        row["bits_per_weight"] = dense_bits
        results = {
            "original": dense,
            **(stages or {}),
            "prepass": {**row, "params": parameter_count(model)},
        }
    gs = recipe.dkm.group_size
    # k-means and the peer use the recipe's LUT layout (per tensor, or LUTs of gs channels)
    scope = "per_tensor" if gs is None else f"lut_groups_of_{gs}"
    runs: dict[str, Any] = {}
    if recipe.eval.baselines:
        runs = {
            f"rtn_{bits}bit_per_tensor": lambda m: rtn_(m, bits, config=recipe.dkm),
            f"rtn_{bits}bit_group128": lambda m: rtn_(m, bits, group_size=128, config=recipe.dkm),
            f"kmeans_{bits}bit_{scope}": lambda m: kmeans_(m, bits, config=recipe.dkm),
        }
    if recipe.eval.peer == "skm":
        from edkm.eval.peer import skm_

        if calib is None:
            raise ValueError("the sensitive k-means peer needs calibration blocks")
        blocks = calib[: recipe.eval.peer_calib_blocks]
        runs[f"skm_{bits}bit_{scope}"] = lambda m: skm_(m, blocks, bits, config=recipe.dkm)
    if runs:
        saved = [w.detach().to("cpu", copy=True) for w in weights]
        for name, apply in runs.items():
            try:
                summary = apply(model)
                results[name] = _eval(model, eval_ids, recipe, name, show).to_dict()
                results[name]["bits_per_weight"] = summary.bits_per_weight
            finally:
                with torch.no_grad():
                    for w, original in zip(weights, saved):
                        w.copy_(original)
    atomic.write_json(out / BASELINES_FILE, {"recipe": recipe.to_dict(), "results": results})
    return results


def _dense_bits(model: torch.nn.Module, recipe: Recipe) -> float:
    """Bits per weight of the layers the recipe palettizes, as they are: their dtype's bits
    (``bits_per_weight`` of the dense rows; module docs of :mod:`edkm.eval.report`)."""
    from edkm.nn.palettize import select_layers

    weights = [module.weight for _, module, _ in select_layers(model, recipe.dkm)]
    bits = sum(w.numel() * w.element_size() * 8 for w in weights)
    return bits / max(1, sum(w.numel() for w in weights))


def parameter_count(model: torch.nn.Module) -> int:
    """Weights of ``model``, tied tensors once, a palettized layer counted as its dense shape.

    Example:
        >>> parameter_count(torch.nn.Linear(3, 2))
        8
    """
    from edkm.nn.palettized_linear import PalettizedLinear

    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, PalettizedLinear):
            total += module.out_features * module.in_features
            seen.update(id(t) for t in module.parameters(recurse=False))
            seen.update(id(t) for t in module.buffers(recurse=False))
            total += 0 if module.bias is None else module.bias.numel()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _run_prepasses(
    model: torch.nn.Module,
    tokenizer: Any,
    train_ids: torch.Tensor,
    recipe: Recipe,
    out: Path,
    resume: bool,
    measure: Any = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Run ``recipe.prepass`` in order and save the result in ``out/prepass`` (atomically);
    a resumed run whose folder is there loads it instead of running the pre-passes again.

    A ``prune`` pre-pass runs ``recipe.prepass_recovery_steps`` LoRA recovery steps, and calls
    ``measure(model)`` on the pruned model before them (when given)."""
    from edkm.prepass import (
        is_structured_dir,
        load_structured,
        manifests_of,
        parse_spec,
        run_prepass,
        save_structured,
    )

    folder = out / PREPASS_DIR
    device = next(model.parameters()).device
    if resume and is_structured_dir(folder):
        loaded = load_structured(folder, dtype=next(model.parameters()).dtype, device=device)
        return loaded, manifests_of(loaded)
    calib = train_ids[: recipe.prepass_calib_blocks]
    for spec in recipe.prepass:
        name, amount = parse_spec(spec)
        options: dict[str, Any] = {}
        if name == "prune":
            options["recovery_steps"] = recipe.prepass_recovery_steps
            if measure is not None:
                options["on_pruned"] = lambda m, _manifest: measure(m)
        model, _ = run_prepass(
            name, model, tokenizer, calib, amount, seed=recipe.train.seed, **options
        )
    manifests = manifests_of(model)
    save_structured(model, folder, manifests)
    return model, manifests


def compress(
    recipe: Recipe,
    *,
    out: str | os.PathLike[str],
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the whole job (module docstring) and return the report as a dict.

    Example:
        >>> report = compress(Recipe.from_yaml("recipes/smollm2_3bit.yaml"), out="runs/x")  # doctest: +SKIP
    """
    import edkm
    from edkm.nn.palettize import set_mode
    from edkm.shard.train import is_main_process, start_group

    out = Path(out)
    clock = _PhaseClock()
    if recipe.eval.peer == "skm":
        from edkm.eval.peer import skm_available

        if not skm_available():  # before anything loads
            raise InputError("eval.peer: skm needs coremltools: pip install edkm[coreml]")
    # under torchrun / accelerate launch every rank runs this function; rank 0 alone writes the
    # folder and measures, the ranks train together (edkm.shard), rank 0 finalizes
    launch = start_group(recipe.train.device)
    main = is_main_process()
    model, tokenizer = load_model(recipe.model, dtype=getattr(torch, recipe.train.weights_dtype))
    _, train_ids, eval_ids = _load_inputs(recipe, tokenizer)
    if main:
        prepare_output(out, recipe, resume=resume, overwrite=overwrite)
    model.to(training_device(recipe.train))  # baselines and evaluations run where training does
    clock.mark("load")

    teacher = make_teacher(model) if recipe.train.distill > 0 else None  # the dense model
    if recipe.prepass and launch is not None:
        raise InputError(
            "--prepass does not run under torchrun / accelerate launch: run 'edkm slice' or "
            "'edkm prune' first and compress the folder it writes (--model DIR)"
        )
    prepass: dict[str, Any] | None = None
    dense = None
    stages: dict[str, Any] = {}
    if recipe.prepass:
        cached = _cached_baselines(recipe, out)
        dense = cached["original"] if cached else None
        if dense is None:
            dense = _eval(model, eval_ids, recipe, "original", show_progress).to_dict()
            dense["params"] = parameter_count(model)
            dense["bits_per_weight"] = _dense_bits(model, recipe)

        def measure_pruned(pruned: torch.nn.Module) -> None:
            if main and cached is None:
                row = _eval(pruned, eval_ids, recipe, "pruned", show_progress).to_dict()
                row["bits_per_weight"] = _dense_bits(pruned, recipe)
                stages["prepass_pruned"] = {**row, "params": parameter_count(pruned)}

        t_pre = time.perf_counter()
        model, manifests = _run_prepasses(
            model, tokenizer, train_ids, recipe, out, resume, measure_pruned
        )
        prepass = {
            "steps": list(recipe.prepass),
            "manifests": manifests,
            "calib_blocks": min(recipe.prepass_calib_blocks, int(train_ids.shape[0])),
            "calib_seq_len": int(train_ids.shape[1]),
            "time_s": round(time.perf_counter() - t_pre, 1),
        }
        clock.mark("prepass")  # the original's evaluation included
    results = (
        _baselines(
            model, eval_ids, recipe, out, show_progress, dense=dense, stages=stages, calib=train_ids
        )
        if main
        else {}
    )
    clock.mark("baselines")
    summary = edkm.palettize_(model, recipe.dkm)
    clock.mark("dkm_init")
    resumed = latest_checkpoint(out) if resume else None
    resumed_from_step = checkpoint_step(resumed) if resumed is not None else 0
    state = train(
        model,
        train_ids,
        recipe.train,
        run_dir=out,
        resume=resume,
        show_progress=show_progress,
        teacher=teacher,
        offload=recipe.offload,
    )
    clock.mark("train")
    if launch is not None:
        from edkm.shard.train import gather_to_main, leave_group, rebuild_on_main

        trained = gather_to_main(model)
        del model  # the sharded model holds the process group: gone before the group is left
        leave_group()
        if trained is None:  # not rank 0: its part is done
            return {}
        model = rebuild_on_main(trained, recipe)

    set_mode(model, "soft")
    results["edkm_soft"] = _eval(model, eval_ids, recipe, "eDKM soft", show_progress).to_dict()
    model = edkm.finalize(model)
    lut_state = None
    if recipe.lut_tune.steps:
        results["edkm_hard"] = _eval(model, eval_ids, recipe, "eDKM hard", show_progress).to_dict()
        results["edkm_hard"]["bits_per_weight"] = palettized_bits_per_weight(model)
        model, lut_state = tune_luts(
            model,
            train_ids,
            recipe.train,
            recipe.lut_tune,
            run_dir=out / LUT_DIR,
            resume=resume,
            show_progress=show_progress,
            teacher=teacher,
        )
    del teacher
    model_dir = out / MODEL_DIR
    edkm.save_palettized(model, model_dir)
    tokenizer.save_pretrained(model_dir)
    reloaded = edkm.load_palettized(model_dir)
    device = next(model.parameters()).device
    reloaded.to(device)
    with torch.no_grad():
        probe = eval_ids[:1].to(device)
        exact = torch.equal(model(input_ids=probe).logits, reloaded(input_ids=probe).logits)
    results["edkm_hard_reloaded"] = _eval(
        reloaded, eval_ids, recipe, "eDKM hard (reloaded)", show_progress
    ).to_dict()
    results["edkm_hard_reloaded"]["bits_per_weight"] = palettized_bits_per_weight(reloaded)
    if prepass is not None:
        results["edkm_hard_reloaded"]["params"] = parameter_count(reloaded)

    wall_time = clock.mark("after_training")
    report = {
        "format": "edkm-report",
        "version": 1,
        "recipe": recipe.to_dict(),
        "results": results,
        "reload_logits_identical": exact,
        "prepass": prepass,
        "palettization": _as_plain(summary),
        "size": _size_report(reloaded, model_dir),
        "train": {
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "train_blocks": int(train_ids.shape[0]),
            "train_time_s": round(state.elapsed_s, 1),
            # > 0 when this invocation resumed a run: the time figures below are its own
            "resumed_from_step": resumed_from_step,
            "precision": training_precision(device, recipe.train),
            # marshaling counters summed over the steps (None when recipe.offload is off)
            "offload": offload_summary(read_log(out)),
        },
        "lut_tune": None
        if lut_state is None
        else {
            "steps": lut_state.step,
            "tokens_seen": lut_state.tokens_seen,
            "train_time_s": round(lut_state.elapsed_s, 1),
        },
        "eval": {"windows": int(eval_ids.shape[0]), "seq_len": int(eval_ids.shape[1])},
        "wall_time_s": round(wall_time, 1),
        "post_train_time_s": round(clock.phases["after_training"], 1),
        # where the run's time went (seconds); after_training: evaluations, finalize, LUT
        # fine-tuning, export and reload
        "phases_s": {name: round(value, 1) for name, value in clock.phases.items()},
        "memory": _peak_memory(),
        "torch": torch.__version__,
        "device": str(device),
    }
    write_report(report, out)
    return report


class _PhaseClock:
    """Contiguous timings of the job: each :meth:`mark` closes the phase since the last one."""

    def __init__(self) -> None:
        self.start = self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> float:
        """Record phase ``name`` (seconds since the previous mark); returns the time so far."""
        now = time.perf_counter()
        self.phases[name] = now - self._last
        self._last = now
        return now - self.start


def _as_plain(summary: Any) -> Any:
    if hasattr(summary, "to_dict"):
        return summary.to_dict()
    return json.loads(json.dumps(summary, default=str))


def _size_report(model: torch.nn.Module, model_dir: Path) -> dict[str, Any]:
    from edkm.nn.palettized_linear import PalettizedLinear

    pal_fp16 = pal_packed = other_fp16 = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, PalettizedLinear):
            pal_fp16 += module.dense_fp16_bytes()
            pal_packed += module.packed_bytes()
            seen.update(id(t) for t in module.parameters(recurse=False))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            other_fp16 += p.numel() * 2
    files = sum(f.stat().st_size for f in model_dir.rglob("*.safetensors"))
    return {
        "palettized_layers_fp16_bytes": pal_fp16,
        "palettized_layers_lut_indices_bytes": pal_packed,
        "palettized_layers_ratio": round(pal_fp16 / max(1, pal_packed), 2),
        "palettized_layers_bits_per_weight": palettized_bits_per_weight(model),
        "other_tensors_fp16_bytes": other_fp16,
        "model_fp16_bytes": pal_fp16 + other_fp16,
        "model_palettized_bytes": pal_packed + other_fp16,
        "checkpoint_files_bytes": files,
    }
