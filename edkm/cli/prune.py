"""``edkm prune``: LLM-Pruner a LLaMA-family model, recover it with LoRA, save a loadable folder.

Example:
    $ edkm prune --model default --ratio 0.2 --importance taylor1 --layers 4:-2 --out runs/p20
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path
from typing import Any

from edkm.cli.main import DATA_HELP, TEXT_COLUMN_HELP
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
    p.add_argument(
        "--calib", default="default", metavar="DATA", help=f"calibration text: {DATA_HELP}"
    )
    p.add_argument("--text-column", default="text", metavar="COLUMN", help=TEXT_COLUMN_HELP)
    p.add_argument(
        "--calib-blocks",
        type=int,
        default=32,
        help="calibration blocks for the importance (default: %(default)s)",
    )
    p.add_argument(
        "--calib-seq-len", type=int, default=256, help="tokens per block (default: %(default)s)"
    )
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
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the model while pruning and of the weights saved",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        metavar="N",
        help="also score the first N held-out windows of 512 tokens before, after pruning and "
        "after recovery (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (random importance, LoRA)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a pruned folder in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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


def _check_out(out: Path, overwrite: bool) -> None:
    from edkm.prepass import is_structured_dir

    if out.exists() and not out.is_dir():
        raise InputError(f"output path '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output folder '{out}' is not empty (pass --overwrite to replace it)")
        if not is_structured_dir(out):
            raise InputError(
                f"output folder '{out}' holds files that are not a pre-passed model; refusing "
                "to replace it with --overwrite (choose another --out)"
            )


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

    from edkm.eval.perplexity import eval_blocks, perplexity_of_blocks
    from edkm.io.data import load_split, token_blocks, tokenize
    from edkm.io.loading import load_any_model
    from edkm.prepass import manifests_of, save_structured
    from edkm.prepass.prune import parameter_count, parse_layers, prune_model
    from edkm.prepass.prune_recover import lora_recover

    for name, value, least in (
        ("--calib-blocks", args.calib_blocks, 1),
        ("--calib-seq-len", args.calib_seq_len, 2),
        ("--recovery-steps", args.recovery_steps, 0),
        ("--recovery-blocks", args.recovery_blocks, 1),
        ("--lora-rank", args.lora_rank, 1),
        ("--eval-windows", args.eval_windows, 0),
    ):
        if value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    if not args.recovery_lr > 0:
        raise InputError(f"--recovery-lr must be positive, got {args.recovery_lr}")
    ratio = parse_ratio(args.ratio)
    blocks_before = _num_blocks(args.model)
    if blocks_before is not None:  # a bad range fails before the model loads
        parse_layers(args.layers, blocks_before)
    _check_out(args.out, args.overwrite)
    t0 = time.perf_counter()
    model, tokenizer = load_any_model(args.model, dtype=getattr(torch, args.dtype))
    split = load_split(args.calib, text_column=args.text_column)
    train = token_blocks(
        tokenize(tokenizer, split.train_text), args.calib_seq_len, what="the calibration text"
    )
    calib = train[: args.calib_blocks]
    windows = None
    result: dict[str, Any] = {}
    show = not args.quiet

    def measure(label: str) -> None:
        if windows is not None:
            result[f"{label}_ppl"] = perplexity_of_blocks(
                model, windows, desc=label, show_progress=show
            ).ppl

    if args.eval_windows:
        windows = eval_blocks(
            tokenizer, split.eval_text, seq_len=512, max_windows=args.eval_windows
        )
        measure("dense")
    manifest = prune_model(
        model,
        calib,
        ratio,
        importance=args.importance,
        level=args.level,
        aggregate=args.aggregate,
        layers=args.layers,
        scope=args.scope,
        seed=args.seed,
        show_progress=show,
    )
    measure("pruned")
    if args.recovery_steps:
        model, info = lora_recover(
            model,
            train[: args.recovery_blocks],
            steps=args.recovery_steps,
            lr=args.recovery_lr,
            rank=args.lora_rank,
            seed=args.seed,
            show_progress=show,
        )
        manifest["recovery"] = info
        measure("recovered")
    save_structured(model, args.out, manifests_of(model), tokenizer=tokenizer)
    before, after = manifest["params_before"], parameter_count(model)
    w = manifest["widths"]
    print(
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
    if result:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    print(f"saved: {args.out}")
    return 0
