"""The planner against the measured trainer on the CPU: tiny model and default model.

For each model and memory configuration:

- **predicted**: ``edkm.plan.make_plan(model_folder, recipe, kind="cpu")``, the training steps
  under FakeTensorMode (nothing allocated; the DKM tables' widths read from the folder's
  weights), MemTracker categories;
- **measured, MemTracker**: the real trainer (``edkm.train.loop.train``, 2 steps, the model
  loaded from the same folder and wrapped by ``edkm.palettize_``) under PyTorch's MemTracker;
  peak tensor bytes, host pool apart;
- **measured, RSS**: the same trainer run in a fresh interpreter, peak resident-set growth
  over the run (``benchmarks._common.subprocess_peak_rss``: the kernel's peak mark is reset
  after setup), against the predicted growth (peak minus the weights already resident, plus
  the host pool); once with glibc's default allocator settings and once with a fixed mmap
  threshold (``MALLOC_MMAP_THRESHOLD_``; see ``FIXED_MMAP``), which separates the heap pages
  glibc keeps after frees from the tensors the planner counts.

Checkpoint writing is switched off in both measured runs (on a GPU it is host memory and it
is not part of the step). Tokens are random: memory does not depend on their values.

Run:
    python benchmarks/plan_check.py                       # tiny + default, two configs each
    python benchmarks/plan_check.py --models tiny         # seconds

Writes ``benchmarks/results/plan_check.{json,md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# run as a script, the repository root comes first on the path (so `benchmarks._common` imports
# without PYTHONPATH) and this folder is dropped (its modules must not shadow installed packages)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks._common import (  # noqa: E402
    RESULTS,
    environment,
    fmt_bytes,
    print_table,
    subprocess_peak_rss,
    write_records,
)
from edkm.config import Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2

# name -> (recipe file or None, overrides)
MODELS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "tiny": (None, {"train.batch_size": 8, "train.seq_len": 64, "train.trainable": "all"}),
    "default": (str(ROOT / "recipes" / "smollm2_3bit.yaml"), {}),
}
CONFIGS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "all switches": {
        "train.activation_checkpointing": True,
        "offload.enabled": True,
        "offload.optimizer": True,
        "offload.activations": True,
    },
}


def tiny_folder(root: Path) -> Path:
    """The tests' tiny LLaMA (random weights, seed 0) saved as a model folder."""
    from tests.conftest import make_tiny_llama

    folder = root / "tiny"
    if not (folder / "config.json").is_file():
        make_tiny_llama(0).save_pretrained(folder)
    return folder


def recipe_for(model: str, config: str) -> Recipe:
    path, overrides = MODELS[model]
    base = Recipe.from_yaml(path) if path else Recipe()
    return base.with_overrides(
        **{
            **overrides,
            **CONFIGS[config],
            "train.device": "cpu",
            "train.steps": STEPS,
            "train.warmup_steps": 1,
        }
    )


def setup_trainer(folder: str, recipe_dict: dict[str, Any]) -> Callable[[], object]:
    """Load and palettize the model, make the blocks; return the measured run (2 steps)."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    import edkm
    import edkm.train.loop as loop
    from edkm.train.distill import make_teacher

    recipe = Recipe.from_dict(recipe_dict)
    torch.manual_seed(recipe.train.seed)
    dtype = getattr(torch, recipe.train.weights_dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    # a distilled recipe trains against a frozen dense copy, made before palettizing (as compress)
    teacher = make_teacher(model) if recipe.train.distill > 0 else None
    edkm.palettize_(model, recipe.dkm)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    cfg = dataclasses.replace(recipe.train, checkpoint_every=10**6)
    n = cfg.batch_size * cfg.grad_accum * STEPS
    blocks = torch.randint(0, vocab, (n, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    loop.save_checkpoint = lambda run_dir, **kw: Path(run_dir)  # type: ignore[assignment]
    run_dir = tempfile.mkdtemp(prefix="edkm-plan-check-")

    def run() -> object:
        return loop.train(
            model,
            blocks,
            cfg,
            run_dir=run_dir,
            show_progress=False,
            teacher=teacher,
            offload=recipe.offload,
        )

    run.model = model  # type: ignore[attr-defined]
    run.teacher = teacher  # type: ignore[attr-defined]
    run.blocks = blocks  # type: ignore[attr-defined]
    return run


def check(model: str, config: str, folder: Path, rss: bool) -> dict[str, Any]:
    from edkm.memory.tracker import measure_peak
    from edkm.plan import make_plan

    recipe = recipe_for(model, config)
    rec: dict[str, Any] = {"model": model, "config": config, "folder": str(folder)}
    rec["recipe"] = recipe.to_dict()
    start = time.perf_counter()
    plan = make_plan(folder, recipe, device_memory=1, kind="cpu", advise=False)
    rec["plan_seconds"] = round(time.perf_counter() - start, 1)
    rec["plan"] = plan.to_dict()
    step = plan.step
    rec["predicted_peak_bytes"] = step.peak_bytes
    rec["predicted_host_pool_bytes"] = step.host_pool_bytes
    rec["predicted_dkm_bytes"] = plan.dkm_bytes
    rec["table_rows"] = plan.table_rows

    start = time.perf_counter()
    run = setup_trainer(str(folder), recipe.to_dict())
    existing = [run.model, run.blocks, run.teacher]  # type: ignore[attr-defined]
    rep = measure_peak(run, existing=[m for m in existing if m is not None])
    rec["measure_seconds"] = round(time.perf_counter() - start, 1)
    rec["measured_peak_bytes"] = rep.peak_bytes
    rec["measured_by_category"] = rep.by_category
    rec["measured_host_pool_bytes"] = rep.peak_host_bytes
    rec["ratio_memtracker"] = round(step.peak_bytes / rep.peak_bytes, 4)
    # the blocks of the measured run are n x seq; the planner's are one micro-batch: the
    # baseline differs by the blocks, which the trainer keeps on the host anyway
    if rss:
        predicted = step.peak_bytes - step.baseline_bytes + step.host_pool_bytes
        rec["predicted_rss_growth_bytes"] = predicted
        for key, env in (("", None), ("_fixed_mmap", FIXED_MMAP)):
            got = subprocess_peak_rss(setup_trainer, str(folder), recipe.to_dict(), env=env)
            rec[f"measured_rss_growth{key}_bytes"] = got["peak_rss_delta"]
            rec[f"ratio_rss{key}"] = round(predicted / max(1, got["peak_rss_delta"]), 4)
    return rec


# glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so later
# tensors of a few MiB come from the heap, whose freed pages stay resident; a fixed threshold
# (128 KiB, glibc's initial value) maps and unmaps every tensor above it, and RSS follows the
# live tensors
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}

COLUMNS = [
    ("model", "model", ""),
    ("config", "config", ""),
    ("table_rows", "DKM tables", ""),
    ("predicted_peak_s", "predicted peak", ""),
    ("measured_peak_s", "measured peak (MemTracker)", ""),
    ("ratio_memtracker", "ratio", ".3f"),
    ("predicted_rss_s", "predicted RSS growth", ""),
    ("measured_rss_s", "measured RSS growth", ""),
    ("ratio_rss", "ratio RSS", ".3f"),
    ("measured_rss_fixed_s", "measured RSS growth, fixed mmap threshold", ""),
    ("ratio_rss_fixed_mmap", "ratio", ".3f"),
]


def _pretty(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        row = dict(r)
        row["predicted_peak_s"] = fmt_bytes(r["predicted_peak_bytes"])
        row["measured_peak_s"] = fmt_bytes(r["measured_peak_bytes"])
        row["predicted_rss_s"] = fmt_bytes(r.get("predicted_rss_growth_bytes"))
        row["measured_rss_s"] = fmt_bytes(r.get("measured_rss_growth_bytes"))
        row["measured_rss_fixed_s"] = fmt_bytes(r.get("measured_rss_growth_fixed_mmap_bytes"))
        out.append(row)
    return out


def markdown(records: list[dict[str, Any]], command: str) -> str:
    env = records[0]["env"] if records else {}
    lines = [
        "# Planner vs measured trainer (CPU)",
        "",
        f"Command: `{command}`; device: {env.get('device', '?')}, torch {env.get('torch', '?')}.",
        "Predicted: `edkm.plan.make_plan(..., kind='cpu')` (FakeTensorMode, warm-up + two steps). Measured: "
        f"the trainer (`edkm.train.loop.train`, {STEPS} steps) under MemTracker, and the same run's "
        "peak RSS growth in a fresh interpreter, with glibc's default allocator settings and with "
        f"a fixed mmap threshold (`{' '.join(f'{k}={v}' for k, v in FIXED_MMAP.items())}`). "
        "Ratio = predicted / measured.",
        "",
        "| " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in _pretty(records):
        cells = []
        for key, _, spec in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, spec) if spec else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _replace_in_strings(value: Any, prefixes: dict[str, str]) -> Any:
    """``value`` with every string starting with a key of ``prefixes`` given that key's name."""
    if isinstance(value, dict):
        return {k: _replace_in_strings(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_in_strings(v, prefixes) for v in value]
    if isinstance(value, str):
        for prefix, name in prefixes.items():
            if value.startswith(prefix):
                return name + value[len(prefix) :]
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,default")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS runs")
    p.add_argument("--name", default="plan_check")
    args = p.parse_args(argv)
    from edkm.io.models import default_model_dir
    from edkm.io.paths import cache_dir

    tmp = Path(tempfile.mkdtemp(prefix="edkm-plan-check-models-"))
    records = []
    for model in args.models.split(","):
        folder = tiny_folder(tmp) if model == "tiny" else default_model_dir()
        for config in args.configs.split(","):
            print(f"[plan_check] {model} / {config}", file=sys.stderr, flush=True)
            rec = check(model, config, folder, rss=not args.no_rss)
            rec["env"] = environment("cpu")
            records.append(rec)
            print(
                f"[plan_check]   predicted {fmt_bytes(rec['predicted_peak_bytes'])}, measured "
                f"{fmt_bytes(rec['measured_peak_bytes'])}, ratio {rec['ratio_memtracker']}",
                file=sys.stderr,
                flush=True,
            )
    # the results name no folder of this machine
    records = _replace_in_strings(
        records, {str(cache_dir()): "<edkm cache>", str(tmp): "<temporary folder>"}
    )
    write_records(args.name, records)
    command = "python benchmarks/plan_check.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    (RESULTS / f"{args.name}.md").write_text(markdown(records, command.strip()))
    print_table(_pretty(records), COLUMNS, title="planner vs measured (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
