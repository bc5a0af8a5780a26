"""Benchmark of the DKM kernels (issue 5): bandwidth of the per-weight kernels, time and peak
memory of a full DKM forward+backward against reference DKM, all measured in one run.

Every row is ``edkm.dkm.soft.dkm_soft`` with its two words: ``method`` (the algorithm:
``reference``, ``unique``, ``implicit``) and ``backend`` (the kernels: ``torch`` or ``triton``).

On a GPU:
- GB/s of the per-weight custom ops on the Triton backend (``edkm.kernels.unique``): the gather
  ``T[b]`` and the fused backward ``g*D[b] + H[b]`` (and the scatter-add and histogram passes),
  each beside a device-to-device copy of the same number of bytes (the bandwidth floor);
- time and peak memory (``torch.cuda.max_memory_allocated``) of DKM forward+backward at
  11008 x 4096, 3 bits: reference DKM, uniquified DKM on torch ops and on the Triton kernels,
  implicit-attention DKM on the Triton kernels.
On CPU: the torch rows (reference DKM, uniquified DKM and the chunked implicit-attention DKM on
torch ops) at a size that fits, peak memory from ``MemTracker``; the Triton rows are reported as
needing a GPU.

Writes ``benchmarks/results/kernels_cpu.json`` or ``kernels_<gpu-name>.json`` and prints a table.

Example:
    python benchmarks/kernels.py                 # CPU: 1024 x 1024 bf16, 3 bits, 3 iterations
    python benchmarks/kernels.py --rows 11008 --cols 4096 --reps 5   # GPU default shape
    python benchmarks/kernels.py --rows 256 --cols 256 --out /tmp/kernels.json   # a quick check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

Record = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after ``warmup`` runs (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: torch.device, external: list[torch.Tensor]) -> int:
    """Peak tensor memory of one ``fn`` call above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*external)
    with tracker:
        fn()
    peak = tracker.get_tracker_snapshot("peak")
    before = sum(t.numel() * t.element_size() for t in external)
    return max(int(snap["Total"]) for snap in peak.values()) - before


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def _inputs(
    rows: int, cols: int, bits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits)
    sample = w.float().flatten()[:: max(1, w.numel() // 1_000_000)]
    c = torch.quantile(sample, q).view(1, -1)
    tau = 0.05 * float(sample.var())
    return w.to(device), c.to(device), tau


DKMFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def dkm_methods(device: torch.device) -> dict[str, DKMFunction]:
    """Row name -> DKM function (weight, centroids, tau=, iters=) for this device."""
    from edkm.dkm.soft import dkm_soft

    def row(method: str, backend: str) -> DKMFunction:
        return lambda w, c, **k: dkm_soft(w, c, method=method, backend=backend, **k)

    methods = {"reference": row("reference", "torch"), "unique, torch ops": row("unique", "torch")}
    if device.type == "cuda":
        methods["unique, triton kernels"] = row("unique", "triton")
        methods["implicit, triton kernels"] = row("implicit", "triton")
    else:
        methods["implicit, torch ops (chunked)"] = row("implicit", "torch")
    return methods


def bench_dkm(args: argparse.Namespace, device: torch.device) -> list[Record]:
    """Forward+backward of one DKM step per method: median time, peak memory, ratios."""
    w0, c0, tau = _inputs(args.rows, args.cols, args.bits, device)
    records: list[Record] = []
    for name, fn in dkm_methods(device).items():
        w = w0.clone().requires_grad_()
        c = c0.clone().requires_grad_()

        def step(fn: Callable[..., Any] = fn, w: torch.Tensor = w, c: torch.Tensor = c) -> None:
            soft, c_new = fn(w, c, tau=tau, iters=args.iters)
            (soft.float().sum() + c_new.sum()).backward()
            w.grad = None
            c.grad = None

        seconds = median_seconds(step, device, args.reps, args.warmup)
        peak = peak_bytes(step, device, [w, c])
        records.append(
            {
                "case": "dkm_fwd_bwd",
                "method": name,
                "shape": [args.rows, args.cols],
                "dtype": "bfloat16",
                "bits": args.bits,
                "iters": args.iters,
                "median_ms": seconds * 1e3,
                "peak_bytes": peak,
            }
        )
    ref = records[0]
    for r in records:
        r["time_vs_reference"] = r["median_ms"] / ref["median_ms"]
        r["peak_vs_reference"] = r["peak_bytes"] / max(1, ref["peak_bytes"])
    return records


def bench_bandwidth(args: argparse.Namespace, device: torch.device) -> list[Record]:
    """GB/s of the per-weight ops on the Triton backend beside a device copy of the same bytes."""
    from edkm.kernels import bit_histogram, gather_table, scatter_bins, unique_grad

    w, _, _ = _inputs(args.rows, args.cols, args.bits, device)
    n = w.numel()
    gen = torch.Generator(device=device).manual_seed(1)
    table = torch.randn(1, 1 << 16, device=device, generator=gen).to(torch.bfloat16)
    g = torch.randn(w.shape, device=device, generator=gen).to(torch.bfloat16)
    dh = torch.randn(1, 1 << 16, 2, device=device, generator=gen)
    kernels: list[tuple[str, int, Callable[[], object]]] = [
        # (name, bytes moved per call: 2 B reads/writes per weight, tables are L2-resident)
        ("gather T[b]", 4 * n, lambda: gather_table(table, w, backend="triton")),
        ("fused backward g*D[b]+H[b]", 6 * n, lambda: unique_grad(g, w, dh, backend="triton")),
        ("scatter-add g into bins", 4 * n, lambda: scatter_bins(g, w, backend="triton")),
        ("histogram of bits", 2 * n, lambda: bit_histogram(w, backend="triton")),
    ]
    records: list[Record] = []
    for name, nbytes, fn in kernels:
        # the copy reads and writes nbytes / 2 each
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)

        def copy(d: torch.Tensor = dst, s: torch.Tensor = src) -> None:
            d.copy_(s)

        copy_s = median_seconds(copy, device, args.reps * 4, 3)
        kern_s = median_seconds(fn, device, args.reps * 4, 3)
        records.append(
            {
                "case": "bandwidth",
                "method": name,
                "shape": [args.rows, args.cols],
                "dtype": "bfloat16",
                "bytes": nbytes,
                "kernel_gbps": nbytes / kern_s / 1e9,
                "copy_gbps": nbytes / copy_s / 1e9,
                "kernel_vs_copy": copy_s / kern_s,
            }
        )
        del src, dst
    return records


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(records: list[Record]) -> None:
    dkm = [r for r in records if r["case"] == "dkm_fwd_bwd"]
    if dkm:
        print(f"{'DKM fwd+bwd':28} {'median ms':>11} {'x ref':>7} {'peak MiB':>10} {'x ref':>7}")
        for r in dkm:
            print(
                f"{r['method']:28} {r['median_ms']:11.1f} {r['time_vs_reference']:7.3f} "
                f"{r['peak_bytes'] / 2**20:10.1f} {r['peak_vs_reference']:7.3f}"
            )
    bw = [r for r in records if r["case"] == "bandwidth"]
    if bw:
        print(f"\n{'kernel':28} {'GB/s':>8} {'copy GB/s':>10} {'x copy':>7}")
        for r in bw:
            print(
                f"{r['method']:28} {r['kernel_gbps']:8.1f} {r['copy_gbps']:10.1f} "
                f"{r['kernel_vs_copy']:7.3f}"
            )


def main(argv: list[str] | None = None) -> list[Record]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="11008 on GPU, 1024 on CPU")
    parser.add_argument("--cols", type=int, default=None, help="4096 on GPU, 1024 on CPU")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.rows = args.rows or (11008 if gpu else 1024)
    args.cols = args.cols or (4096 if gpu else 1024)

    records = bench_dkm(args, device)
    if gpu:
        records += bench_bandwidth(args, device)
    meta = {
        "benchmark": "kernels",
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
    }
    records = [{**meta, **r} for r in records]
    print(f"device: {meta['device']}, torch {meta['torch']}")
    print_table(records)
    if not gpu:
        print("\nthe Triton rows (unique / implicit) and kernel GB/s need a GPU (not measured).")
    slug = "cpu" if not gpu else re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")
    out = args.out or RESULTS / f"kernels_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nwrote {out.name}")
    return records


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import version

    return version("triton")


if __name__ == "__main__":
    main()
