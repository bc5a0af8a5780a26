"""DKM's share of a training step of the default model, side by side in one run.

Rows: the same optimizer step (forward, backward, AdamW) on the same batch of the default model
(SmolLM2-135M), once as it is and once with every decoder Linear palettized at ``--bits`` per
tensor (uniquified DKM, 3 iterations); with ``--group-sizes``, once more for each LUT layout of
that many output channels per LUT (``granularity: per_grouped_channel``). The steps alternate
(plain, DKM, DKM grouped, plain, ...) so that every row sees the same machine state; the median
of the timed steps is reported after warm-up steps, with each row's ``edkm.palettize_`` time
(centroid initialisation).

Usage:
    python benchmarks/train_step.py [--batch 8] [--seq-len 256] [--steps 5] [--warmup 2]
    python benchmarks/train_step.py --bits 4 --group-sizes 16,64 --name train_step_grouped

Writes benchmarks/results/<name>.json (default train_step) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, bf16: bool
) -> float:
    t0 = time.perf_counter()
    # as the trainer does: bf16 autocast where the CPU runs bf16 natively, fp32 elsewhere
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    parser.add_argument("--method", default="auto", help="DKM method (auto, unique, reference)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument(
        "--group-sizes", default="", help="comma-separated output channels per LUT (extra rows)"
    )
    parser.add_argument("--name", default="train_step", help="results file stem")
    args = parser.parse_args(argv)
    groups = [int(g) for g in args.group_sizes.split(",") if g.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import edkm
    from edkm.io.models import load_model
    from edkm.train.loop import bf16_supported

    bf16 = bf16_supported(torch.device("cpu"))

    base, _ = load_model("default", dtype=torch.float32)
    base.train()
    models: dict[str, torch.nn.Module] = {}
    palettize_s: dict[str, float] = {}
    layouts: dict[str, dict[str, Any]] = {"dkm": {}}
    layouts.update(
        {f"dkm_g{g}": {"granularity": "per_grouped_channel", "group_size": g} for g in groups}
    )
    for name, layout in layouts.items():
        model = copy.deepcopy(base)
        config = edkm.DKMConfig(bits=args.bits, iters=3, method=args.method, **layout)
        t0 = time.perf_counter()
        summary = edkm.palettize_(model, config)
        palettize_s[name] = time.perf_counter() - t0
        models[name] = model.train()
    models = {"plain": base, **models}
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=gen)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name in models:
            dt = _step(models[name], opts[name], batch, bf16)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["dkm"] / med["plain"] - 1
    record = {
        "benchmark": "train_step",
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "autocast": "bf16" if bf16 else "off (no native bf16 on this CPU)",
        "dkm": {
            "bits": args.bits,
            "iters": 3,
            "method": args.method,
            "layers": summary.num_layers,
            "weights": summary.num_params,
            "group_sizes": groups,
        },
        "median_step_s": med,
        "all_step_s": times,
        "palettize_s": palettize_s,
        "dkm_overhead": overhead,
        "command": "python benchmarks/train_step.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| row | median step (s) | vs plain | palettize_ (s) |")
    print("|---|---:|---:|---:|")
    print(f"| plain step (no DKM) | {med['plain']:.3f} | 1.00 | |")
    for name, layout in layouts.items():
        what = f"LUTs of {layout['group_size']} output channels" if layout else "per tensor"
        print(
            f"| DKM on {summary.num_layers} layers, {args.bits} bits, {what} | {med[name]:.3f} | "
            f"{med[name] / med['plain']:.2f} | {palettize_s[name]:.1f} |"
        )
    print(f"DKM overhead (per tensor): {overhead:.1%} of the plain step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
