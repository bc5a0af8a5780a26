"""Shared benchmark helpers: timing, peak memory, environment, JSON records and tables.

Every benchmark in this folder measures its rows side by side in one run (ratios only hold
within a run on one device), writes one JSON record per configuration under
``benchmarks/results/`` and prints a table. The helpers here keep those parts the same
everywhere:

- :func:`median_time` — median wall time of repeats after warm-up, device-synchronised;
- :func:`peak_memory` — peak tensor bytes of one call above what existed before it:
  ``torch.cuda.max_memory_allocated`` on GPU, PyTorch's ``MemTracker`` on CPU (it tracks every
  tensor storage created while the call runs, so it is the CPU analogue of the CUDA counter;
  it also works on FakeTensors, which measures shapes too big to allocate);
- :func:`subprocess_peak_rss` — peak resident-set growth of a function run in a fresh
  interpreter (the end-to-end check: everything the process touched, allocator slack included);
- :func:`environment`, :func:`write_records`, :func:`print_table`, :func:`fmt_bytes`.

Example:
    >>> from benchmarks._common import median_time, peak_memory
    >>> import torch
    >>> x = torch.ones(1000)
    >>> median_time(lambda: x * 2, repeats=3)["median_s"] >= 0
    True
    >>> peak_memory(lambda: x * 2) >= 4000
    True
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

Record = dict[str, Any]

__all__ = [
    "RESULTS",
    "Record",
    "device_name",
    "environment",
    "fmt_bytes",
    "median_time",
    "peak_memory",
    "print_table",
    "subprocess_peak_rss",
    "synchronize",
    "write_records",
]


# ---- environment --------------------------------------------------------------------------------


def device_name(device: torch.device | str = "cpu") -> str:
    """Human-readable device: the GPU's name, or the CPU architecture and thread count.

    Example:
        >>> device_name("cpu").startswith("cpu")
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def environment(device: torch.device | str = "cpu") -> Record:
    """Fields every record carries: device, torch/python versions, triton when installed.

    Example:
        >>> sorted(environment())[:3]
        ['device', 'python', 'torch']
    """
    env: Record = {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import PackageNotFoundError, version

        env["triton"] = version("triton")
    except PackageNotFoundError:
        env["triton"] = None
    return env


# ---- time ---------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU), so wall time covers the whole call.

    Example:
        >>> synchronize("cpu")
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> Record:
    """Median, min and all wall times (seconds) of ``fn`` over ``repeats`` after ``warmup`` calls.

    Example:
        >>> t = median_time(lambda: sum(range(100)), repeats=3, warmup=0)
        >>> len(t["times_s"]), t["min_s"] <= t["median_s"]
        (3, True)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


# ---- memory -------------------------------------------------------------------------------------


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    from torch._subclasses.fake_tensor import is_fake

    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        symbolic = t.device.type == "meta" or is_fake(t)
        key = id(storage) if symbolic else storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_memory(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    existing: Sequence[torch.Tensor] = (),
) -> int:
    """Peak tensor bytes while ``fn`` runs, above what was allocated before the call.

    On GPU: ``max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU (and for
    FakeTensors, so call it inside ``FakeTensorMode`` to measure shapes that do not fit):
    ``MemTracker``; tensors created before the call that ``fn`` uses (weights, centroids,
    gradients it accumulates into) go in ``existing`` so that they count as the baseline, not as
    the call's own memory.

    Example:
        >>> import torch
        >>> peak_memory(lambda: torch.zeros(1 << 20)) >= 4 << 20
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    if existing:
        tracker.track_external(*existing)
    with tracker:
        fn()
    peaks = tracker.get_tracker_snapshot("peak")
    peak = max((int(snap["Total"]) for snap in peaks.values()), default=0)
    return max(0, peak - _nbytes(existing))


def _rss_child(conn: Any, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        import gc

        # setup is the caller's business: ``fn(*args)`` returns a zero-argument callable whose
        # run is measured; what setup allocates is the baseline.
        run = fn(*args)
        gc.collect()
        reset = _reset_peak_rss()
        before = _current_rss()
        run_start = time.perf_counter()
        assert callable(run)
        run()
        elapsed = time.perf_counter() - run_start
        peak = _peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send(
            {
                "peak_rss_delta": max(0, peak - before),
                "seconds": elapsed,
                "peak_reset": reset,
                "error": None,
            }
        )
    except BaseException as err:  # report to the parent rather than dying silently
        conn.send({"peak_rss_delta": None, "seconds": None, "error": repr(err)})
    finally:
        conn.close()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so setup's peak does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def subprocess_peak_rss(
    fn: Callable[..., object],
    *args: Any,
    timeout: float = 3600.0,
    env: dict[str, str] | None = None,
) -> Record:
    """Peak RSS growth (bytes) of one run in a fresh ``spawn``-ed interpreter (Linux).

    ``fn(*args)`` runs in the child and does the setup (build inputs, warm up); it must return
    a zero-argument callable, the measured run. The result is the child's peak RSS during the
    run minus its RSS just before it: the kernel's peak mark is reset before the run (Linux
    ``clear_refs``; ``peak_reset`` says whether that worked — if not, the lifetime peak is used,
    which includes the setup). ``fn`` must be importable (a module-level function). ``env``
    adds environment variables to the child's (read at its start, e.g. glibc's
    ``MALLOC_MMAP_THRESHOLD_``).

    Example:
        >>> subprocess_peak_rss(_demo_setup, 1 << 22)["peak_rss_delta"] > 8 << 20  # doctest: +SKIP
        True
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_child, args=(child, fn, args))
    saved = dict(os.environ)
    os.environ.update(env or {})  # a spawned child starts with the parent's environment
    try:
        proc.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        proc.join()
        raise TimeoutError(f"subprocess run did not finish within {timeout} s")
    result: Record = parent.recv()
    proc.join()
    if result["error"] is not None:
        raise RuntimeError(f"subprocess run failed: {result['error']}")
    return result


def _demo_setup(n: int) -> Callable[[], object]:
    def run() -> object:
        return torch.ones(n) * 2

    return run


# ---- output -------------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; None -> '-'.

    Example:
        >>> fmt_bytes(3 * 2**30)
        '3.00 GiB'
    """
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def write_records(name: str, records: list[Record], *, out: Path | None = None) -> Path:
    """Write ``records`` as a JSON list to ``benchmarks/results/<name>.json`` (or ``out``).

    Example:
        >>> write_records("demo", [{"x": 1}], out=Path("/dev/null")).name
        'null'
    """
    path = out or RESULTS / f"{name}.json"
    if path.parent != Path("/dev"):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2, default=str) + "\n")
    return path


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or not spec:
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def print_table(
    records: list[Record], columns: Sequence[tuple[str, str, str]], *, title: str | None = None
) -> str:
    """Print (and return) a fixed-width table; ``columns`` are ``(key, header, format spec)``.

    A format spec of ``"bytes"`` renders with :func:`fmt_bytes`; a missing or None value as '-'.

    Example:
        >>> _ = print_table([{"a": 1.5}], [("a", "A", ".2f")])
        A
        ----
        1.50
    """
    rows = [
        [
            fmt_bytes(r.get(key)) if spec == "bytes" else _cell(r.get(key), spec)
            for key, _, spec in columns
        ]
        for r in records
    ]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        # first column left-aligned (names), the rest right-aligned (numbers)
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    text = [line(headers), "-" * len(line(headers))] + [line(row) for row in rows]
    if title:
        text.insert(0, title)
    out = "\n".join(text)
    print(out)
    return out
