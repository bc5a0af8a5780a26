"""SliceGPT on the default model: perplexity and parameters against the dense model and against
dropping the same residual channels without rotation, side by side in one run.

For each sparsity, two copies of the dense model are sliced to the same kept widths
(:func:`edkm.prepass.slicegpt.kept_dims`): once with the PCA rotations of SliceGPT, once with
no rotation (the first d channels of the unrotated, norm-fused residual stream are kept; the
"drop" baseline). Calibration blocks come from the training split, perplexity from the held-out
split (``edkm.eval.perplexity``'s protocol). Writes ``benchmarks/results/slicegpt.json`` and a
Markdown table ``slicegpt.md``.

Example:
    $ python benchmarks/slicegpt.py --sparsities 0.1,0.2,0.25,0.3 --calib-blocks 64 \\
        --calib-seq-len 256 --max-windows 16
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
    from edkm.io.models import load_model
    from edkm.prepass.slicegpt import parameter_count, slice_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--sparsities", default="0.1,0.2,0.25,0.3")
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    p.add_argument("--max-windows", type=int, default=16, help="held-out windows scored")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path, default=RESULTS / "slicegpt.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dense, tokenizer = load_model(args.model, dtype=torch.float32)
    split = load_split(args.data)
    calib = token_blocks(tokenize(tokenizer, split.train_text), args.calib_seq_len)
    calib = calib[: args.calib_blocks]
    windows = eval_blocks(
        tokenizer, split.eval_text, seq_len=args.seq_len, max_windows=args.max_windows
    )
    setup: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "calibration": {"blocks": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "eval": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "round_to": args.round_to,
        **environment(),
    }

    def measure(model: torch.nn.Module, label: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = perplexity_of_blocks(model, windows, desc=label, show_progress=False)
        return {"ppl": res.ppl, "eval_s": round(time.perf_counter() - t0, 1)}

    base_params = parameter_count(dense)
    records: list[dict[str, Any]] = [
        {
            "row": "dense",
            "sparsity": 0.0,
            "rotation": "-",
            "params": base_params,
            "hidden_kept": dense.config.hidden_size,
            **measure(dense, "dense"),
            **setup,
        }
    ]
    base_ppl = records[0]["ppl"]
    for s in sparsities:
        for rotation in ("pca", "none"):
            model = copy.deepcopy(dense)
            manifest = slice_model(
                model, calib, s, rotation=rotation, round_to=args.round_to, show_progress=False
            )
            row = {
                "row": f"{'SliceGPT' if rotation == 'pca' else 'drop, no rotation'} {s:g}",
                "sparsity": s,
                "rotation": rotation,
                "params": parameter_count(model),
                "hidden_kept": manifest["dims"][0],
                "dims": manifest["dims"],
                "slice_s": manifest["time_s"],
                **measure(model, f"{rotation} {s:g}"),
                **setup,
            }
            records.append(row)
            print(f"{row['row']}: ppl {row['ppl']:.2f}, params {row['params']:,}", flush=True)
            del model
    for r in records:
        r["ppl_x_dense"] = r["ppl"] / base_ppl
        r["params_x_dense"] = r["params"] / base_params
    write_records("slicegpt", records, out=args.out)
    cols = [
        ("row", "model", ""),
        ("hidden_kept", "kept width", "d"),
        ("params", "parameters", ",d"),
        ("params_x_dense", "x dense", ".3f"),
        ("ppl", "perplexity", ".2f"),
        ("ppl_x_dense", "x dense", ".2f"),
    ]
    table = print_table(records, cols, title="SliceGPT vs dropping without rotation")
    md = [
        f"# SliceGPT on {args.model}: {setup['calibration']['blocks']} calibration blocks x "
        f"{setup['calibration']['seq_len']} tokens (training split), perplexity on the first "
        f"{setup['eval']['windows']} held-out windows x {setup['eval']['seq_len']} tokens",
        "",
        "| model | kept width | parameters | x dense | perplexity | x dense |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['row']} | {r['hidden_kept']} | {r['params']:,} | {r['params_x_dense']:.3f} | "
            f"{r['ppl']:.2f} | {r['ppl_x_dense']:.2f} |"
            for r in records
        ),
        "",
        f"Device: {setup['device']}, torch {setup['torch']}. Command: `python benchmarks/"
        f"slicegpt.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    del table
    return records


if __name__ == "__main__":
    main()
