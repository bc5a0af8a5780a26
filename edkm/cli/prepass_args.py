"""What ``edkm slice`` and ``edkm prune`` share: their calibration and output options, the checks
on them, the held-out scoring before and after, and the closing lines.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_calibration_arguments(p, blocks=8, blocks_help="calibration blocks")
    >>> p.parse_args(["--calib-seq-len", "64"]).calib_seq_len
    64
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edkm.cli.main import DATA_HELP, TEXT_COLUMN_HELP
from edkm.errors import InputError

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch


def add_calibration_arguments(p: argparse.ArgumentParser, *, blocks: int, blocks_help: str) -> None:
    """``--calib``, ``--text-column``, ``--calib-blocks`` (default ``blocks``), ``--calib-seq-len``."""
    p.add_argument(
        "--calib", default="default", metavar="DATA", help=f"calibration text: {DATA_HELP}"
    )
    p.add_argument("--text-column", default="text", metavar="COLUMN", help=TEXT_COLUMN_HELP)
    p.add_argument(
        "--calib-blocks", type=int, default=blocks, help=f"{blocks_help} (default: %(default)s)"
    )
    p.add_argument(
        "--calib-seq-len", type=int, default=256, help="tokens per block (default: %(default)s)"
    )


def add_output_arguments(
    p: argparse.ArgumentParser, *, what: str, dtype_help: str, eval_help: str, seed_help: str
) -> None:
    """``--dtype``, ``--eval-windows``, ``--seed``, ``--out``, ``--overwrite`` (of a ``what``
    folder) and ``--quiet``."""
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help=dtype_help
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=0,
        metavar="N",
        help=f"also score the first N held-out windows of 512 tokens {eval_help} (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help=f"replace a {what} folder in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_at_least(values: Iterable[tuple[str, int, int]]) -> None:
    """One clear line for the first ``(option, value, least)`` whose value is below ``least``.

    Example:
        >>> check_at_least([("--calib-blocks", 0, 1)])
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: --calib-blocks must be at least 1, got 0
    """
    for name, value, least in values:
        if value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")


def check_out(out: Path, overwrite: bool, what: str) -> None:
    """Refuse an output path that is a file, a non-empty folder without ``--overwrite``, or a
    folder holding anything but a pre-passed model (``what``: "sliced", "pre-passed")."""
    from edkm.prepass import is_structured_dir

    if out.exists() and not out.is_dir():
        raise InputError(f"output path '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output folder '{out}' is not empty (pass --overwrite to replace it)")
        if not is_structured_dir(out):
            raise InputError(
                f"output folder '{out}' holds files that are not a {what} model; refusing to "
                "replace it with --overwrite (choose another --out)"
            )


class PrepassRun:
    """The calibration blocks of a pre-pass command and its held-out scores.

    ``train`` holds every training-split block of ``--calib-seq-len`` tokens (``calib`` the first
    ``--calib-blocks``); with ``--eval-windows N``, :meth:`measure` scores the first N held-out
    windows of 512 tokens and :meth:`finish` prints them with the output folder.
    """

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        from edkm.eval.perplexity import eval_blocks
        from edkm.io.data import load_split, token_blocks, tokenize

        split = load_split(args.calib, text_column=args.text_column)
        self.train = token_blocks(
            tokenize(tokenizer, split.train_text), args.calib_seq_len, what="the calibration text"
        )
        self.calib = self.train[: args.calib_blocks]
        self.show = not args.quiet
        self.out = args.out
        self.scores: dict[str, float] = {}
        self.windows = (
            eval_blocks(tokenizer, split.eval_text, seq_len=512, max_windows=args.eval_windows)
            if args.eval_windows
            else None
        )

    def measure(self, model: torch.nn.Module, label: str) -> None:
        """Score ``model`` as ``{label}_ppl`` (nothing without ``--eval-windows``)."""
        from edkm.eval.perplexity import perplexity_of_blocks

        if self.windows is not None:
            self.scores[f"{label}_ppl"] = perplexity_of_blocks(
                model, self.windows, desc=label, show_progress=self.show
            ).ppl

    def finish(self, summary: str) -> None:
        """Print the summary line, the scores (one JSON line) and where the model was saved."""
        print(summary)
        if self.scores:
            print(json.dumps({k: round(v, 4) for k, v in self.scores.items()}))
        print(f"saved: {self.out}")
