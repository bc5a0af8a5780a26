import itertools
import json
import math

import pytest
import torch

import edkm
from edkm.config import TrainConfig
from edkm.train.checkpoint import latest_checkpoint
from edkm.train.loop import TrainingInterrupted, block_indices, lr_factor, tau_scale, train
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
