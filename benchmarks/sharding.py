"""Sharded DKM: bytes communicated and one rank's memory for a LLaMA-7B decoder layer.

The layer is the memory ablation's (``benchmarks/ablation.py``: transformers'
``LlamaDecoderLayer``, hidden 4096, MLP 11008, bf16, batch 1, sequence 2048, 3-bit per-tensor
DKM with 3 iterations on all 7 Linear weights, forward plus backward of a fixed upstream
gradient). For W ranks, each DKM layer becomes edkm's :class:`~edkm.shard.layer.ShardedDKMLinear`
holding rank 0's rows (the largest shard), run with :meth:`edkm.shard.comm.Comm.counting`: the
engine makes exactly the calls it makes in training (histogram all-reduce, soft-row all-gather in
forward and again in backward, gradient reduce-scatter, bin-sum all-reduce), each call counted,
but no data moves. Everything runs under ``FakeTensorMode`` and is measured with PyTorch's
``MemTracker`` (:func:`edkm.memory.tracker.measure_peak`), as the ablation is.

Rows per world size W:

- ``sharded floor``: the same layer with plain row-sharded Linear layers (no DKM; the weight's
  rows all-gathered for the matmul and freed, the gradient reduce-scattered: what FSDP2 does to
  a Linear), the floor a rank needs anyway;
- ``sharded DKM``: uniquified DKM on the rows (``method="unique"``);
- ``sharded DKM + marshaling``: the same under the trainer's offload hooks
  (:func:`edkm.train.loop.offload_dkm_layers`), i.e. all techniques.

Columns: a rank's peak tensor memory, its DKM memory (peak minus the sharded floor's at the same
W), bytes it moved to host, bytes it sends per layer per step (ring all-reduce ``2B(W-1)/W``,
all-gather / reduce-scatter ``B(W-1)/W`` of a B-byte buffer) and the collectives' full buffer
sizes. Attention, norms and FSDP2's own traffic for the norms (16 KiB) are outside DKM and not
counted in the bytes.

Examples:
    python benchmarks/sharding.py                       # W = 1, 2, 4, 8 at full size
    python benchmarks/sharding.py --width 256 --seq 64 --worlds 1,2 --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
# run as a script, the repository root comes first on the path (so `benchmarks._common` imports
# without PYTHONPATH) and this folder is dropped (its modules must not shadow installed packages)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks._common import RESULTS, Record, environment, fmt_bytes, print_table, write_records  # noqa: E402
from benchmarks.ablation import BITS, ITERS, STD, build_layer, dkm_config, wrap_dkm  # noqa: E402
from edkm.config import OffloadConfig  # noqa: E402
from edkm.memory.tracker import measure_peak  # noqa: E402
from edkm.nn.dkm_linear import DKMLinear  # noqa: E402
from edkm.shard.comm import Comm  # noqa: E402
from edkm.shard.engine import sharded_linear  # noqa: E402
from edkm.shard.layer import shard_dkm_layer_  # noqa: E402
from edkm.train.loop import offload_dkm_layers  # noqa: E402


class RowShardedLinear(nn.Module):
    """A Linear holding one rank's rows, all-gathered for the matmul (FSDP2's treatment)."""

    def __init__(self, linear: nn.Linear, comm: Comm) -> None:
        super().__init__()
        start, stop = comm.rows(linear.out_features)
        self.weight = nn.Parameter(linear.weight.detach()[start:stop].clone())
        self.total, self.comm = linear.out_features, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sharded_linear(x, self.weight, None, total=self.total, comm=self.comm)


def shard_layer(layer: nn.Module, comm: Comm) -> None:
    """Rank ``comm.rank``'s view of ``layer``: DKM layers sharded, plain Linears row-sharded."""
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DKMLinear):
                shard_dkm_layer_(child, comm=comm)
            elif isinstance(child, nn.Linear):
                setattr(parent, name, RowShardedLinear(child, comm))


def run(row: str, world: int, *, width: int, mlp: int, seq: int, min_bytes: int) -> Record:
    from torch._subclasses.fake_tensor import FakeTensorMode

    dkm = row != "sharded floor"
    marshal = row == "sharded DKM + marshaling"
    comm = Comm.counting(world, 0)
    rec: Record = {"row": row, "world": world, "rank": 0, "width": width, "mlp": mlp, "seq": seq}
    rec.update(bits=BITS, iters=ITERS, mode="fake")
    offload_cfg = OffloadConfig(enabled=marshal, min_bytes=min_bytes)
    start = time.perf_counter()
    with FakeTensorMode():
        layer, _, rotary = build_layer(width, mlp, "cpu")
        with torch.no_grad():
            for p in layer.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, STD)
        if dkm:
            wrap_dkm(layer, dkm_config("unique"), fake=True)
        shard_layer(layer, comm)
        x = torch.randn(1, seq, width, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(1, seq, width, dtype=torch.bfloat16)
        pos = torch.arange(seq).unsqueeze(0)
        cos, sin = rotary(x, pos)

        def step() -> None:
            out = layer(x, position_embeddings=(cos, sin), position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.backward(out, g)

        comm.stats.__init__()  # type: ignore[misc]  # count the step only
        with offload_dkm_layers(layer, offload_cfg) as offload:
            rep = measure_peak(step, device="cpu", existing=[layer, x, g, cos, sin])
    rec["seconds"] = round(time.perf_counter() - start, 2)
    rec["peak_bytes"] = rep.peak_bytes
    rec["baseline_bytes"] = rep.baseline_bytes
    rec["by_category"] = rep.by_category
    rec["bytes_to_host"] = offload.stats.bytes_to_host if offload is not None else 0
    stats = comm.stats.to_dict()
    rec["sent_bytes"] = stats["sent_bytes"]
    rec["collective_calls"] = stats["calls"]
    rec["collective_buffer_bytes"] = stats["buffer_bytes"]
    return rec


ROWS = ("sharded floor", "sharded DKM", "sharded DKM + marshaling")
COLUMNS = [
    ("world", "W", ""),
    ("row", "row", ""),
    ("peak_bytes", "peak per rank", "bytes"),
    ("dkm_bytes", "DKM memory", "bytes"),
    ("bytes_to_host", "moved to host", "bytes"),
    ("sent_bytes", "sent per rank", "bytes"),
]


def derive(records: list[Record]) -> None:
    """DKM memory = the row's peak minus the sharded floor's at the same world size."""
    floors = {r["world"]: r["peak_bytes"] for r in records if r["row"] == "sharded floor"}
    for r in records:
        if r["world"] in floors:
            r["floor_bytes"] = floors[r["world"]]
            r["dkm_bytes"] = r["peak_bytes"] - floors[r["world"]]


def markdown(records: list[Record], command: str) -> str:
    lines = [
        "## Sharded DKM: one rank of W, LLaMA-7B decoder layer, 3-bit DKM on 7 Linear weights",
        "",
        f"Command: `{command}` (FakeTensorMode + MemTracker; collectives counted, rank 0 = the"
        " largest shard)",
        "",
        "| W | row | peak per rank | DKM memory | moved to host | sent per rank per step |"
        " all-gather | reduce-scatter | all-reduce |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        buf = r["collective_buffer_bytes"]
        lines.append(
            f"| {r['world']} | {r['row']} | {fmt_bytes(r['peak_bytes'])} | "
            f"{fmt_bytes(r.get('dkm_bytes'))} | {fmt_bytes(r['bytes_to_host'])} | "
            f"{fmt_bytes(r['sent_bytes'])} | {fmt_bytes(buf.get('all_gather', 0))} | "
            f"{fmt_bytes(buf.get('reduce_scatter', 0))} | {fmt_bytes(buf.get('all_reduce', 0))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Record]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,4,8", help="comma-separated world sizes")
    ap.add_argument("--width", type=int, default=4096, help="hidden size (MLP scales with it)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}")
    ap.add_argument("--min-bytes", type=int, default=1 << 20, help="offload threshold")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="sharding_fake", help="results file stem")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.width % 128:
        raise SystemExit("--width must be a multiple of 128 (head dim)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows are {list(ROWS)}")
    mlp = round(11008 * args.width / 4096)
    command = shlex.join(
        ["python", "benchmarks/sharding.py", *(argv if argv is not None else sys.argv[1:])]
    )
    env = environment("cpu")
    records: list[Record] = []
    for world in (int(w) for w in args.worlds.split(",")):
        for row in ("sharded floor", *[r for r in rows if r != "sharded floor"]):
            rec = run(row, world, width=args.width, mlp=mlp, seq=args.seq, min_bytes=args.min_bytes)
            rec.update(env, command=command)
            records.append(rec)
            print(f"W={world} {row}: {fmt_bytes(rec['peak_bytes'])} ({rec['seconds']} s)")
    derive(records)
    print_table(records, COLUMNS, title=f"one rank of W, width {args.width}, seq {args.seq}")
    write_records(args.name, records, out=args.out_dir / f"{args.name}.json")
    (args.out_dir / f"{args.name}.md").write_text(markdown(records, command) + "\n")
    print(f"wrote {args.out_dir / args.name}.json and .md")
    return records


if __name__ == "__main__":
    main()
