"""Benchmark of the DKM kernels (issues 5 and 16): every implementation of the per-weight passes
checked against the torch reference, then timed side by side with a device copy of the same
bytes, and a full DKM forward+backward per implementation against reference DKM, in one run.

1. Check (before any timing, on CUDA or under ``TRITON_INTERPRET=1``): each histogram and
   scatter-add method of :mod:`edkm.kernels.unique_triton` (``sorted``, ``atomic``,
   ``window``) on irregular and round shapes, LUT groups, bf16/fp16/fp32 weights: histograms
   bit-exact against ``torch.bincount``, sums by the error rule (at most 2x the torch
   implementation's error against fp64, plus 1e-7 of the largest sum). The ``window`` kernels
   (CUDA C) are first checked in a child process, so that a fault there cannot take the run
   down; a method that fails is reported loudly, left out of the timing, and the run exits 1.
2. Bandwidth: GB/s of each method (and of the chunked torch implementation) for the histogram
   (2 B/weight read) and the scatter-add (2 B weight + 2 B gradient), of the gather ``T[b]``
   and the fused backward, each beside a device-to-device copy of the same number of bytes.
3. DKM forward+backward (bf16 weight, K = 2^bits, ``iters`` iterations) at 11008 x 4096 on GPU:
   reference DKM; uniquified DKM on torch ops; uniquified DKM on the Triton backend with each
   histogram/scatter method, fixed and compact tables; implicit-attention DKM on Triton. Time
   (median), ``x faster`` than the reference, peak memory.

The JSON ``kernels_<device>.json`` (in ``--out``, a folder or a ``.json`` path; default
``benchmarks/results/``) is rewritten after each section, so a crash keeps what was measured.
The last lines name the fastest checked methods: set ``unique_triton.HISTOGRAM`` / ``SCATTER``.

Example:
    PYTHONPATH=. python3 benchmarks/dkm_kernels.py --out /tmp/k          # GPU: ~1-2 minutes
    TRITON_INTERPRET=1 python benchmarks/dkm_kernels.py --rows 64 --cols 96 --reps 1   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("sorted", "atomic", "window")

Record = dict[str, Any]


# ---- measuring ----------------------------------------------------------------------------------


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


def kernel_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median time of a short kernel: CUDA events with an L2 flush per call (``do_bench``) on
    GPU, wall time on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=60, return_mode="median")) / 1e3
    return median_seconds(fn, device, reps, 1)


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


# ---- inputs -------------------------------------------------------------------------------------


def _inputs(
    rows: int, cols: int, bits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LLM-like bf16 weight (N(0, 0.02)), quantile centroids, tau = 0.05 x variance."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits)
    sample = w.float().flatten()[:: max(1, w.numel() // 1_000_000)]
    c = torch.quantile(sample, q).view(1, -1)
    tau = 0.05 * float(sample.var())
    return w.to(device), c.to(device), tau


def triton_usable(device: torch.device) -> bool:
    from edkm.kernels._common import interpreting, triton_available

    return triton_available() and (device.type == "cuda" or interpreting())


# ---- 1. correctness of every method -------------------------------------------------------------

CHECK_CASES = [  # (shape, groups, weight dtype, gradient dtype)
    ((1823, 781), 1, torch.bfloat16, torch.bfloat16),
    ((256, 4096), 16, torch.bfloat16, torch.float32),
    ((300, 1000), 3, torch.float32, torch.float32),
    ((1000, 333), 1, torch.float16, torch.float16),
    ((37, 53), 1, torch.bfloat16, torch.float32),
]


def _rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    w16 = w if w.dtype == torch.float16 else w.to(torch.bfloat16)
    pat = (w16.view(torch.int16).to(torch.int64) & 0xFFFF).reshape(groups, -1)
    return (pat + torch.arange(groups, device=w.device).unsqueeze(1) * (1 << 16)).reshape(-1)


def check_methods(device: torch.device, methods: tuple[str, ...], small: bool) -> dict[str, str]:
    """Method -> "" when it passed, else what failed. Weights mix ties, zeros and |w| >= 2."""
    from edkm.kernels import unique_triton
    from edkm.kernels.unique import scatter_bins

    failures = {m: "" for m in methods}
    for k, (shape, groups, wdt, gdt) in enumerate(CHECK_CASES[-1:] if small else CHECK_CASES):
        gen = torch.Generator().manual_seed(shape[0])
        w = torch.randn(shape, generator=gen) * 0.02
        w.view(-1)[::7] = 0.0
        w.view(-1)[1::11] = 0.0123
        w.view(-1)[2::13] *= 300.0  # outside the shared-memory window
        w = w.to(wdt).to(device)
        g = torch.randn(shape, generator=gen).to(gdt).to(device)
        rows = _rows(w, groups)
        counts = torch.bincount(rows, minlength=groups << 16).to(torch.int32).view(groups, -1)
        truth = torch.zeros(groups << 16, dtype=torch.float64, device=device)
        truth.index_add_(0, rows, g.reshape(-1).double())
        same = scatter_bins(g, w, groups, backend="torch").reshape(-1)
        ref_err = (same.double() - truth).abs().max().item()
        atol = 1e-7 * truth.abs().max().item()
        for m in methods:
            if m == "sorted" and k >= 2:  # the sorting kernels compile slowly; two cases suffice
                continue
            tag = f"{tuple(shape)} G={groups} {wdt} grad {gdt}"
            try:
                hist = unique_triton.histogram(w, groups, m)
                if not torch.equal(hist, counts):
                    bad = int((hist != counts).sum())
                    failures[m] += f"histogram differs in {bad} bins at {tag}; "
                out = unique_triton.scatter(g, w, groups, m).reshape(-1)
                err = (out.double() - truth).abs().max().item()
                if not err <= 2 * ref_err + atol:
                    failures[m] += (
                        f"scatter error {err:.3e} > 2*{ref_err:.3e}+{atol:.1e} at {tag}; "
                    )
            except Exception as exc:  # report every method, whatever breaks
                failures[m] += f"{type(exc).__name__}: {exc} at {tag}; "
        _sync(device)
    return failures


def probe_window(device: torch.device) -> str:
    """Check the ``window`` kernels in a child process: "" when they pass, else why not."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-window", "--device", str(device)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        return "the window check timed out"
    if done.returncode != 0:
        return (done.stdout + done.stderr).strip()[-2000:] or f"exit {done.returncode}"
    return ""


# ---- 2. bandwidth -------------------------------------------------------------------------------


def _copy_seconds(nbytes: int, device: torch.device, reps: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return kernel_seconds(lambda: dst.copy_(src), device, reps)


def bench_bandwidth(
    args: argparse.Namespace, device: torch.device, methods: list[str]
) -> list[Record]:
    """GB/s of every implementation of the per-weight passes beside a copy of the same bytes."""
    from edkm.kernels import unique_triton
    from edkm.kernels.unique import CHUNK, TorchBins, gather_table, unique_grad

    w, _, _ = _inputs(args.rows, args.cols, args.bits, device)
    n = w.numel()
    gen = torch.Generator(device=device).manual_seed(1)
    table = torch.randn(1, 1 << 16, device=device, generator=gen).to(torch.bfloat16)
    g = torch.randn(w.shape, device=device, generator=gen).to(torch.bfloat16)
    dh = torch.randn(1, 1 << 16, 2, device=device, generator=gen)
    cases: list[tuple[str, str, int, Callable[[], object]]] = []
    for m in methods:
        cases.append(("histogram", m, 2 * n, lambda m=m: unique_triton.histogram(w, 1, m)))
    cases.append(
        ("histogram", "torch (index_add_)", 2 * n, lambda: TorchBins.histogram(w, 1, CHUNK))
    )
    for m in methods:
        cases.append(("scatter-add", m, 4 * n, lambda m=m: unique_triton.scatter(g, w, 1, m)))
    cases.append(
        ("scatter-add", "torch (index_add_)", 4 * n, lambda: TorchBins.scatter(g, w, 1, CHUNK))
    )
    cases.append(("gather T[b]", "triton", 4 * n, lambda: gather_table(table, w, backend="triton")))
    cases.append(
        ("fused backward", "triton", 6 * n, lambda: unique_grad(g, w, dh, backend="triton"))
    )
    copies: dict[int, float] = {}
    records: list[Record] = []
    for kernel, method, nbytes, fn in cases:
        if nbytes not in copies:
            copies[nbytes] = _copy_seconds(nbytes, device, args.reps)
        seconds = kernel_seconds(fn, device, args.reps)
        records.append(
            {
                "case": "bandwidth",
                "kernel": kernel,
                "method": method,
                "shape": [args.rows, args.cols],
                "dtype": "bfloat16",
                "bytes": nbytes,
                "kernel_us": seconds * 1e6,
                "kernel_gbps": nbytes / seconds / 1e9,
                "copy_gbps": nbytes / copies[nbytes] / 1e9,
                "kernel_vs_copy": copies[nbytes] / seconds,
            }
        )
    return records


# ---- 3. DKM forward+backward --------------------------------------------------------------------

DKMFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def dkm_rows(
    device: torch.device, methods: list[str]
) -> list[tuple[str, dict[str, Any], DKMFunction]]:
    """(row name, fields, DKM function (weight, centroids, tau=, iters=)) for this device."""
    from edkm.dkm.soft import dkm_soft
    from edkm.dkm.unique import unique_dkm

    def soft(method: str, backend: str) -> DKMFunction:
        return lambda w, c, **k: dkm_soft(w, c, method=method, backend=backend, **k)

    def unique(compact: bool) -> DKMFunction:
        return lambda w, c, **k: unique_dkm(w, c, compact=compact, backend="triton", **k)

    rows = [
        ("reference", {"method": "reference"}, soft("reference", "torch")),
        ("unique, torch ops", {"method": "unique", "backend": "torch"}, soft("unique", "torch")),
    ]
    if triton_usable(device):
        for m in methods:
            for compact in (False, True):
                table = "compact" if compact else "fixed"
                fields = {"method": "unique", "backend": "triton", "bins": m, "table": table}
                rows.append((f"unique, triton, {m}, {table}", fields, unique(compact)))
        fields = {"method": "implicit", "backend": "triton"}
        rows.append(("implicit, triton", fields, soft("implicit", "triton")))
    elif device.type == "cpu":
        fields = {"method": "implicit", "backend": "torch"}
        rows.append(("implicit, torch ops (chunked)", fields, soft("implicit", "torch")))
    return rows


def bench_dkm(args: argparse.Namespace, device: torch.device, methods: list[str]) -> list[Record]:
    """Forward+backward of one DKM step per row: median time, peak memory, ratios."""
    w0, c0, tau = _inputs(args.rows, args.cols, args.bits, device)
    records: list[Record] = []
    if triton_usable(device):
        from edkm.kernels import unique_triton

        histogram, scatter = unique_triton.HISTOGRAM, unique_triton.SCATTER
    for name, fields, fn in dkm_rows(device, methods):
        if "bins" in fields:
            from edkm.kernels import unique_triton

            unique_triton.HISTOGRAM = unique_triton.SCATTER = fields["bins"]
        w = w0.clone().requires_grad_()
        c = c0.clone().requires_grad_()

        def step(fn: DKMFunction = fn, w: torch.Tensor = w, c: torch.Tensor = c) -> None:
            soft, c_new = fn(w, c, tau=tau, iters=args.iters)
            (soft.float().sum() + c_new.sum()).backward()
            w.grad = None
            c.grad = None

        seconds = median_seconds(step, device, args.reps, args.warmup)
        peak = peak_bytes(step, device, [w, c])
        records.append(
            {
                "case": "dkm_fwd_bwd",
                "row": name,
                **fields,
                "shape": [args.rows, args.cols],
                "dtype": "bfloat16",
                "bits": args.bits,
                "iters": args.iters,
                "median_ms": seconds * 1e3,
                "peak_bytes": peak,
            }
        )
    if triton_usable(device):
        from edkm.kernels import unique_triton

        unique_triton.HISTOGRAM, unique_triton.SCATTER = histogram, scatter
    ref = records[0]
    for r in records:
        r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
        r["peak_vs_reference"] = r["peak_bytes"] / max(1, ref["peak_bytes"])
    return records


# ---- output -------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(records: list[Record]) -> None:
    checks = [r for r in records if r["case"] == "check"]
    for r in checks:
        print(f"check {r['method']:8} {'ok' if r['passed'] else 'FAILED: ' + r['failure']}")
    bw = [r for r in records if r["case"] == "bandwidth"]
    if bw:
        print(
            f"\n{'kernel':15} {'method':20} {'us':>9} {'GB/s':>8} {'copy GB/s':>10} {'x copy':>7}"
        )
        for r in bw:
            print(
                f"{r['kernel']:15} {r['method']:20} {r['kernel_us']:9.1f} {r['kernel_gbps']:8.1f} "
                f"{r['copy_gbps']:10.1f} {r['kernel_vs_copy']:7.3f}"
            )
    dkm = [r for r in records if r["case"] == "dkm_fwd_bwd"]
    if dkm:
        print(f"\n{'DKM fwd+bwd':34} {'median ms':>10} {'x faster':>9} {'peak MiB':>10}")
        for r in dkm:
            print(
                f"{r['row']:34} {r['median_ms']:10.2f} {r['speedup_vs_reference']:9.1f} "
                f"{r['peak_bytes'] / 2**20:10.1f}"
            )


def recommend(records: list[Record]) -> Record:
    """The fastest checked method per pass, and the best DKM speedup."""
    out: Record = {"case": "summary"}
    for kernel, key in (("histogram", "HISTOGRAM"), ("scatter-add", "SCATTER")):
        rows = [r for r in records if r.get("kernel") == kernel and r["method"] in METHODS]
        if rows:
            best = max(rows, key=lambda r: r["kernel_vs_copy"])
            out[key] = best["method"]
            out[f"{kernel}_vs_copy"] = best["kernel_vs_copy"]
    dkm = [r for r in records if r["case"] == "dkm_fwd_bwd" and r.get("backend") == "triton"]
    if dkm:
        best = max(dkm, key=lambda r: r["speedup_vs_reference"])
        out["best_dkm_row"], out["best_dkm_speedup"] = best["row"], best["speedup_vs_reference"]
    return out


def _output_path(out: Path | None, device: torch.device) -> Path:
    slug = (
        "cpu"
        if device.type != "cuda"
        else re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")
    )
    name = f"kernels_{slug}.json"
    if out is None:
        return RESULTS / name
    return out if out.suffix == ".json" else out / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="11008 on GPU, 1024 on CPU")
    parser.add_argument("--cols", type=int, default=None, help="4096 on GPU, 1024 on CPU")
    parser.add_argument("--bits", type=int, default=3, help="K = 2**bits centroids (default 3)")
    parser.add_argument("--iters", type=int, default=3, help="k-means iterations (default 3)")
    parser.add_argument("--reps", type=int, default=5, help="timed repeats per DKM row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--out", type=Path, default=None, help="folder or .json path")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--no-dkm", action="store_true", help="skip the DKM step rows")
    parser.add_argument("--probe-window", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.probe_window:  # child process of probe_window()
        from edkm.kernels import unique_cuda

        if not unique_cuda.available(device):
            print("the window kernels cannot run here (no NVRTC, or < 128 KiB shared memory)")
            return 1
        failure = unique_cuda.self_check(device.index or 0)
        failure = failure or check_methods(device, ("window",), small=False)["window"]
        print(failure or "window kernels passed")
        return 1 if failure else 0
    gpu = device.type == "cuda"
    args.rows = args.rows or (11008 if gpu else 1024)
    args.cols = args.cols or (4096 if gpu else 1024)
    meta = {"benchmark": "kernels", "device": _device_name(device), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        meta["triton"] = version("triton")
    except Exception:
        meta["triton"] = None
    out = _output_path(args.out, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []

    def save() -> None:
        out.write_text(json.dumps([{**meta, **r} for r in records], indent=2) + "\n")

    print(f"device: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    methods: list[str] = []
    failed = False
    if triton_usable(device):
        methods = list(METHODS)
        if not args.no_check:
            started = time.perf_counter()
            fails = check_methods(device, ("sorted", "atomic"), small=not gpu)
            fails["window"] = probe_window(device) if gpu else ""
            for m, why in fails.items():
                records.append({"case": "check", "method": m, "passed": not why, "failure": why})
                if why:
                    failed = True
                    methods.remove(m)
                    print(f"CHECK FAILED: {m}: {why}", file=sys.stderr)
            print(f"checked {list(fails)} in {time.perf_counter() - started:.1f} s")
            save()
        started = time.perf_counter()
        records += bench_bandwidth(args, device, methods)
        print(f"timed the per-weight kernels in {time.perf_counter() - started:.1f} s")
        save()
    if not args.no_dkm:
        started = time.perf_counter()
        records += bench_dkm(args, device, methods)
        print(f"timed the DKM steps in {time.perf_counter() - started:.1f} s")
    records.append(recommend(records))
    save()
    print_table(records)
    summary = records[-1]
    print(f"\nsummary: {json.dumps({k: v for k, v in summary.items() if k != 'case'})}")
    if not triton_usable(device):
        print("the Triton rows and kernel GB/s need a GPU or TRITON_INTERPRET=1 (not measured).")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
