"""A LLaMA-7B-shaped model trained a few steps with a recipe: measured peak and tokens/s against
``edkm plan``'s prediction.

The model is built from ``recipes/llama7b_config.json`` with random weights directly on the
device in the recipe's ``weights_dtype`` (no download, no host copy), palettized with
``edkm.palettize_`` (``--fast-init``: evenly spaced centroids, the same shapes, no k-means++
over 6.5B weights), and trained by the real trainer (``edkm.train.loop.train``) on random
tokens for ``--steps`` steps, checkpoint writing off. Measured:

- **GPU**: ``torch.cuda.max_memory_allocated`` over the run (reset after the model is built,
  so the peak includes the weights), tokens/s of the steps after the first (from the train
  log), and the host's peak RSS;
- **CPU** (``--tiny``, to check the script itself): PyTorch's MemTracker over the same run.

Predicted: ``edkm.plan.make_plan(config, recipe)`` in the same process before the model is
built (FakeTensorMode, nothing allocated). The record holds both, their ratio, and the
planner's table; it goes to ``benchmarks/results/llama7b_<device>.json`` (+ ``.md``).

Run (GPU, ~24 GiB needed by the shipped recipe):
    python benchmarks/llama7b_gpu.py --steps 3
    python benchmarks/llama7b_gpu.py --tiny      # CPU, tests/data/tiny_llama_config.json, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks._common import RESULTS, environment, fmt_bytes  # noqa: E402
from edkm.config import Recipe  # noqa: E402

ROOT = _HERE.parent


def build(config: Any, recipe: Recipe, device: torch.device, fast_init: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    import edkm
    from edkm.plan.step import palettize_symbolic

    dtype = getattr(torch, recipe.train.weights_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            config._attn_implementation = "sdpa"
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    if fast_init:
        palettize_symbolic(model, recipe)
    else:
        edkm.palettize_(model, recipe.dkm)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(ROOT / "recipes" / "llama7b_config.json"))
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "llama7b_3bit.yaml"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device-memory", default=None, help="for the plan (default: the GPU's)")
    p.add_argument(
        "--tiny", action="store_true", help="CPU check of this script on the tiny config"
    )
    p.add_argument(
        "--fast-init", action="store_true", help="evenly spaced centroids (no k-means++)"
    )
    p.add_argument("--out", default=None, help="result name (default llama7b_<device>)")
    args = p.parse_args(argv)

    import edkm.train.loop as loop
    from edkm.plan import make_plan, parse_bytes, render
    from edkm.plan.step import model_config

    config_path = (
        str(ROOT / "tests" / "data" / "tiny_llama_config.json") if args.tiny else args.config
    )
    recipe = Recipe.from_yaml(args.recipe)
    changes: dict[str, Any] = {"train.steps": args.steps, "train.warmup_steps": 1}
    if args.tiny:
        # grad_accum 2: the planner models two micro-batches; under MemTracker every further one
        # is inflated (ModTracker keeps each forward's graph nodes referenced)
        changes.update({"train.device": "cpu", "train.seq_len": 64, "train.batch_size": 2})
        changes["train.grad_accum"] = 2
    recipe = recipe.with_overrides(**changes)
    device = torch.device("cpu" if args.tiny else "cuda")
    kind = "cpu" if args.tiny else "gpu"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = 0
    budget = parse_bytes(args.device_memory) if args.device_memory else total

    config = model_config(config_path)
    start = time.perf_counter()
    plan = make_plan(config_path, recipe, device_memory=max(1, budget), kind=kind, advise=False)
    plan_s = time.perf_counter() - start
    print(render(plan), flush=True)

    torch.manual_seed(recipe.train.seed)
    model = build(config, recipe, device, args.fast_init)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    cfg = dataclasses.replace(recipe.train, checkpoint_every=10**6)
    n = cfg.batch_size * cfg.grad_accum * cfg.steps
    blocks = torch.randint(0, vocab, (n, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    loop.save_checkpoint = lambda run_dir, **kw: Path(run_dir)  # type: ignore[assignment]
    run_dir = tempfile.mkdtemp(prefix="edkm-llama7b-")

    def run() -> None:
        loop.train(model, blocks, cfg, run_dir=run_dir, show_progress=False, offload=recipe.offload)

    from edkm.eval.report import host_memory
    from edkm.memory.tracker import measure_peak

    start = time.perf_counter()
    rep = measure_peak(run, device=device, existing=[model, blocks])
    wall = time.perf_counter() - start
    log = loop.read_log(run_dir)
    later = log[1:] or log
    tok_s = sum(r["tokens_per_s"] for r in later) / len(later)
    predicted = plan.step.peak_bytes
    name = args.out or ("llama7b_tiny_cpu" if args.tiny else f"llama7b_{_slug(device)}")
    rec: dict[str, Any] = {
        "env": environment(device),
        "config": config_path,
        "recipe": recipe.to_dict(),
        "steps": cfg.steps,
        "measurement": rep.method,
        "measured_peak_bytes": rep.peak_bytes,
        "measured_by_category": rep.by_category or None,
        "predicted_peak_bytes": predicted,
        "ratio_predicted_to_measured": round(predicted / max(1, rep.peak_bytes), 4),
        "predicted_host_bytes": plan.host_bytes,
        "host": host_memory(),
        "tokens_per_s": round(tok_s, 1),
        "step_s": [r["step_s"] for r in log],
        "losses": [r["loss"] for r in log],
        "wall_s": round(wall, 1),
        "plan_s": round(plan_s, 1),
        "plan": plan.to_dict(),
        "device_memory_bytes": budget,
        "fits_measured": bool(budget) and rep.peak_bytes <= budget,
    }
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    md = [
        f"# {name}",
        "",
        f"Command: `python benchmarks/llama7b_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Device: {rec['env'].get('device')}; torch {rec['env'].get('torch')}.",
        "",
        "| predicted peak | measured peak | ratio | tokens/s | host peak RSS |",
        "|---:|---:|---:|---:|---:|",
        f"| {fmt_bytes(predicted)} | {fmt_bytes(rep.peak_bytes)} | "
        f"{rec['ratio_predicted_to_measured']:.3f} | {tok_s:,.0f} | "
        f"{rec['host']['peak_rss_mib']:,.0f} MiB |",
        "",
        "```",
        render(plan),
        "```",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print(
        f"predicted {fmt_bytes(predicted)}, measured {fmt_bytes(rep.peak_bytes)} "
        f"({rep.method}), ratio {rec['ratio_predicted_to_measured']:.3f}, {tok_s:,.0f} tokens/s; "
        f"wrote {RESULTS / (name + '.json')}"
    )
    return 0


def _slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main())
