"""LLM-Pruner on the default model: held-out perplexity after pruning, without and with LoRA
recovery, for Taylor importance against the l2 and random baselines at the same ratio, in one
run.

Every row prunes a fresh copy of the dense model with the same groups per block
(:func:`edkm.prepass.prune.prune_model`: ``--layers``, ``--ratio``), so the rows differ only in
which groups the importance picks; then the same LoRA recovery (peft, merged back,
:func:`edkm.prepass.prune_recover.lora_recover`) runs on the same training blocks. Calibration
and recovery text come from the training split, perplexity from the held-out split
(``edkm.eval.perplexity``'s protocol, the first ``--max-windows`` windows). Writes
``benchmarks/results/prune.json`` and a Markdown table ``prune.md``.

With ``--ablation``, instead: the Taylor importance variants (``taylor1``/``taylor2``/``mix``,
element- and vector-wise, each aggregate) without recovery, all from one gradient pass over the
calibration blocks, written to ``prune_ablation.json`` / ``.md``.

Example:
    $ python benchmarks/prune.py --ratio 0.2 --layers 4:-2 --calib-blocks 32 \\
        --calib-seq-len 256 --recovery-steps 50 --max-windows 8
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# run as a script, the repository root comes first on the path (so `benchmarks._common` imports
# without PYTHONPATH) and this folder is dropped (its modules must not shadow installed packages)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from benchmarks._common import RESULTS, environment, print_table, write_records  # noqa: E402


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from edkm.eval.perplexity import eval_blocks, perplexity_of_blocks
    from edkm.io.data import load_split, token_blocks, tokenize
    from edkm.io.loading import load_any_model
    from edkm.prepass.prune import parameter_count, prune_model
    from edkm.prepass.prune_recover import lora_recover

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--layers", default="4:-2")
    p.add_argument("--importances", default="taylor1,mix,l2,random")
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--recovery-steps", type=int, default=50)
    p.add_argument("--recovery-blocks", type=int, default=256)
    p.add_argument("--recovery-lr", type=float, default=2e-4)
    p.add_argument("--recovery-batch", type=int, default=2, help="blocks per LoRA step")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    p.add_argument("--max-windows", type=int, default=8, help="held-out windows scored")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--ablation", action="store_true", help="importance variants, no recovery")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("prune_ablation.json" if args.ablation else "prune.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    importances = [s.strip() for s in args.importances.split(",") if s.strip()]
    dense, tokenizer = load_any_model(args.model, dtype=torch.float32)
    split = load_split(args.data)
    train = token_blocks(tokenize(tokenizer, split.train_text), args.calib_seq_len)
    calib = train[: args.calib_blocks]
    recovery = train[: args.recovery_blocks]
    windows = eval_blocks(
        tokenizer, split.eval_text, seq_len=args.seq_len, max_windows=args.max_windows
    )
    setup: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "ratio": args.ratio,
        "layers": args.layers,
        "calibration": {"blocks": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "recovery": {
            "steps": args.recovery_steps,
            "blocks": int(recovery.shape[0]),
            "seq_len": int(recovery.shape[1]),
            "lr": args.recovery_lr,
            "batch": args.recovery_batch,
        },
        "eval": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        **environment(),
    }

    def measure(model: torch.nn.Module, label: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = perplexity_of_blocks(model, windows, desc=label, show_progress=False)
        return {"ppl": res.ppl, "eval_s": round(time.perf_counter() - t0, 1)}

    if args.ablation:
        return _ablation(dense, calib, args, setup, measure, argv)
    base_params = parameter_count(dense)
    records: list[dict[str, Any]] = [
        {
            "row": "dense",
            "importance": "-",
            "recovered": False,
            "params": base_params,
            **measure(dense, "dense"),
            **setup,
        }
    ]
    print(f"dense: ppl {records[0]['ppl']:.2f}, params {base_params:,}", flush=True)
    for importance in importances:
        model = copy.deepcopy(dense)
        manifest = prune_model(
            model,
            calib,
            args.ratio,
            importance=importance,
            layers=args.layers,
            seed=0,
            show_progress=False,
        )
        w = manifest["widths"]
        common = {
            "importance": importance,
            "params": parameter_count(model),
            "min_heads": min(x["heads"] for x in w),
            "min_intermediate": min(x["intermediate"] for x in w),
            "prune_s": manifest["time_s"],
        }
        row = {"row": f"{importance}", "recovered": False, **common}
        row.update(measure(model, importance), **setup)
        records.append(row)
        print(f"{row['row']}: ppl {row['ppl']:.2f}, params {row['params']:,}", flush=True)
        if args.recovery_steps:
            model, info = lora_recover(
                model,
                recovery,
                steps=args.recovery_steps,
                lr=args.recovery_lr,
                batch_size=args.recovery_batch,
                seed=0,
                show_progress=False,
            )
            row = {
                "row": f"{importance} + LoRA",
                "recovered": True,
                **common,
                "recovery_s": info["time_s"],
                "lora_loss_first": info["loss_first"],
                "lora_loss_last": info["loss_last"],
            }
            row.update(measure(model, f"{importance}+lora"), **setup)
            records.append(row)
            print(f"{row['row']}: ppl {row['ppl']:.2f}", flush=True)
        del model
    base_ppl = records[0]["ppl"]
    for r in records:
        r["ppl_x_dense"] = r["ppl"] / base_ppl
        r["params_x_dense"] = r["params"] / base_params
    write_records("prune", records, out=args.out)
    cols = [
        ("row", "model", ""),
        ("params", "parameters", ",d"),
        ("params_x_dense", "x dense", ".3f"),
        ("ppl", "perplexity", ".2f"),
        ("ppl_x_dense", "x dense", ".2f"),
    ]
    print_table(records, cols, title=f"LLM-Pruner at ratio {args.ratio:g}, blocks {args.layers}")
    md = [
        f"# LLM-Pruner on {args.model}: ratio {args.ratio:g} in blocks {args.layers}, "
        f"{setup['calibration']['blocks']} calibration blocks x "
        f"{setup['calibration']['seq_len']} tokens, LoRA recovery {args.recovery_steps} steps "
        f"(batch {args.recovery_batch}, lr {args.recovery_lr:g}) on {setup['recovery']['blocks']} training blocks, perplexity on the first "
        f"{setup['eval']['windows']} held-out windows x {setup['eval']['seq_len']} tokens",
        "",
        "| model | parameters | x dense | perplexity | x dense |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['row']} | {r['params']:,} | {r['params_x_dense']:.3f} | {r['ppl']:.2f} | "
            f"{r['ppl_x_dense']:.2f} |"
            for r in records
        ),
        "",
        f"Device: {setup['device']}, torch {setup['torch']}. Command: `python benchmarks/"
        f"prune.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    return records


ABLATION = [
    ("taylor1", "element", "sum"),
    ("taylor1", "element", "mean"),
    ("taylor1", "element", "max"),
    ("taylor1", "element", "prod"),
    ("taylor1", "element", "last"),
    ("taylor1", "vector", "sum"),
    ("taylor2", "element", "sum"),
    ("taylor2", "vector", "sum"),
    ("mix", "element", "sum"),
    ("mix", "vector", "sum"),
]


def _ablation(
    dense: torch.nn.Module,
    calib: torch.Tensor,
    args: argparse.Namespace,
    setup: dict[str, Any],
    measure: Any,
    argv: Sequence[str] | None,
) -> list[dict[str, Any]]:
    from edkm.adapters import get_adapter
    from edkm.prepass.prune import parameter_count, parse_layers, prune_model
    from edkm.prepass.prune_importance import accumulate_gradients

    adapter = get_adapter(dense)
    blocks = adapter.blocks()
    names = [
        f"{blocks[b][0]}.{slot.path}.weight"
        for b in parse_layers(args.layers, len(blocks))
        for groups in adapter.coupled_groups(b)
        for slot in groups.members
    ]
    t0 = time.perf_counter()
    stats = accumulate_gradients(dense, calib, names, show_progress=False)
    grad_s = round(time.perf_counter() - t0, 1)
    records: list[dict[str, Any]] = [
        {"row": "dense", "params": parameter_count(dense), **measure(dense, "dense"), **setup}
    ]
    for importance, level, how in ABLATION:
        model = copy.deepcopy(dense)
        manifest = prune_model(
            model,
            calib,
            args.ratio,
            importance=importance,
            level=level,
            aggregate=how,
            layers=args.layers,
            stats=stats,
            show_progress=False,
        )
        row = {
            "row": f"{importance} {level} {how}",
            "importance": importance,
            "level": level,
            "aggregate": how,
            "params": manifest["params_after"],
            "gradient_pass_s": grad_s,
            **measure(model, row_label := f"{importance}/{level}/{how}"),
            **setup,
        }
        records.append(row)
        print(f"{row_label}: ppl {row['ppl']:.2f}", flush=True)
        del model
    base = records[0]["ppl"]
    for r in records:
        r["ppl_x_dense"] = r["ppl"] / base
    write_records("prune_ablation", records, out=args.out)
    print_table(
        records,
        [
            ("row", "importance", ""),
            ("ppl", "perplexity", ".2f"),
            ("ppl_x_dense", "x dense", ".2f"),
        ],
        title=f"Taylor variants at ratio {args.ratio:g}, blocks {args.layers}, no recovery",
    )
    md = [
        f"# LLM-Pruner importance variants on {args.model}: ratio {args.ratio:g} in blocks "
        f"{args.layers}, no recovery, one gradient pass over {setup['calibration']['blocks']} "
        f"calibration blocks x {setup['calibration']['seq_len']} tokens ({grad_s:.0f} s), "
        f"perplexity on the first {setup['eval']['windows']} held-out windows x "
        f"{setup['eval']['seq_len']} tokens",
        "",
        "| importance | level | aggregate | parameters | perplexity | x dense |",
        "|---|---|---|---:|---:|---:|",
        *(
            f"| {r.get('importance', 'dense')} | {r.get('level', '-')} | "
            f"{r.get('aggregate', '-')} | {r['params']:,} | {r['ppl']:.2f} | "
            f"{r['ppl_x_dense']:.2f} |"
            for r in records
        ),
        "",
        f"Device: {setup['device']}, torch {setup['torch']}. Command: `python benchmarks/"
        f"prune.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    return records


if __name__ == "__main__":
    main()
