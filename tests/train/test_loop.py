import dataclasses
import itertools
import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

import edkm
from edkm.config import OffloadConfig, TrainConfig
from edkm.nn.palettize import dkm_layers
from edkm.train.checkpoint import latest_checkpoint
from edkm.train.loop import (
    TrainingInterrupted,
    block_indices,
    lr_factor,
    offload_dkm_layers,
    offload_summary,
    read_log,
    tau_scale,
    train,
)
from tests.conftest import make_tiny_llama


def _blocks(n=12, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seq), generator=g)


def _palettized(seed=0):
    model = make_tiny_llama(seed)
    edkm.palettize_(model, edkm.DKMConfig(bits=3, iters=2))
    return model


CFG = TrainConfig(
    steps=5,
    batch_size=2,
    grad_accum=2,
    seq_len=16,
    lr=1e-3,
    warmup_steps=1,
    checkpoint_every=2,
    device="cpu",
    autocast="off",
)


def test_schedules():
    cfg = TrainConfig(steps=20, warmup_steps=4, min_lr_ratio=0.0, tau_start=2.0, tau_end=0.02)
    assert [lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(20, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, cfg) == pytest.approx(0.5)
    taus = [tau_scale(s, cfg) for s in range(20)]
    assert taus[0] == 2.0 and taus[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in itertools.pairwise(taus))


def test_block_order_is_a_seeded_permutation_per_epoch():
    cfg = TrainConfig(batch_size=3, grad_accum=1, seed=5)
    first_epoch = torch.cat([block_indices(s, cfg, 9) for s in range(3)])
    assert sorted(first_epoch.tolist()) == list(range(9))
    other = TrainConfig(batch_size=3, grad_accum=1, seed=6)
    assert not torch.equal(first_epoch, torch.cat([block_indices(s, other, 9) for s in range(3)]))


def test_training_lowers_the_loss_and_logs_every_step(tmp_path):
    model = _palettized()
    blocks = _blocks(4)  # few blocks: the model can fit them
    cfg = TrainConfig(
        steps=12,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_every=100,
        device="cpu",
        autocast="off",
    )
    state = train(model, blocks, cfg, run_dir=tmp_path, show_progress=False)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"] - 0.2
    assert state.tokens_seen == 12 * 4 * 16
    assert latest_checkpoint(tmp_path).name == "step-00000012"
    assert all(math.isfinite(r["grad_norm"]) for r in log)


def test_cpu_steps_log_their_share_of_the_cores_and_warn_once_when_starved(
    tmp_path, monkeypatch, recwarn
):
    import edkm.train.loop as loop

    cfg = dataclasses.replace(CFG, steps=3, checkpoint_every=100)
    train(_palettized(), _blocks(), cfg, run_dir=tmp_path / "real", show_progress=False)
    log = read_log(tmp_path / "real")
    assert all(0 < r["cpu_share"] < 4 for r in log)  # a ratio of times, not a constant
    assert loop.cpu_share(cpu_s=3.0, wall_s=2.0, threads=2) == 0.75
    assert not loop.warn_if_cpu_contended({"step": 1, "cpu_share": 0.9})
    assert not loop.warn_if_cpu_contended({"step": 1})  # a GPU step has no share
    recwarn.clear()  # whether that run was starved depends on this machine's other load
    # every step starved: one warning for the run, naming the first starved step
    monkeypatch.setattr(loop, "cpu_share", lambda cpu_s, wall_s: 0.3)
    train(_palettized(), _blocks(), cfg, run_dir=tmp_path / "shared", show_progress=False)
    starved = [w for w in recwarn if "competing for the cores" in str(w.message)]
    assert len(starved) == 1 and "training step 1 got 30%" in str(starved[0].message)
    assert [r["cpu_share"] for r in read_log(tmp_path / "shared")] == [0.3] * 3


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path, monkeypatch):
    blocks = _blocks()
    full = _palettized()
    train(full, blocks, CFG, run_dir=tmp_path / "full", show_progress=False)

    part = _palettized()
    monkeypatch.setenv("EDKM_TEST_SIGTERM_AT_STEP", "3")
    with pytest.raises(TrainingInterrupted) as info:
        train(part, blocks, CFG, run_dir=tmp_path / "part", show_progress=False)
    assert info.value.step == 3
    monkeypatch.delenv("EDKM_TEST_SIGTERM_AT_STEP")
    resumed = _palettized()  # a fresh process would start from a fresh model too
    state = train(resumed, blocks, CFG, run_dir=tmp_path / "part", resume=True, show_progress=False)
    assert state.step == CFG.steps
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_the_device_runs_bf16(monkeypatch, native):
    """A CPU that only emulates bf16 trains in fp32 (bf16 matmuls there are several x slower)."""
    import edkm.train.loop as train_mod

    monkeypatch.setattr(train_mod, "bf16_supported", lambda device: native)
    cpu = torch.device("cpu")
    x = torch.randn(4, 8)
    with train_mod._autocast(cpu, TrainConfig(autocast="bf16")):
        y = torch.nn.functional.linear(x, torch.randn(3, 8))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    with train_mod._autocast(cpu, TrainConfig(autocast="off")):
        assert torch.nn.functional.linear(x, torch.randn(3, 8)).dtype == torch.float32


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 capability")
def test_kernels_capped_at_avx2_count_as_no_native_bf16():
    """``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's own cap) makes training stay in fp32."""
    code = (
        "import torch; from edkm.train.loop import bf16_supported; "
        "print(torch.backends.cpu.get_cpu_capability(), bf16_supported(torch.device('cpu')))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["AVX2", "False"]


def test_offloaded_training_is_exact_and_the_hooks_go_away(tmp_path):
    """The default (uniquified) DKM under the offload hooks gives the plain run's weights."""
    blocks = _blocks()
    cfg = dataclasses.replace(CFG, steps=2, grad_accum=1, checkpoint_every=10)
    runs = {}
    for name, offload in (("plain", None), ("offload", OffloadConfig(enabled=True, min_bytes=0))):
        model = _palettized()
        train(model, blocks, cfg, run_dir=tmp_path / name, show_progress=False, offload=offload)
        layers = [layer for _, layer in dkm_layers(model)]
        assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)
        runs[name] = (model.state_dict(), read_log(tmp_path / name))
    (ref, log_ref), (got, log) = runs["plain"], runs["offload"]
    assert ref.keys() == got.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert [r["loss"] for r in log] == [r["loss"] for r in log_ref]
    assert offload_summary(log_ref) is None
    total = offload_summary(log)
    assert total is not None and total["steps"] == 2
    assert total["host_copies"] == sum(r["offload"]["host_copies"] for r in log) > 0
    assert total["bytes_to_device"] == total["bytes_to_host"]
    assert total["peak_host_bytes"] == max(r["offload"]["peak_host_bytes"] for r in log) > 0


def test_offload_hooks_attach_to_dkm_layers_only_and_detach_on_error():
    model = _palettized()
    hooked = []
    with (
        pytest.raises(RuntimeError, match="boom"),
        offload_dkm_layers(model, OffloadConfig(enabled=True)) as off,
    ):
        assert off is not None
        hooked = [m for m in model.modules() if m._forward_pre_hooks]
        raise RuntimeError("boom")
    assert hooked and hooked == [layer for _, layer in dkm_layers(model)]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
