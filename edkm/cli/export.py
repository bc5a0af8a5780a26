"""``edkm export``: a palettized model to an on-device format (Core ML).

Example:
    $ edkm export --model runs/smollm2-3bit/model --format coreml --out smollm2.mlpackage
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path
from typing import Any

from edkm.errors import InputError

_EPILOG = """\
MODEL is a folder written by 'edkm compress' (RUN/model) or edkm.save_palettized, or one
written by transformers' save_pretrained from such a model. Every palettized weight becomes
one constexpr_lut_to_dense op holding the model's LUT and indices exactly; after writing, the
package is read back and checked against the model bit for bit (--no-check skips that).
Core ML needs 'pip install edkm[coreml]' (coremltools); running the package needs macOS.

The folder itself already loads in Python with transformers:
  import edkm; from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained("runs/smollm2-3bit/model")

Examples:
  edkm export --model runs/smollm2-3bit/model --format coreml --out smollm2.mlpackage
  edkm export --model runs/m4/model --format coreml --target iOS16 --seq-len 128 --out m4.mlpackage"""


def build_export(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` subcommand."""
    p = sub.add_parser(
        "export",
        help="write a palettized model for an on-device runtime (Core ML)",
        description=textwrap.fill(
            "Convert a palettized causal LM to a Core ML package (.mlpackage) that maps "
            "input_ids (1, SEQ_LEN) int32 to logits, for a fixed sequence length, without KV "
            "cache. See docs/export.md for what converts."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="palettized model folder")
    p.add_argument(
        "--format",
        choices=["coreml"],
        default="coreml",
        help="output format (default: %(default)s)",
    )
    p.add_argument("--out", required=True, metavar="OUT", help="output path, e.g. model.mlpackage")
    p.add_argument(
        "--target",
        choices=["iOS18", "iOS16"],
        default="iOS18",
        help="minimum deployment target: iOS18 holds any LUT (1..8 bits, per tensor or grouped); "
        "iOS16 only per-tensor LUTs of 1, 2, 4, 6 or 8 bits (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=64,
        help="fixed number of tokens the package takes (default: %(default)s)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="do not read the package back to check its LUTs and indices against the model",
    )
    p.set_defaults(func=run_export)


def load_for_export(spec: str) -> Any:
    """The palettized model in folder ``spec``: edkm's layout, or transformers' save_pretrained
    layout of an edkm model; anything else is one ``InputError``.

    Example:
        >>> load_for_export("no/such/folder")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: model folder 'no/such/folder' does not exist
    """
    from edkm.export.format import HF_CONFIG_FILE, META_FILE

    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise InputError(f"model folder '{spec}' does not exist")
    if (folder / META_FILE).is_file():
        from edkm.export.palettized import load_palettized

        return load_palettized(folder)
    config_file = folder / HF_CONFIG_FILE
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError) as err:
        raise InputError(f"'{config_file}': not valid JSON ({err})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "edkm" or not qc.get("layers"):
        raise InputError(
            f"'{folder}' is not a palettized edkm model (no {META_FILE}, and no edkm "
            f"quantization_config with palettized layers in {HF_CONFIG_FILE})"
        )
    from edkm.io.models import set_offline

    set_offline()
    from transformers import AutoModelForCausalLM

    import edkm  # noqa: F401 (registers the edkm quantizer with transformers)

    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()


def run_export(args: argparse.Namespace) -> int:
    from edkm.export.coreml import check_export, export_coreml

    if args.seq_len < 1:
        raise InputError(f"--seq-len must be at least 1, got {args.seq_len}")
    model = load_for_export(args.model)
    start = time.perf_counter()
    path = export_coreml(model, args.out, target=args.target, seq_len=args.seq_len)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {args.target}, converted in {seconds:.1f} s)")
    if not args.no_check:
        count = check_export(path, model)
        print(f"checked: {count} constexpr_lut_to_dense ops equal the model's LUTs and indices")
    return 0
