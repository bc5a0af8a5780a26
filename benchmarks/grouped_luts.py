"""Grouped LUTs on the default model: what they cost in bits per weight, and what they buy in
post-training k-means perplexity.

Two parts, one run:

1. **Storage** (always; no inference): for per-tensor LUTs and LUTs of ``group_size`` output
   channels (Core ML iOS18's grouped layout), at each bit width, the bits per weight of the
   layers the default ``DKMConfig`` palettizes, from the model's own layer shapes:
   ``(sum_l N_l * b + 16 * sum_l G_l * 2**b) / sum_l N_l`` (indices at b bits, fp16 LUT
   entries; ``G_l = out_l / group_size``). A group size that does not divide some layer's
   output channels is not a valid layout (``DKMConfig`` refuses it): its row names the layers.
2. **Perplexity** (``--ppl-groups``): post-training k-means (``edkm.eval.baselines.kmeans_``,
   the compress report's baseline) per tensor and with each listed group size, at
   ``--ppl-bits``, on the first ``--max-windows`` held-out windows (``edkm.eval.perplexity``'s
   protocol); bits per weight there are the baseline's own count from the LUT and index
   tensors it produced, which must equal part 1's figure. With ``--peer``, coremltools'
   sensitive k-means (``edkm.eval.peer.skm_``, data-aware: the report's ``eval.peer: skm``)
   at the same bits and layouts too, on ``--peer-blocks`` training blocks of 256 tokens.

Writes ``benchmarks/results/grouped_luts.json`` and ``grouped_luts.md``.

Example:
    $ python benchmarks/grouped_luts.py --ppl-groups 32 --ppl-bits 3 --max-windows 8
"""

from __future__ import annotations

import argparse
import copy
import itertools
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


def storage_rows(
    shapes: dict[str, tuple[int, int]], bits_list: Sequence[int], groups: Sequence[int | None]
) -> list[dict[str, Any]]:
    """Bits per weight of every (bits, group size) from the palettized layers' shapes.

    Example:
        >>> rows = storage_rows({"fc": (16, 64)}, [3], [None, 8])
        >>> [round(r["bits_per_weight"], 4) for r in rows]
        [3.125, 3.25]
    """
    n = sum(o * i for o, i in shapes.values())
    rows = []
    for bits in bits_list:
        for gs in groups:
            bad = [name for name, (o, _) in shapes.items() if gs is not None and o % gs]
            luts = sum(1 if gs is None else o // gs for o, _ in shapes.values())
            rows.append(
                {
                    "part": "storage",
                    "bits": bits,
                    "group_size": gs,
                    "granularity": "per_tensor" if gs is None else f"groups of {gs}",
                    "luts": None if bad else luts,
                    "weights": n,
                    "bits_per_weight": None if bad else bits + 16 * luts * (1 << bits) / n,
                    "lut_overhead_bits": None if bad else 16 * luts * (1 << bits) / n,
                    "invalid_layers": len(bad),
                    "invalid_example": bad[0] if bad else None,
                }
            )
    return rows


def _config(bits: int, gs: int | None) -> Any:
    from edkm.config import DKMConfig

    if gs is None:
        return DKMConfig(bits=bits)
    return DKMConfig(bits=bits, granularity="per_grouped_channel", group_size=gs)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from edkm.eval.baselines import kmeans_
    from edkm.eval.peer import skm_
    from edkm.eval.perplexity import eval_blocks, perplexity_of_blocks
    from edkm.io.data import load_split, token_blocks, tokenize
    from edkm.io.models import load_model
    from edkm.nn.palettize import select_layers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--bits", default="3,4", help="bit widths of the storage table")
    p.add_argument("--groups", default="8,16,32,64,128", help="group sizes of the storage table")
    p.add_argument("--ppl-groups", default="", help="group sizes to measure (empty: none)")
    p.add_argument("--ppl-bits", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window")
    p.add_argument("--max-windows", type=int, default=8, help="held-out windows scored")
    p.add_argument("--peer", action="store_true", help="also sensitive k-means (coremltools)")
    p.add_argument("--peer-blocks", type=int, default=16, help="its calibration blocks")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path, default=RESULTS / "grouped_luts.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    shapes = {
        name: (m.out_features, m.in_features)
        for name, m, _ in select_layers(model, _config(3, None))
    }
    bits_list = [int(b) for b in args.bits.split(",")]
    groups: list[int | None] = [None, *(int(g) for g in args.groups.split(",") if g)]
    setup = {"model": args.model, "layers": len(shapes), **environment()}
    records = [{**r, **setup} for r in storage_rows(shapes, bits_list, groups)]
    print_table(
        records,
        [
            ("bits", "bits", "d"),
            ("granularity", "LUTs", ""),
            ("luts", "LUT count", "d"),
            ("bits_per_weight", "bits/weight", ".4f"),
            ("lut_overhead_bits", "LUT bits/weight", ".4f"),
            ("invalid_example", "not dividing (e.g.)", ""),
        ],
        title=f"Storage of the {len(shapes)} palettized layers of {args.model}",
    )

    ppl_groups: list[int | None] = [None, *(int(g) for g in args.ppl_groups.split(",") if g)]
    if args.ppl_groups:
        split = load_split(args.data)
        windows = eval_blocks(
            tokenizer, split.eval_text, seq_len=args.seq_len, max_windows=args.max_windows
        )
        evals = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}

        def ppl(m: torch.nn.Module, label: str) -> float:
            return perplexity_of_blocks(m, windows, desc=label, show_progress=False).ppl

        dense = ppl(model, "dense")
        records.append(
            {"part": "ppl", "row": "dense (fp32)", "ppl": dense, "bits_per_weight": 32.0, **evals}
        )
        print(f"dense: ppl {dense:.2f}", flush=True)
        methods: dict[str, Any] = {"k-means": kmeans_}
        if args.peer:
            calib = token_blocks(tokenize(tokenizer, split.train_text), 256)[: args.peer_blocks]
            methods["sensitive k-means (coremltools)"] = lambda m, b, config: skm_(
                m, calib, b, config=config
            )
        for gs, (method, quantize) in itertools.product(ppl_groups, methods.items()):
            quantized = copy.deepcopy(model)
            t0 = time.perf_counter()
            summary = quantize(quantized, args.ppl_bits, config=_config(args.ppl_bits, gs))
            quantize_s = time.perf_counter() - t0
            row = {
                "part": "ppl",
                "row": f"{method} {args.ppl_bits}-bit, "
                + ("per tensor" if gs is None else f"LUTs of {gs} output channels"),
                "bits": args.ppl_bits,
                "group_size": gs,
                "ppl": ppl(quantized, str(gs)),
                "bits_per_weight": summary.bits_per_weight,
                "weight_rel_error": summary.weight_rel_error,
                "quantize_s": round(quantize_s, 1),
                **evals,
                **setup,
            }
            row["ppl_x_dense"] = row["ppl"] / dense
            records.append(row)
            print(f"{row['row']}: ppl {row['ppl']:.2f}, {row['bits_per_weight']:.4f} bits/weight")
            del quantized
    write_records("grouped_luts", records, out=args.out)
    _write_markdown(args, records, shapes, argv)
    return records


def _write_markdown(
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    shapes: dict[str, tuple[int, int]],
    argv: Sequence[str] | None,
) -> None:
    outs = sorted({o for o, _ in shapes.values()})
    md = [
        f"# Grouped LUTs on {args.model}: bits per weight of the {len(shapes)} palettized "
        f"layers (output channels {', '.join(map(str, outs))})",
        "",
        "Indices at b bits plus fp16 LUT entries, over the palettized layers' weights "
        "(embeddings, norms and the LM head are not counted).",
        "",
        "| bits | LUTs | LUT count | bits/weight | LUT bits/weight |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in records:
        if r["part"] != "storage":
            continue
        if r["bits_per_weight"] is None:
            md.append(
                f"| {r['bits']} | {r['granularity']} | - | not valid: {r['invalid_layers']} "
                f"layers' output channels are not multiples (e.g. {r['invalid_example']}) | - |"
            )
        else:
            md.append(
                f"| {r['bits']} | {r['granularity']} | {r['luts']:,} | "
                f"{r['bits_per_weight']:.4f} | {r['lut_overhead_bits']:.4f} |"
            )
    ppl_rows = [r for r in records if r["part"] == "ppl"]
    if ppl_rows:
        w = ppl_rows[0]
        md += [
            "",
            f"Post-training k-means (edkm.eval.baselines.kmeans_; sensitive k-means: "
            f"edkm.eval.peer.skm_), perplexity on the first "
            f"{w['windows']} held-out windows x {w['seq_len']} tokens:",
            "",
            "| model | perplexity | x dense | bits/weight | relative weight error | quantize s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in ppl_rows:
            err = r.get("weight_rel_error")
            md.append(
                f"| {r['row']} | {r['ppl']:.2f} | {r['ppl'] / w['ppl']:.2f} | "
                f"{r['bits_per_weight']:.4f} | {'' if err is None else f'{err:.4e}'} | "
                f"{r.get('quantize_s', r.get('kmeans_s', ''))} |"
            )
    md += [
        "",
        f"Command: `python benchmarks/grouped_luts.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
