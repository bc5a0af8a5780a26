"""``edkm prune``: LLM-Pruner a LLaMA-family model, recover it with LoRA, save a loadable folder.

Example:
    $ edkm prune --model default --ratio 0.2 --importance taylor1 --layers 4:-2 --out runs/p20
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time

from edkm.cli.prepass_args import (
    PrepassRun,
    add_calibration_arguments,
    add_output_arguments,
    check_at_least,
    check_out,
)
from edkm.errors import InputError

_EPILOG = """\
Groups: in every block of --layers, one attention group per key/value head (with the query
heads sharing it and their o_proj columns) and one MLP group per intermediate channel (a
gate_proj and up_proj row and a down_proj column). --ratio R removes round(R * count) groups of
each kind per selected block, the least important first (on SmolLM2-135M, 0.2 removes 307 of
1536 MLP channels and 1 of 3 key/value heads, i.e. 3 of 9 query heads). The output folder is a
Hugging Face folder (config.json, model.safetensors, tokenizer) whose config.json lists every
block's widths under quantization_config.prepass; `edkm eval --model OUT`,
edkm.prepass.load_structured(OUT) and AutoModelForCausalLM.from_pretrained(OUT) (after `import
edkm`) load it, and `edkm compress --model OUT` palettizes it.

Examples:
  edkm prune --model default --ratio 0.2 --layers 4:-2 --out runs/pruned20
  edkm prune --model default --ratio 0.2 --importance mix --aggregate sum --out runs/mix20
  edkm prune --model default --ratio 0.2 --importance l2 --recovery-steps 0 --out runs/l2"""


def build_prune(sub: argparse._SubParsersAction) -> None:
    """Register the ``prune`` subcommand."""
    from edkm.prepass.prune_importance import AGGREGATES, IMPORTANCES, LEVELS

    p = sub.add_parser(
        "prune",
        help="LLM-Pruner: remove attention-head and MLP-channel groups, recover with LoRA",
        description=textwrap.fill(
            "Remove the least important coupled groups (key/value heads with their query "
            "heads, MLP channels) from MODEL, importance estimated on calibration text (the "
            "training split of --calib), then fine-tune LoRA adapters on the training split "
            "and merge them (LLM-Pruner, Ma et al., NeurIPS 2023), and save the pruned model to "
            "OUT.",
            width=88,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="local Hugging Face folder or 'default'")
    p.add_argument(
        "--ratio",
        required=True,
        help="share of each selected block's groups of each kind to remove, in [0, 1)",
    )
    p.add_argument(
        "--importance",
        choices=IMPORTANCES,
        default="taylor1",
        help="taylor1 |W*g|, taylor2 |W^2*F/2| (diagonal Fisher), mix |W*g - W^2*F/2|, or the "
        "baselines l2 and random (default: %(default)s)",
    )
    p.add_argument(
        "--level",
        choices=LEVELS,
        default="element",
        help="element-wise or vector-wise Taylor importance (default: %(default)s)",
    )
    p.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="sum",
        help="how a group's layers' scores combine (default: %(default)s)",
    )
    p.add_argument(
        "--layers",
        default="all",
        help="blocks to prune: 'all', START:STOP (a Python slice, e.g. 4:-2) or one index "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--scope",
        choices=["both", "attention", "mlp"],
        default="both",
        help="which group kinds to prune (default: %(default)s)",
    )
    add_calibration_arguments(p, blocks=32, blocks_help="calibration blocks for the importance")
    p.add_argument(
        "--recovery-steps",
        type=int,
        default=50,
        help="LoRA recovery steps on the training split (0: none; default: %(default)s)",
    )
    p.add_argument(
        "--recovery-blocks",
        type=int,
        default=256,
        help="training blocks LoRA recovery cycles through (default: %(default)s)",
    )
    p.add_argument("--recovery-lr", type=float, default=2e-4, help="LoRA learning rate")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    add_output_arguments(
        p,
        what="pruned",
        dtype_help="dtype of the model while pruning and of the weights saved",
        eval_help="before, after pruning and after recovery",
        seed_help="seed (random importance, LoRA)",
    )
    p.set_defaults(func=run_prune)


def parse_ratio(text: str) -> float:
    """``--ratio``: one number in [0, 1).

    Example:
        >>> parse_ratio("0.2")
        0.2
        >>> parse_ratio("1")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: --ratio must be a number in [0, 1) (the share of each selected block's groups to remove), got 1
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise InputError(
            "--ratio must be a number in [0, 1) (the share of each selected block's groups to "
            f"remove), got {text}"
        )
    return value


def _num_blocks(spec: str) -> int | None:
    """Block count from a model folder's config.json (None when it cannot be read cheaply)."""
    from edkm.io.models import resolve_model_path

    try:
        config = json.loads((resolve_model_path(spec) / "config.json").read_text())
        return int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, InputError):
        return None


def run_prune(args: argparse.Namespace) -> int:
    """Execute ``edkm prune``; returns the exit status."""
    import torch

    from edkm.io.loading import load_any_model
    from edkm.prepass import manifests_of, save_structured
    from edkm.prepass.prune import parameter_count, parse_layers, prune_model
    from edkm.prepass.prune_recover import lora_recover

    check_at_least(
        [
            ("--calib-blocks", args.calib_blocks, 1),
            ("--calib-seq-len", args.calib_seq_len, 2),
            ("--recovery-steps", args.recovery_steps, 0),
            ("--recovery-blocks", args.recovery_blocks, 1),
            ("--lora-rank", args.lora_rank, 1),
            ("--eval-windows", args.eval_windows, 0),
        ]
    )
    if not args.recovery_lr > 0:
        raise InputError(f"--recovery-lr must be positive, got {args.recovery_lr}")
    ratio = parse_ratio(args.ratio)
    blocks_before = _num_blocks(args.model)
    if blocks_before is not None:  # a bad range fails before the model loads
        parse_layers(args.layers, blocks_before)
    check_out(args.out, args.overwrite, "pre-passed")
    t0 = time.perf_counter()
    model, tokenizer = load_any_model(args.model, dtype=getattr(torch, args.dtype))
    run = PrepassRun(args, tokenizer)
    run.measure(model, "dense")
    manifest = prune_model(
        model,
        run.calib,
        ratio,
        importance=args.importance,
        level=args.level,
        aggregate=args.aggregate,
        layers=args.layers,
        scope=args.scope,
        seed=args.seed,
        show_progress=run.show,
    )
    run.measure(model, "pruned")
    if args.recovery_steps:
        model, info = lora_recover(
            model,
            run.train[: args.recovery_blocks],
            steps=args.recovery_steps,
            lr=args.recovery_lr,
            rank=args.lora_rank,
            seed=args.seed,
            show_progress=run.show,
        )
        manifest["recovery"] = info
        run.measure(model, "recovered")
    save_structured(model, args.out, manifests_of(model), tokenizer=tokenizer)
    before, after = manifest["params_before"], parameter_count(model)
    w = manifest["widths"]
    run.finish(
        f"pruned {args.model} ({args.importance}, ratio {ratio:g}, blocks {args.layers}): "
        f"heads {min(x['heads'] for x in w)}..{max(x['heads'] for x in w)}, MLP "
        f"{min(x['intermediate'] for x in w)}..{max(x['intermediate'] for x in w)}, "
        f"parameters {before:,} -> {after:,} ({after / before:.3f}x)"
        + (
            f", LoRA recovery {args.recovery_steps} steps"
            if args.recovery_steps
            else ", no recovery"
        )
        + f", {time.perf_counter() - t0:.0f} s"
    )
    return 0
