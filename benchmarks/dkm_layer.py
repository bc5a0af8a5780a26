"""One LLaMA-7B-sized layer through DKM: forward + backward, side by side in one run.

Rows, for one bf16 weight of each shape (3 bits, 3 k-means iterations, the backward of a fixed
random upstream gradient of the soft weight; centroids are a warm start, so they take no
gradient). As in a training step, the soft weight is handed to its consumer (the layer's matmul,
here a stand-in that keeps nothing of it) and released before backward runs:

- ``copy``: the bandwidth floor — the forward copies the weight (released, like the soft weight),
  the backward copies the upstream gradient (the least any weight transform must move);
- ``reference``: the paper's DKM (``dkm_soft(method="reference")``), N x K attention kept for
  backward;
- ``unique``: uniquified DKM on PyTorch ops (``dkm_soft(method="unique", backend="torch")``: its
  four per-weight passes are the ``edkm::`` custom ops of ``edkm.kernels.unique``);
- ``coremltools``: coremltools' ``DKMPalettizer`` (its ``FakePalettize`` on the same weight),
  when coremltools is importable.

Time: median of ``--repeats`` runs after one warm-up (``--slow-repeats`` for coremltools,
whose step takes minutes on CPU; it gets no ``--rss`` subprocess either). Peak memory: tensor
bytes above the inputs (weight, centroids, upstream gradient) while one forward+backward runs,
from PyTorch's ``MemTracker`` (CPU). Outputs (the soft weight while it lives, the weight
gradient) count, as they do for the copy; "peak - copy peak" is what a method needs beyond them. A row whose peak, measured
first under ``FakeTensorMode`` without allocating, exceeds ``--mem-budget-gib`` is not run: its
time says why, its memory is the FakeTensor figure. ``--rss`` adds each run's peak RSS growth
in a fresh subprocess (the end-to-end check, allocator slack included).

The CPU runs here are on a machine shared with other jobs: ``--threads 1`` keeps the many
small per-block ops from waiting on descheduled OpenMP threads; the records say which.

Writes ``benchmarks/results/dkm_layer.json`` (or ``--out``) and prints a table.

Example:
    python benchmarks/dkm_layer.py --shapes 4096x4096,11008x4096 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Record,
    environment,
    median_time,
    peak_memory,
    print_table,
    subprocess_peak_rss,
    write_records,
)

BITS = 3
ITERS = 3
SCALE = 0.02  # LLaMA-like weight spread
TAU_RELATIVE = 0.05  # tau = 0.05 * var(w), as the kernels benchmark uses

Step = Callable[[], None]
METHODS = ("copy", "reference", "unique", "coremltools")
SLOW = {"coremltools"}  # minutes per step on CPU: --slow-repeats runs, no --rss subprocess


def make_inputs(
    rows: int, cols: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Seeded bf16 weight, its quantile centroids (1, 8), an upstream gradient, and tau."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) * SCALE).to(torch.bfloat16)
    g = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    k = 1 << BITS
    sample = w.float().flatten()[:: max(1, w.numel() // 1_000_000)]
    c = torch.quantile(sample, torch.linspace(0.5 / k, 1 - 0.5 / k, k)).view(1, -1)
    tau = TAU_RELATIVE * float(sample.var())
    return w.to(device), c.to(device), g.to(device), tau


class _Consumer(torch.autograd.Function):
    """Stands for the layer's matmul: takes the soft weight, keeps nothing of it, and passes the
    fixed upstream gradient back to it in backward."""

    @staticmethod
    def forward(ctx: Any, soft: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.grad = grad  # an input of the benchmark: already counted, not saved memory
        return soft.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.grad, None


def _forward_backward(forward: Callable[[], torch.Tensor], g: torch.Tensor) -> None:
    """Forward, hand the output to the consumer and release it, then backward."""
    out = _Consumer.apply(forward(), g)
    out.backward()


def dkm_step(method: str, w: torch.Tensor, c: torch.Tensor, g: torch.Tensor, tau: float) -> Step:
    """One forward+backward of ``dkm_soft`` with ``method`` on the torch backend (a CPU run)."""
    from edkm.dkm.soft import dkm_soft

    w.requires_grad_(True)

    def soft() -> torch.Tensor:
        return dkm_soft(w, c, tau=tau, iters=ITERS, method=method, backend="torch")[0]

    def step() -> None:
        _forward_backward(soft, g)
        w.grad = None

    return step


def copy_step(w: torch.Tensor, g: torch.Tensor) -> Step:
    def step() -> None:
        out = w.detach().clone()  # forward: read + write the weight
        del out  # handed to the consumer and released, as the soft weight is
        grad = g.clone()  # backward: read + write the gradient
        del grad

    return step


def coremltools_step(w: torch.Tensor, g: torch.Tensor, tau: float) -> Step:
    """coremltools' FakePalettize (DKMPalettizer, 3 bits, 3 iterations, same tau) on ``w``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )

    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        layer.weight.copy_(w)
    config = ModuleDKMPalettizerConfig(
        n_bits=BITS, weight_threshold=0, milestone=0, kmeans_max_iter=ITERS, palett_tau=tau
    )
    palettizer = DKMPalettizer(
        torch.nn.Sequential(layer), DKMPalettizerConfig(global_config=config)
    )
    model = palettizer.prepare(inplace=True)
    palettizer.step()
    fake = model[0].weight_fake_quant
    if int(fake.fake_palett_enabled[0]) != 1:
        raise RuntimeError("coremltools did not enable fake palettization")
    weight = model[0].weight

    def step() -> None:
        _forward_backward(lambda: fake(weight), g)
        weight.grad = None

    return step


def _fake_peak(method: str, rows: int, cols: int) -> int:
    """Peak bytes of one reference/unique step on FakeTensors (nothing allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(rows, cols, dtype=torch.bfloat16)
        g = torch.empty(rows, cols, dtype=torch.bfloat16)
        c = torch.linspace(-0.05, 0.05, 1 << BITS).view(1, -1)
        step = dkm_step(method, w, c, g, 1e-4)
        return peak_memory(step, existing=[w, c, g])


def _rss_setup(name: str, rows: int, cols: int, threads: int) -> Step:
    """Subprocess side of ``--rss``: build inputs, warm up, return the step to measure."""
    torch.set_num_threads(threads)
    w, c, g, tau = make_inputs(rows, cols)
    step = _make_step(name, w, c, g, tau)
    step()
    gc.collect()
    return step


def _make_step(name: str, w: torch.Tensor, c: torch.Tensor, g: torch.Tensor, tau: float) -> Step:
    if name == "copy":
        return copy_step(w, g)
    if name == "coremltools":
        return coremltools_step(w, g, tau)
    return dkm_step(name, w, c, g, tau)


def bench_shape(
    rows: int,
    cols: int,
    args: argparse.Namespace,
    on_row: Callable[[list[Record]], None] = lambda _: None,
) -> list[Record]:
    """All rows for one shape; ``on_row`` sees the rows so far after each one (partial saves)."""
    w, c, g, tau = make_inputs(rows, cols)
    budget = args.mem_budget_gib * 2**30
    names = [n for n in METHODS if n in args.methods.split(",")]
    records: list[Record] = []
    for name in names:
        rec: Record = {
            "benchmark": "dkm_layer",
            "shape": [rows, cols],
            "dtype": "bfloat16",
            "bits": BITS,
            "iters": ITERS,
            "tau": tau,
            "threads": torch.get_num_threads(),
            "method": name,
            "median_ms": None,
            "peak_bytes": None,
            "peak_source": None,
            "note": "",
        }
        records.append(rec)
        if name == "coremltools" and importlib.util.find_spec("coremltools") is None:
            rec["note"] = "coremltools not installed"
            continue
        if name in ("reference", "unique"):
            fake = _fake_peak(name, rows, cols)
            rec["fake_peak_bytes"] = fake
            if fake > budget:
                rec["peak_bytes"], rec["peak_source"] = fake, "FakeTensorMode + MemTracker"
                rec["note"] = (
                    f"not run: needs ~{fake / 2**30:.1f} GiB > budget {args.mem_budget_gib} GiB"
                )
                continue
        if name == "coremltools" and "reference" in by_name_fake(records):
            # its attention is N x K like the reference's (bf16 here): same budget rule
            ref = by_name_fake(records)["reference"]
            if ref / 2 > budget:
                rec["note"] = (
                    f"not run: ~N x K memory like the reference (> {args.mem_budget_gib} GiB)"
                )
                continue
        try:
            step = _make_step(name, w, c, g, tau)
            repeats = min(args.repeats, args.slow_repeats) if name in SLOW else args.repeats
            timing = median_time(step, repeats=repeats, warmup=1)
            rec["repeats"] = repeats
            rec["median_ms"] = timing["median_s"] * 1e3
            rec["times_ms"] = [t * 1e3 for t in timing["times_s"]]
            rec["peak_bytes"] = peak_memory(step, existing=[w, c, g])
            rec["peak_source"] = "MemTracker"
            if args.rss and name not in SLOW:
                rss = subprocess_peak_rss(_rss_setup, name, rows, cols, torch.get_num_threads())
                rec["rss_peak_delta_bytes"] = rss["peak_rss_delta"]
        except Exception as err:  # a third-party row failing must not lose the others
            if name != "coremltools":
                raise
            rec["note"] = f"failed: {type(err).__name__}: {str(err)[:120]}"
        finally:
            w.requires_grad_(False)
            w.grad = None
            gc.collect()
            _ratios(records)
            on_row(records)
    _ratios(records)
    return records


def by_name_fake(records: list[Record]) -> dict[str, int]:
    """FakeTensor peaks measured so far, by method."""
    return {r["method"]: r["fake_peak_bytes"] for r in records if "fake_peak_bytes" in r}


def _ratios(records: list[Record]) -> None:
    by_name = {r["method"]: r for r in records}
    empty: Record = {"median_ms": None, "peak_bytes": None}
    ref, copy = by_name.get("reference", empty), by_name.get("copy", empty)
    for r in records:
        t, p = r["median_ms"], r["peak_bytes"]
        r["speedup_vs_reference"] = ref["median_ms"] / t if t and ref["median_ms"] else None
        r["time_vs_copy"] = t / copy["median_ms"] if t and copy["median_ms"] else None
        r["peak_reduction_vs_reference"] = (
            ref["peak_bytes"] / p if p and ref["peak_bytes"] else None
        )
        r["peak_vs_copy"] = p / copy["peak_bytes"] if p and copy["peak_bytes"] else None
        # what the method needs beyond the unavoidable output + gradient (the copy's peak)
        r["peak_above_copy_bytes"] = p - copy["peak_bytes"] if p and copy["peak_bytes"] else None


COLUMNS = [
    ("method", "method", ""),
    ("shape_str", "shape", ""),
    ("median_ms", "median ms", ".1f"),
    ("speedup_vs_reference", "ref/this time", ".1f"),
    ("time_vs_copy", "this/copy time", ".2f"),
    ("peak_bytes", "peak", "bytes"),
    ("peak_reduction_vs_reference", "ref/this peak", ".1f"),
    ("peak_above_copy_bytes", "peak - copy peak", "bytes"),
    ("rss_peak_delta_bytes", "RSS delta", "bytes"),
    ("note", "note", ""),
]


def _saver(done: list[Record], env: Record, out: Path | None) -> Callable[[list[Record]], None]:
    """Rewrite the results after every row: a run cut short keeps what it measured."""

    def save(rows_so_far: list[Record]) -> None:
        write_records("dkm_layer", done + [_final(r, env) for r in rows_so_far], out=out)

    return save


def _final(record: Record, env: Record) -> Record:
    return {**env, **record, "shape_str": "x".join(str(s) for s in record["shape"])}


def main(argv: list[str] | None = None) -> list[Record]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats of slow rows")
    parser.add_argument("--methods", default=",".join(METHODS), help="rows to run, in order")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--mem-budget-gib", type=float, default=8.0)
    parser.add_argument("--rss", action="store_true", help="also peak RSS in fresh subprocesses")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"device: {env['device']}, torch {env['torch']}")
    records: list[Record] = []
    for shape in args.shapes.split(","):
        rows, cols = (int(x) for x in shape.lower().split("x"))
        save = _saver(list(records), env, args.out)
        records += [_final(r, env) for r in bench_shape(rows, cols, args, save)]
    print_table(records, COLUMNS)
    path = write_records("dkm_layer", records, out=args.out)
    print(f"\nwrote {path.name}")
    return records


if __name__ == "__main__":
    main()
