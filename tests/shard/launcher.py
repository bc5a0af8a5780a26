"""Run a worker scenario in W processes on a gloo process group, bounded in time.

Each rank is a fresh interpreter (``python -m tests.shard.worker SCENARIO OUT``) with the
environment ``torchrun`` would give it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), in a
session of its own. On a deadline, or as soon as one rank fails while another still runs past a
grace period, every child's process group is killed: nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed at the deadline
    log: str
    result: dict[str, Any] | None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_ranks(
    world: int,
    scenario: str,
    out: Path,
    *,
    timeout: float = 100.0,
    dist_timeout: float = 30.0,
    grace: float = 40.0,
    env: dict[str, str] | None = None,
) -> list[RankResult]:
    """Start ``world`` ranks of ``scenario``; return each rank's exit code, log and result JSON."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for rank in range(world):
            child_env = dict(os.environ)
            child_env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                PYTHONPATH=str(ROOT),
                OMP_NUM_THREADS="1",
                EDKM_NO_PROGRESS="1",
                HF_HUB_OFFLINE="1",
                EDKM_DIST_TIMEOUT_S=str(dist_timeout),
                **(env or {}),
            )
            log = open(out / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.shard.worker", scenario, str(out)],
                    cwd=ROOT,
                    env=child_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        first_failure: float | None = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if any(p.returncode not in (None, 0) for p in procs) and first_failure is None:
                first_failure = now
            if now > deadline or (first_failure is not None and now > first_failure + grace):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            _kill(p)
        for log in logs:
            log.close()
    results = []
    for rank, p in enumerate(procs):
        path = out / f"result{rank}.json"
        text = (out / f"rank{rank}.log").read_text(errors="replace")
        data = json.loads(path.read_text()) if path.is_file() else None
        code = p.returncode if p.returncode is not None and p.returncode >= 0 else None
        results.append(RankResult(rank, code, text, data))
    return results


def expect_ok(results: list[RankResult]) -> list[dict[str, Any]]:
    """Every rank exited 0 and wrote its result; else fail with the logs' tails."""
    bad = [r for r in results if r.returncode != 0 or r.result is None]
    if bad:
        tails = "\n".join(f"--- rank {r.rank} (exit {r.returncode})\n{r.log[-3000:]}" for r in bad)
        raise AssertionError(f"ranks failed:\n{tails}")
    return [r.result for r in results if r.result is not None]
