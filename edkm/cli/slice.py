"""``edkm slice``: SliceGPT a LLaMA-family model and save it as a loadable folder.

Example:
    $ edkm slice --model default --sparsity 0.25 --calib default --out runs/smollm2-sliced25
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
The output folder is a Hugging Face folder (config.json, model.safetensors, tokenizer) whose
config.json lists the slicing manifest under quantization_config.prepass; `edkm eval --model
OUT` and edkm.prepass.load_structured(OUT) load it, and `edkm compress --model OUT` palettizes
it. The LM head is untied from the embeddings (they are rotated differently), so on a small
model with tied embeddings slicing can remove fewer parameters than the head adds: the summary
prints both counts.

Examples:
  edkm slice --model default --sparsity 0.25 --calib default --out runs/sliced25
  edkm slice --model ~/models/llama --sparsity 0.3 --calib my_text.jsonl --round-to 64 --out s30
  edkm slice --model default --sparsity 0.2 --rotation none --out runs/dropped20  # baseline"""


def parse_sparsity(text: str) -> float | list[float]:
    """``--sparsity``: one number in [0, 1), or a comma-separated list (one per layer).

    Example:
        >>> parse_sparsity("0.25"), parse_sparsity("0.1,0.2")
        (0.25, [0.1, 0.2])
        >>> parse_sparsity("1.2")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: --sparsity must be in [0, 1) (the share of the hidden size to delete), got 1.2
    """
    try:
        values = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise InputError(
            f"--sparsity must be a number in [0, 1) or a comma-separated list of them, got {text!r}"
        ) from None
    for v in values:
        if not 0 <= v < 1:  # also false for nan
            raise InputError(
                f"--sparsity must be in [0, 1) (the share of the hidden size to delete), got {v:g}"
            )
    return values[0] if len(values) == 1 else values


def build_slice(sub: argparse._SubParsersAction) -> None:
    """Register the ``slice`` subcommand."""
    p = sub.add_parser(
        "slice",
        help="SliceGPT: rotate a LLaMA-family model by PCA and delete residual channels",
        description=textwrap.fill(
            "Rotate the residual stream of MODEL at every norm by the principal axes of its "
            "signal on calibration text (the training split of --calib), delete the share "
            "--sparsity of the hidden size from the embeddings, every block's input and output "
            "Linear layers and the LM head (SliceGPT, Ashkboos et al., ICLR 2024), and save the "
            "sliced model to OUT. Heads (GQA included) are left as they are.",
            width=88,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="local Hugging Face folder or 'default'")
    p.add_argument(
        "--sparsity",
        required=True,
        help="share of the hidden size to delete, in [0, 1) (0 rotates only); a comma-separated "
        "list gives one per layer (the embedding takes the first layer's, the head the last's)",
    )
    p.add_argument(
        "--calib", default="default", metavar="DATA", help=f"calibration text: {DATA_HELP}"
    )
    p.add_argument("--text-column", default="text", metavar="COLUMN", help=TEXT_COLUMN_HELP)
    p.add_argument(
        "--calib-blocks", type=int, default=128, help="calibration blocks (default: %(default)s)"
    )
    p.add_argument(
        "--calib-seq-len", type=int, default=256, help="tokens per block (default: %(default)s)"
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=8,
        help="kept widths are rounded down to a multiple of this (1: no rounding; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--rotation",
        choices=["pca", "none"],
        default="pca",
        help="'pca' (SliceGPT) or 'none' (keep the first channels unrotated: a baseline)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the weights saved (the rotation math runs in float64 either way)",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        metavar="N",
        help="also score the first N held-out windows of 512 tokens before and after (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (random rotations only)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a sliced folder in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_slice)


def _check_out(out: Path, overwrite: bool) -> None:
    from edkm.prepass import is_structured_dir

    if out.exists() and not out.is_dir():
        raise InputError(f"output path '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output folder '{out}' is not empty (pass --overwrite to replace it)")
        if not is_structured_dir(out):
            raise InputError(
                f"output folder '{out}' holds files that are not a sliced model; refusing to "
                "replace it with --overwrite (choose another --out)"
            )


def run_slice(args: argparse.Namespace) -> int:
    """Execute ``edkm slice``; returns the exit status."""
    import torch

    from edkm.eval.perplexity import eval_blocks, perplexity_of_blocks
    from edkm.io.data import load_split, token_blocks, tokenize
    from edkm.io.models import load_model
    from edkm.prepass import save_structured
    from edkm.prepass.slicegpt import parameter_count, slice_model

    for name, value, least in (
        ("--calib-blocks", args.calib_blocks, 1),
        ("--calib-seq-len", args.calib_seq_len, 2),
        ("--round-to", args.round_to, 1),
        ("--eval-windows", args.eval_windows, 0),
    ):
        if value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    sparsity = parse_sparsity(args.sparsity)
    _check_out(args.out, args.overwrite)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    split = load_split(args.calib, text_column=args.text_column)
    calib = token_blocks(
        tokenize(tokenizer, split.train_text), args.calib_seq_len, what="the calibration text"
    )[: args.calib_blocks]
    windows = None
    result: dict[str, Any] = {}
    if args.eval_windows:
        windows = eval_blocks(
            tokenizer, split.eval_text, seq_len=512, max_windows=args.eval_windows
        )
        result["dense_ppl"] = perplexity_of_blocks(
            model, windows, desc="dense", show_progress=not args.quiet
        ).ppl
    manifest = slice_model(
        model,
        calib,
        sparsity,
        round_to=args.round_to,
        rotation=args.rotation,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    if windows is not None:
        result["sliced_ppl"] = perplexity_of_blocks(
            model, windows, desc="sliced", show_progress=not args.quiet
        ).ppl
    save_structured(model, args.out, [manifest], tokenizer=tokenizer)
    before, after = manifest["params_before"], parameter_count(model)
    dims = manifest["dims"]
    print(
        f"sliced {args.model}: residual width {manifest['hidden_size']} -> {min(dims)}"
        + (f"..{max(dims)}" if min(dims) != max(dims) else "")
        + f", parameters {before:,} -> {after:,} ({after / before:.3f}x"
        + (
            ", more than dense: the untied LM head and the shortcut matrices outweigh the slicing"
            if after > before
            else ""
        )
        + f"), {manifest['calibration']['blocks']} calibration blocks x "
        f"{manifest['calibration']['seq_len']} tokens, {time.perf_counter() - t0:.0f} s"
    )
    if result:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    print(f"saved: {args.out}")
    return 0
