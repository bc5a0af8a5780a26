"""``edkm compress``: the command-line face of :func:`edkm.compress.compress`.

Example:
    $ edkm compress --model default --data default --bits 3 --out runs/smollm2-3bit
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
from pathlib import Path

from edkm.cli.main import DATA_HELP, TEXT_COLUMN_HELP
from edkm.errors import InputError, check_bits

_EPILOG = """\
Options given on the command line override the recipe (--config). An output folder that
already holds a run is refused unless --resume (continue from its newest checkpoint; the
recipe must be the same) or --overwrite (start over). SIGTERM or Ctrl-C finishes the current
step, writes a checkpoint and exits; run the same command with --resume to continue.

Examples:
  edkm compress --model default --data default --bits 3 --out runs/smollm2-3bit
  edkm compress --config recipes/smollm2_3bit_quality.yaml --out runs/quality
  edkm compress --model default --prepass slice:0.2 --bits 4 --out runs/sliced20-4bit
  edkm compress --model ~/models/llama-7b --config recipes/llama7b_3bit.yaml --out runs/7b"""


def build_compress(sub: argparse._SubParsersAction) -> None:
    """Register the ``compress`` subcommand."""
    p = sub.add_parser(
        "compress",
        help="fine-tune with DKM, save the palettized model, write a report",
        description=textwrap.fill(
            "Fine-tune MODEL on the training split of DATA while clustering the weights of its "
            "decoder Linear layers into 2^BITS-entry lookup tables (DKM), then save LUT + "
            "packed indices to OUT/model and write OUT/report.md and OUT/report.json comparing "
            "the held-out perplexity of the original model, post-training baselines at the "
            "same bits, and the eDKM model (soft, and hard as reloaded from disk).",
            width=88,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face folder or 'default' "
        "(SmolLM2-135M-Instruct); default: the recipe's, else 'default'",
    )
    p.add_argument(
        "--data",
        default=None,
        help=f"{DATA_HELP}; default: the recipe's, else 'default'",
    )
    p.add_argument(
        "--text-column",
        default=None,
        metavar="COLUMN",
        help=f"{TEXT_COLUMN_HELP}; default: the recipe's text_column, else 'text'",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        help="bits per index, 1..8 (LUT of 2^BITS entries); default: the recipe's, else 3",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="RECIPE.yaml",
        help="YAML recipe with sections model, data, dkm, train, lut_tune, eval, offload "
        "and keys prepass, prepass_calib_blocks, prepass_recovery_steps (see recipes/)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for the run")
    p.add_argument("--steps", type=int, default=None, help="override train.steps of the recipe")
    p.add_argument("--seed", type=int, default=None, help="override train.seed of the recipe")
    p.add_argument(
        "--device",
        choices=["auto", "cpu"],
        default=None,
        help="override train.device: 'auto' uses a GPU when present",
    )
    p.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override offload.enabled: keep what the DKM layers save for backward in host "
        "memory during training (marshaling; same results, less device memory)",
    )
    p.add_argument(
        "--prepass",
        action="append",
        default=None,
        metavar="NAME:AMOUNT",
        help="run a pre-pass before palettization, e.g. 'slice:0.25' (SliceGPT, delete 25%% of "
        "the hidden size) or 'prune:0.2' (LLM-Pruner: remove round(0.2 x count) key/value-head "
        "groups and MLP channels in every block, then prepass_recovery_steps LoRA steps); "
        "repeat for several, run in order; overrides the recipe's prepass",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue the run in OUT from its newest checkpoint"
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete the run in OUT and start over"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    """Execute ``edkm compress``; returns the exit status."""
    from edkm.config import Recipe

    if args.bits is not None:
        check_bits(args.bits, "--bits")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    recipe = Recipe.from_yaml(args.config) if args.config is not None else Recipe()
    overrides: dict[str, object] = {}
    for key, value in (
        ("model", args.model),
        ("data", args.data),
        ("text_column", args.text_column),
        ("dkm.bits", args.bits),
        ("train.steps", args.steps),
        ("train.seed", args.seed),
        ("train.device", args.device),
        ("offload.enabled", args.offload),
    ):
        if value is not None:
            overrides[key] = value
    if args.prepass is not None:
        from edkm.prepass import parse_spec

        for spec in args.prepass:
            parse_spec(spec)  # one clear line for a bad NAME:AMOUNT
        overrides["prepass"] = list(args.prepass)
    if args.steps is not None and recipe.train.warmup_steps > args.steps:
        overrides["train.warmup_steps"] = args.steps // 10
    recipe = recipe.with_overrides(**overrides)

    from edkm.compress import compress
    from edkm.eval.report import render_markdown
    from edkm.train.loop import TrainingInterrupted

    try:
        report = compress(
            recipe,
            out=args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            show_progress=not args.quiet,
        )
    except TrainingInterrupted as stop:
        print(
            f"edkm compress: {stop}\nresume with: edkm compress ... --out {args.out} --resume",
            file=sys.stderr,
        )
        return 128 + stop.signum if stop.signum in (signal.SIGINT, signal.SIGTERM) else 1
    if not report:  # a rank other than 0 under torchrun / accelerate launch: rank 0 reports
        return 0
    print(render_markdown(report))
    print(f"report: {args.out / 'report.md'}  model: {args.out / 'model'}")
    return 0
