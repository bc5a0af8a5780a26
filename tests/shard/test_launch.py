"""``torchrun --nproc-per-node 2 -m edkm compress`` on CPU (gloo): the multi-GPU command's path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shard.launcher import ROOT, free_port
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text


def _torchrun(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EDKM_NO_PROGRESS="1")
    env["EDKM_DIST_TIMEOUT_S"] = "60"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "-m", "edkm", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.slow
def test_torchrun_compress_two_ranks(tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path / "model")
    data = tiny_text(tmp_path / "text.txt")
    recipe = tiny_recipe(model, data, steps=4, checkpoint_every=2)
    recipe = recipe.with_overrides(**{"dkm.bits": 2, "eval.baselines": False})
    config = tmp_path / "recipe.yaml"
    recipe.to_yaml(config)
    out = tmp_path / "run"
    res = _torchrun(
        ["compress", "--config", str(config), "--out", str(out), "--quiet"], tmp_path, 240
    )
    assert res.returncode == 0, res.stdout[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 4
    assert report["reload_logits_identical"] is True
    assert (out / "checkpoints" / "step-00000004" / "sharded.json").is_file()
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
