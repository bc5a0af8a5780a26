"""``edkm slice``: SliceGPT a LLaMA-family model and save it as a loadable folder.

Example:
    $ edkm slice --model default --sparsity 0.25 --calib default --out runs/smollm2-sliced25
"""

from __future__ import annotations

import argparse
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
    add_calibration_arguments(p, blocks=128, blocks_help="calibration blocks")
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
    add_output_arguments(
        p,
        what="sliced",
        dtype_help="dtype of the weights saved (the rotation math runs in float64 either way)",
        eval_help="before and after",
        seed_help="seed (random rotations only)",
    )
    p.set_defaults(func=run_slice)


def run_slice(args: argparse.Namespace) -> int:
    """Execute ``edkm slice``; returns the exit status."""
    import torch

    from edkm.io.models import load_model
    from edkm.prepass import save_structured
    from edkm.prepass.slicegpt import parameter_count, slice_model

    check_at_least(
        [
            ("--calib-blocks", args.calib_blocks, 1),
            ("--calib-seq-len", args.calib_seq_len, 2),
            ("--round-to", args.round_to, 1),
            ("--eval-windows", args.eval_windows, 0),
        ]
    )
    sparsity = parse_sparsity(args.sparsity)
    check_out(args.out, args.overwrite, "sliced")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    run = PrepassRun(args, tokenizer)
    run.measure(model, "dense")
    manifest = slice_model(
        model,
        run.calib,
        sparsity,
        round_to=args.round_to,
        rotation=args.rotation,
        seed=args.seed,
        show_progress=run.show,
    )
    run.measure(model, "sliced")
    save_structured(model, args.out, [manifest], tokenizer=tokenizer)
    before, after = manifest["params_before"], parameter_count(model)
    dims = manifest["dims"]
    run.finish(
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
    return 0
