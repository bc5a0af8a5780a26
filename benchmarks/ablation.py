"""eDKM memory ablation: one LLaMA-7B decoder layer, 3-bit DKM on its 7 Linear weights.

The layer is transformers' ``LlamaDecoderLayer`` (hidden 4096, MLP 11008, 32 heads; 202M
Linear parameters) in bf16 with SDPA attention; batch 1, sequence 2048; one forward plus the
backward of a fixed upstream gradient of the layer output (a layer in the middle of a network:
its input takes a gradient too). Every Linear weight goes through per-tensor 3-bit DKM (8
centroids, 3 k-means iterations) in the forward.

Every DKM row measures the shipped layer, :class:`edkm.nn.dkm_linear.DKMLinear`, built from a
:class:`edkm.config.DKMConfig` (per-tensor, ``bits=3, iters=3``, relative ``tau=0.05``: the
defaults) for each Linear, and marshaling goes through :func:`edkm.train.loop.offload_dkm_layers`
with an :class:`edkm.config.OffloadConfig`, the very function ``edkm compress`` calls when the
recipe's ``offload`` section is enabled: one :class:`edkm.offload.SavedTensorOffload` attached
to each DKM layer, the layer's input kept on the device (it is saved in the floor too).

Rows (cumulative, as in the paper's table):

- ``no DKM``: the plain layer, the floor;
- ``reference DKM``: ``DKMConfig(method="reference")``, the paper's baseline (N x K attention
  maps kept for backward);
- ``+ marshaling``: the same with ``OffloadConfig(enabled=True, min_bytes=--min-bytes)``:
  everything the DKM layers save (attention maps, k-means intermediates, the soft weight the
  matmul keeps) of 1 MiB and more goes to host memory, one copy per storage;
- ``+ uniquification``: marshaling with ``method="unique"``;
- ``+ sharding (W=2/4/8)``: one rank (rank 0, the largest shard) of W, marshaling and
  uniquification with edkm's sharded DKM (:mod:`edkm.shard`, ``benchmarks/sharding.py``): the
  rank's rows of every weight, collectives counted under FakeTensorMode; its DKM memory is taken
  against the sharded floor (the same layer with row-sharded plain Linears at that W);
- ``all techniques``: marshaling + uniquification on one device (sharding adds ranks: its rows
  are per rank);
- ``implicit-attention kernel``: ``method="implicit"`` (the FlashAttention-style kernel that
  never materialises the N x K map) alone, and with marshaling.

Columns: peak device memory (tensor bytes alive at the peak, the layer's weights, input,
upstream gradient and weight gradients included); memory attributable to DKM (the row's peak
minus the floor's); bytes moved to host (the offload hooks' counters); reduction of the DKM
memory versus reference DKM.

How the numbers are obtained (``--mode``):

- ``fake``: everything is built and run under ``FakeTensorMode`` (shapes only, nothing
  allocated) and measured with PyTorch's ``MemTracker`` (:func:`edkm.memory.tracker.measure_peak`).
  The offload hooks run for real on the fake tensors; their host copies are allocated in the
  host pool, which the measurement keeps out of the device figure. FakeTensors have no
  values, so each layer starts from evenly spaced centroids instead of its k-means++ init, and
  the uniquified DKM uses its fixed 65,536-row table (shape-static).
- ``real``: the same with real tensors on the CPU (use a reduced ``--width``); host copies are
  real, separate CPU storages, again kept out of the device figure. With real values the
  uniquified DKM may pick its compact table (only the patterns present), which needs less.
- ``cuda``: real tensors on a GPU, ``torch.cuda.max_memory_allocated``.

``--width W`` scales hidden and MLP sizes by W/4096 (heads keep 128 dims); ``--compare`` runs
the fake and real modes at the same reduced size and reports their ratio per row.

Examples:
    python benchmarks/ablation.py                      # full size, FakeTensor
    python benchmarks/ablation.py --compare --width 256 --seq 256 --min-bytes 65536
    python benchmarks/ablation.py --mode real --rows "+ uniquification,all techniques" \\
        --reference-json benchmarks/results/ablation_fake.json --name ablation_real_full
    python benchmarks/ablation.py --summary            # ablation.md from the saved results
    python benchmarks/ablation.py --rows "+ sharding (W=2),+ sharding (W=4),+ sharding (W=8)" \\
        --merge --threads 1                            # only the sharding rows, merged in
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import (
    RESULTS,
    Record,
    environment,
    fmt_bytes,
    print_table,
    write_records,
)
from edkm.config import ConfigError, DKMConfig, OffloadConfig
from edkm.memory.tracker import measure_peak
from edkm.nn.dkm_linear import DKMLinear
from edkm.train.loop import offload_dkm_layers

BITS = 3
ITERS = 3
STD = 0.02  # LLaMA's init spread

# name -> (DKMConfig.method, or None for the plain layer; marshaling)
ROWS: list[tuple[str, str | None, bool]] = [
    ("no DKM", None, False),
    ("reference DKM", "reference", False),
    ("+ marshaling", "reference", True),
    ("+ uniquification", "unique", True),
    ("+ sharding (W=2)", "unique", True),
    ("+ sharding (W=4)", "unique", True),
    ("+ sharding (W=8)", "unique", True),
    ("all techniques", "unique", True),
    ("implicit-attention kernel", "implicit", False),
    ("implicit + marshaling", "implicit", True),
]


# the sharding rows: one rank of W (benchmarks/sharding.py, collectives counted, FakeTensor)
SHARDED = {"+ sharding (W=2)": 2, "+ sharding (W=4)": 4, "+ sharding (W=8)": 8}


def dkm_config(method: str) -> DKMConfig:
    """The DKM settings of every Linear in a row (the defaults but bits, iters and method)."""
    return DKMConfig(bits=BITS, iters=ITERS, method=method)  # type: ignore[arg-type]


def build_layer(width: int, mlp: int, device: str) -> tuple[nn.Module, Any, Any]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    heads = width // 128
    config = LlamaConfig(  # type: ignore[call-arg]
        hidden_size=width,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    # build in bf16 on the target device directly: converting afterwards would need to swap
    # FakeTensor parameters, which FakeTensorMode does not allow
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            layer = LlamaDecoderLayer(config, layer_idx=0)
    finally:
        torch.set_default_dtype(default)
    layer.train()
    with torch.device(device):
        rotary = LlamaRotaryEmbedding(config)
    return layer, config, rotary


def wrap_dkm(layer: nn.Module, config: DKMConfig, *, fake: bool) -> int:
    """Swap every Linear of ``layer`` for the shipped ``DKMLinear``; returns the weights wrapped.

    (``edkm.palettize_`` asks a model adapter for the Linear layers of a whole model; here the
    model is one decoder layer, all of whose Linear layers are targets.)
    """
    spec = config.global_spec()
    params = 0
    for parent_name, parent in list(layer.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                start = None
                if fake:  # no values to initialise from: evenly spaced over +-3 std
                    c = torch.linspace(-3 * STD, 3 * STD, spec.num_centroids)
                    start = c.to(child.weight.device).view(1, -1)
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, DKMLinear(child, spec, full, centroids=start))
                params += child.weight.numel()
    return params


def run_row(
    label: str,
    method: str | None,
    marshal: bool,
    *,
    width: int,
    mlp: int,
    seq: int,
    mode: str,
    min_bytes: int,
) -> Record:
    device = "cuda" if mode == "cuda" else "cpu"
    rec: Record = {"row": label, "method": method, "marshaling": marshal, "mode": mode}
    rec.update(width=width, mlp=mlp, heads=width // 128, seq=seq, bits=BITS, iters=ITERS)
    offload_cfg = OffloadConfig(enabled=marshal, min_bytes=min_bytes)
    rec["offload_min_bytes"] = min_bytes if marshal else None
    if label in SHARDED:
        return sharded_row(rec, SHARDED[label], width=width, mlp=mlp, seq=seq, mode=mode,
                           min_bytes=min_bytes)  # fmt: skip
    config = None
    if method is not None:
        try:
            config = dkm_config(method)
        except ConfigError as err:
            rec["status"] = f"not selectable in the shipped layer: {err}"
            return rec
        rec["layer"] = f"{DKMLinear.__module__}.{DKMLinear.__qualname__}"
        rec["dkm_config"] = config.to_dict()
    if marshal:
        rec["offload_config"] = offload_cfg.to_dict()
    from torch._subclasses.fake_tensor import FakeTensorMode

    ctx = FakeTensorMode() if mode == "fake" else contextlib.nullcontext()
    start = time.perf_counter()
    with ctx:
        torch.manual_seed(0)
        layer, _config, rotary = build_layer(width, mlp, device)
        with torch.no_grad():
            for p in layer.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, STD)
        rec["linear_params"] = (
            wrap_dkm(layer, config, fake=mode == "fake")
            if config is not None
            else sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        )
        x = torch.randn(1, seq, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(1, seq, width, device=device, dtype=torch.bfloat16)
        pos = torch.arange(seq, device=device).unsqueeze(0)
        cos, sin = rotary(x, pos)

        def step() -> None:
            out = layer(x, position_embeddings=(cos, sin), position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.backward(out, g)

        # the trainer's own hook-up (a no-op when the row has no marshaling)
        with offload_dkm_layers(layer, offload_cfg) as offload:
            rep = measure_peak(step, device=device, existing=[layer, x, g, cos, sin])
    rec["seconds"] = round(time.perf_counter() - start, 2)
    rec["measurement"] = rep.method
    rec["peak_bytes"] = rep.peak_bytes
    rec["baseline_bytes"] = rep.baseline_bytes
    rec["by_category"] = rep.by_category
    rec["peak_host_pool_bytes"] = rep.peak_host_bytes
    if offload is not None:
        rec["offload"] = offload.stats.to_dict()
        rec["bytes_to_host"] = offload.stats.bytes_to_host
    else:
        rec["bytes_to_host"] = 0
    return rec


def sharded_row(
    rec: Record, world: int, *, width: int, mlp: int, seq: int, mode: str, min_bytes: int
) -> Record:
    """Rank 0 of ``world`` ranks (the largest shard), all techniques: ``benchmarks/sharding.py``'s
    ``sharded DKM + marshaling`` row. Its DKM memory is taken against the sharded floor (the
    same layer with row-sharded plain Linears at the same W), measured here too."""
    from benchmarks import sharding

    rec["world"] = world
    if mode != "fake":
        rec["status"] = "measured under FakeTensorMode only (collectives are counted, not run)"
        return rec
    kw = {"width": width, "mlp": mlp, "seq": seq, "min_bytes": min_bytes}
    floor = sharding.run("sharded floor", world, **kw)
    row = sharding.run("sharded DKM + marshaling", world, **kw)
    rec["layer"] = "edkm.shard.layer.ShardedDKMLinear"
    rec["dkm_config"] = dkm_config("unique").to_dict()
    rec["offload_config"] = OffloadConfig(enabled=True, min_bytes=min_bytes).to_dict()
    for key in ("seconds", "peak_bytes", "baseline_bytes", "by_category", "bytes_to_host"):
        rec[key] = row[key]
    rec["measurement"] = "memtracker-fake"
    rec["floor_bytes"] = floor["peak_bytes"]
    rec["sent_bytes"] = row["sent_bytes"]
    rec["collective_buffer_bytes"] = row["collective_buffer_bytes"]
    return rec


def derive(records: list[Record], reference: Record | None = None) -> None:
    """Fill DKM-attributable memory and the reduction versus reference DKM.

    ``reference`` is the reference-DKM record of another run at the same size (e.g. the fake
    run, when the reference is too big to run for real); by default, this run's own.
    """
    floor = next(r for r in records if r["row"] == "no DKM")
    for r in records:
        if "peak_bytes" in r:
            # sharding rows: against the sharded floor at the same W (one rank's view)
            r["dkm_bytes"] = r["peak_bytes"] - r.get("floor_bytes", floor["peak_bytes"])
            r["peak_vs_floor"] = r["peak_bytes"] / floor["peak_bytes"]
    own = next((r for r in records if r["row"] == "reference DKM" and "dkm_bytes" in r), None)
    ref = own or reference
    if ref is None:
        return
    for r in records:
        if "dkm_bytes" in r and r["row"] != "no DKM":
            r["reference_dkm_bytes"] = ref["dkm_bytes"]
            r["reference_from"] = ref["mode"]
            # a row whose peak does not exceed the floor's has no measurable DKM memory
            r["reduction_vs_reference"] = (
                ref["dkm_bytes"] / r["dkm_bytes"] if r["dkm_bytes"] > 0 else float("inf")
            )


COLUMNS = [
    ("row", "row", ""),
    ("peak_bytes", "peak device", "bytes"),
    ("peak_vs_floor", "x floor", ".3f"),
    ("dkm_bytes", "DKM memory", "bytes"),
    ("bytes_to_host", "moved to host", "bytes"),
    ("reduction_vs_reference", "DKM reduction", ".0f"),
    ("status", "note", ""),
]


def _reduction(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "peak at the floor"
    return f"{value:,.0f}x"


def markdown(records: list[Record], title: str, command: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"Command: `{command}`",
        "",
        "| row | peak device | x floor | DKM memory | moved to host | DKM reduction vs reference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "peak_bytes" not in r:
            lines.append(f"| {r['row']} | {r.get('status', '-')} | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {fmt_bytes(r['peak_bytes'])} | {r['peak_vs_floor']:.3f} | "
            f"{fmt_bytes(r['dkm_bytes'])} | {fmt_bytes(r['bytes_to_host'])} | "
            f"{_reduction(r.get('reduction_vs_reference'))} |"
        )
    return "\n".join(lines)


SUMMARY_NOTES = """\
How each number is obtained. Every DKM row runs the shipped layer,
``edkm.nn.dkm_linear.DKMLinear`` (built from a ``DKMConfig``), and marshaling is switched on
through ``OffloadConfig`` and ``edkm.train.loop.offload_dkm_layers``, the code ``edkm compress``
runs with an ``offload`` recipe section. Peak device memory: tensor bytes alive at the peak of
one forward plus backward, the layer's weights, input, upstream gradient and weight gradients
included. "fake": run under FakeTensorMode (nothing allocated) and measured with PyTorch's
MemTracker; "real": the same with real CPU tensors. The offload hooks' host copies are allocated
in a separate host pool that the measurement keeps out of the device figure (host and device are
both the CPU here); "moved to host" is the hooks' own count of bytes copied to the host. DKM
memory = the row's peak minus the no-DKM floor's; reduction = reference DKM's DKM memory / the
row's. The reference DKM (54 GiB) only runs fake at full size. At reduced width, fake and real
agree exactly on every row whose memory does not depend on the weights' values; the uniquified
rows need less with real weights, because the layer then picks the compact table (only the bit
patterns present: 4,666 and 5,030 of 65,536 in N(0, 0.02) bf16 weights of 4096 x 4096 and 11008
x 4096) where a FakeTensor, having no values, gets the fixed 65,536-row table: the fake
uniquified figures are an upper bound. (Full-size real rows are not run: this CPU emulates bf16
matmuls, 272 s for one 2048 x 4096 x 4096 product.) The "+ sharding" rows are one rank of W
(rank 0, the largest shard) running edkm's sharded DKM with marshaling and uniquification, every
collective counted (no data moved) under FakeTensorMode; their peak is that rank's and their DKM
memory is taken against the sharded floor (the same layer with row-sharded plain Linears at that
W: all-gathered for the matmul, gradient reduce-scattered, as FSDP2 treats a Linear); bytes sent
per rank and step are in ``sharding.md``. They were run alone and merged into the saved
results (``--rows ... --merge``), not with the rest of the table.
"""


def summary(folder: Path = RESULTS) -> str:
    """``ablation.md``: the full-size table (fake, plus real rows where run) and the check."""

    def load(name: str) -> list[Record]:
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else []

    fake, real, cmp = load("ablation_fake"), load("ablation_real_full"), load("ablation_compare")
    parts = ["## eDKM memory ablation: one LLaMA-7B decoder layer, 3-bit DKM", "", SUMMARY_NOTES]
    if fake:
        parts.append(
            markdown(fake, "Full size, FakeTensor (python benchmarks/ablation.py)", _cmd(fake))
        )
    if real:
        parts += ["", markdown(real, "Full size, real tensors on the CPU", _cmd(real))]
    if cmp:
        fake_rows = {r["row"]: r for r in cmp if r["mode"] == "fake" and "peak_bytes" in r}
        lines = [
            "",
            f"### Fake vs real at reduced width ({cmp[0]['width']}, seq {cmp[0]['seq']})",
            "",
            f"Command: `{_cmd(cmp)}`",
            "",
            "| row | real peak | fake peak | fake / real |",
            "|---|---:|---:|---:|",
        ]
        for r in cmp:
            f = fake_rows.get(r["row"])
            if r["mode"] == "real" and f is not None:
                lines.append(
                    f"| {r['row']} | {fmt_bytes(r['peak_bytes'])} | "
                    f"{fmt_bytes(f['peak_bytes'])} | {f['peak_bytes'] / r['peak_bytes']:.4f} |"
                )
        parts += lines
    device = (fake or real or cmp or [{}])[0].get("device", "-")
    parts += ["", f"Device: {device}; torch {(fake or real or cmp or [{}])[0].get('torch')}."]
    return "\n".join(parts) + "\n"


def merge_records(path: Path, new: list[Record], reference: Record | None = None) -> list[Record]:
    """The saved records of ``path`` with the rows of ``new`` added or replaced, in ``ROWS``
    order, derived again. The saved floor is kept (a new one is only the run's own baseline)."""
    old = json.loads(path.read_text()) if path.exists() else []
    fresh = {r["row"]: r for r in new if r["row"] != "no DKM" or not old}
    merged = {r["row"]: r for r in old}
    merged.update(fresh)
    # rows no longer in ROWS (e.g. an old placeholder) are dropped
    records = [merged[label] for label, _, _ in ROWS if label in merged]
    derive(records, reference)
    return records


def _cmd(records: list[Record]) -> str:
    return str(records[0].get("command", "python benchmarks/ablation.py"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["fake", "real", "cuda"], default="fake")
    ap.add_argument("--width", type=int, default=4096, help="hidden size (MLP scales with it)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compare", action="store_true", help="fake and real at the same size")
    ap.add_argument("--rows", default="", help="comma-separated row labels (default: all)")
    ap.add_argument("--name", default=None, help="results file stem")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--reference-json",
        default=None,
        help="take the reference-DKM figure from this results file (same size) when not run",
    )
    ap.add_argument(
        "--min-bytes", type=int, default=1 << 20, help="offload storages of at least this size"
    )
    ap.add_argument(
        "--summary", action="store_true", help="only write ablation.md from the saved results"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="merge the rows run (--rows) into the saved results file (--name, default "
        "ablation_<mode>) instead of replacing it, then rewrite ablation.md",
    )
    ap.add_argument(
        "--out-dir", type=Path, default=RESULTS, help="folder of the results (JSON and .md)"
    )
    args = ap.parse_args(argv)
    if args.summary:
        text = summary(args.out_dir)
        (args.out_dir / "ablation.md").write_text(text)
        print(text)
        return
    torch.set_num_threads(args.threads)
    if args.width % 128:
        raise SystemExit("--width must be a multiple of 128 (head dim)")
    mlp = round(11008 * args.width / 4096)
    wanted = {s.strip() for s in args.rows.split(",") if s.strip()}
    unknown = wanted - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows are {[r[0] for r in ROWS]}")
    rows = [r for r in ROWS if not wanted or r[0] in wanted or r[0] == "no DKM"]
    reference = None
    if args.reference_json:
        found = json.loads(Path(args.reference_json).read_text())
        reference = next(
            r
            for r in found
            if r["row"] == "reference DKM"
            and (r["width"], r["seq"]) == (args.width, args.seq)
            and "dkm_bytes" in r
        )
    modes = ["fake", "real"] if args.compare else [args.mode]
    command = shlex.join(
        ["python", "benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]
    )
    env = environment("cuda" if args.mode == "cuda" else "cpu")
    all_records: list[Record] = []
    tables = []
    for mode in modes:
        records = []
        for label, method, marshal in rows:
            rec = run_row(
                label,
                method,
                marshal,
                width=args.width,
                mlp=mlp,
                seq=args.seq,
                mode=mode,
                min_bytes=args.min_bytes,
            )
            rec.update(env)
            rec["command"] = command
            records.append(rec)
            print(f"[{mode}] {label}: {fmt_bytes(rec.get('peak_bytes'))} ({rec.get('seconds')} s)")
        derive(records, reference)
        title = (
            f"{mode}: width {args.width}, MLP {mlp}, seq {args.seq}, {BITS}-bit DKM x {ITERS} iters"
        )
        print_table(records, COLUMNS, title=title)
        tables.append(markdown(records, title, command))
        all_records.extend(records)
    if args.compare:
        fake = {r["row"]: r for r in all_records if r["mode"] == "fake" and "peak_bytes" in r}
        cmp_rows = []
        for r in all_records:
            if r["mode"] == "real" and r["row"] in fake:
                f = fake[r["row"]]
                r["fake_peak_bytes"] = f["peak_bytes"]
                r["fake_over_real"] = f["peak_bytes"] / r["peak_bytes"]
                cmp_rows.append(r)
        print_table(
            cmp_rows,
            [
                ("row", "row", ""),
                ("peak_bytes", "real peak", "bytes"),
                ("fake_peak_bytes", "fake peak", "bytes"),
                ("fake_over_real", "fake/real", ".4f"),
            ],
            title="fake vs real (same size)",
        )
        lines = ["| row | real peak | fake peak | fake / real |", "|---|---:|---:|---:|"]
        lines += [
            f"| {r['row']} | {fmt_bytes(r['peak_bytes'])} | {fmt_bytes(r['fake_peak_bytes'])} | "
            f"{r['fake_over_real']:.4f} |"
            for r in cmp_rows
        ]
        tables.append("### fake vs real\n\n" + "\n".join(lines))
    name = args.name or ("ablation_compare" if args.compare else f"ablation_{args.mode}")
    if args.merge:
        all_records = merge_records(args.out_dir / f"{name}.json", all_records, reference)
        tables = [markdown(all_records, f"{title} (rows merged)", _cmd(all_records))]
    write_records(name, all_records, out=args.out_dir / f"{name}.json")
    if args.merge:
        (args.out_dir / "ablation.md").write_text(summary(args.out_dir))
    (args.out_dir / f"{name}.md").write_text("\n\n".join(tables) + "\n")
    print(f"wrote {args.out_dir / name}.json and .md")


if __name__ == "__main__":
    main()
