"""Optimizer offload (HostOffloadAdamW) and the trainer's memory switches on the tiny model."""

import dataclasses

import pytest
import torch

import edkm
from edkm.config import OffloadConfig, TrainConfig
from edkm.memory.tracker import measure_peak
from edkm.train.loop import read_log, train
from edkm.train.optim_offload import HostOffloadAdamW
from tests.conftest import make_tiny_llama

CFG = TrainConfig(
    steps=3,
    batch_size=2,
    grad_accum=2,
    seq_len=16,
    lr=1e-2,
    weight_decay=0.1,
    warmup_steps=1,
    checkpoint_every=2,
    device="cpu",
    autocast="off",
)


def _blocks(n=12, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seq), generator=g)


def _palettized(seed=0, dtype=torch.float32):
    model = make_tiny_llama(seed).to(dtype)
    edkm.palettize_(model, edkm.DKMConfig(bits=3, iters=2))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", [{}, {"fused": True}])
def test_same_parameters_as_torch_adamw_after_n_steps(dtype, impl):
    """Clipping, gradient accumulation and 3 steps: bit-identical to torch.optim.AdamW."""
    models = [make_tiny_llama().to(dtype).train() for _ in range(2)]
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), **impl)
    ref = torch.optim.AdamW(models[0].parameters(), **kw)
    off = HostOffloadAdamW(models[1].parameters(), **kw)
    for step in range(3):
        for opt, model in ((ref, models[0]), (off, models[1])):
            for micro in range(2):
                g = torch.Generator().manual_seed(step * 10 + micro)
                x = torch.randint(0, 256, (2, 16), generator=g)
                (model(input_ids=x, labels=x).loss / 2).backward()
            if opt is ref:
                norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
            else:
                assert all(p.grad is None for p in model.parameters())  # all on the host
                assert torch.equal(opt.clip_grad_norm_(1.0), norm)
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert ref.state_dict()["state"].keys() == off.state_dict()["state"].keys()
    for key, st in ref.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value, off.state_dict()["state"][key][name]), (key, name)


def test_gradients_never_accumulate_on_the_device():
    """The device holds no gradient after backward; state and copies are in the host pool."""
    model = make_tiny_llama().train()
    params = list(model.parameters())
    opt = HostOffloadAdamW(params, lr=1e-3)
    x = torch.randint(0, 256, (2, 16))

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    rep = measure_peak(step, existing=[model, x])
    assert rep.by_category.get("Gradient", 0) == 0
    assert rep.by_category.get("Optstate", 0) == 0
    weights = sum(p.numel() * p.element_size() for p in params)
    # copies + moments (3 x weights) + the gradients being accumulated: all on the host
    assert rep.peak_host_bytes is not None and rep.peak_host_bytes >= 3 * weights


def test_load_state_dict_round_trips_and_follows_the_parameters():
    w = torch.nn.Parameter(torch.ones(3))
    opt = HostOffloadAdamW([w], lr=0.1)
    (w * w).sum().backward()
    opt.step()
    saved = opt.state_dict()
    other = torch.nn.Parameter(w.detach().clone())
    opt2 = HostOffloadAdamW([other], lr=0.5)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


@pytest.mark.slow  # whole trainer runs: ~20-30 s on a loaded 2-core machine
def test_trainer_with_optimizer_offload_gives_the_plain_weights(tmp_path):
    blocks = _blocks()
    states = {}
    for name, offload in (("plain", None), ("host", OffloadConfig(optimizer=True))):
        model = _palettized()
        train(model, blocks, CFG, run_dir=tmp_path / name, show_progress=False, offload=offload)
        states[name] = (model.state_dict(), read_log(tmp_path / name))
    (ref, log_ref), (got, log) = states["plain"], states["host"]
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert [r["loss"] for r in log] == [r["loss"] for r in log_ref]
    assert [r["grad_norm"] for r in log] == [r["grad_norm"] for r in log_ref]


@pytest.mark.slow  # whole trainer runs: ~20-30 s on a loaded 2-core machine
def test_resume_with_optimizer_offload_is_exact(tmp_path, monkeypatch):
    from edkm.train.loop import TrainingInterrupted

    blocks = _blocks()
    offload = OffloadConfig(optimizer=True)
    full = _palettized()
    train(full, blocks, CFG, run_dir=tmp_path / "full", show_progress=False, offload=offload)
    part = _palettized()
    monkeypatch.setenv("EDKM_TEST_SIGTERM_AT_STEP", "2")
    with pytest.raises(TrainingInterrupted):
        train(part, blocks, CFG, run_dir=tmp_path / "part", show_progress=False, offload=offload)
    monkeypatch.delenv("EDKM_TEST_SIGTERM_AT_STEP")
    resumed = _palettized()
    train(
        resumed,
        blocks,
        CFG,
        run_dir=tmp_path / "part",
        resume=True,
        show_progress=False,
        offload=offload,
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # whole trainer runs: ~20-30 s on a loaded 2-core machine
def test_checkpointing_and_activation_offload_keep_the_weights(tmp_path):
    """Per-layer checkpointing and activation offload change memory, not the update."""
    blocks = _blocks()
    cfg = dataclasses.replace(CFG, steps=1, grad_accum=1, checkpoint_every=10)
    runs = {}
    variants = {
        "plain": (cfg, None),
        "ckpt": (dataclasses.replace(cfg, activation_checkpointing=True), None),
        "act": (cfg, OffloadConfig(activations=True, min_bytes=0)),
        "all": (
            dataclasses.replace(cfg, activation_checkpointing=True),
            OffloadConfig(enabled=True, activations=True, optimizer=True, min_bytes=0),
        ),
    }
    for name, (c, offload) in variants.items():
        model = _palettized()
        train(model, blocks, c, run_dir=tmp_path / name, show_progress=False, offload=offload)
        flag = getattr(model, "is_activation_checkpointing", None)
        assert not (flag if flag is not None else model.is_gradient_checkpointing)
        runs[name] = (model.state_dict(), read_log(tmp_path / name))
    ref = runs["plain"][0]
    for name, (got, _) in runs.items():
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
    assert runs["act"][1][0]["activation_offload"]["bytes_to_host"] > 0


def test_optimizer_offload_config_round_trips():
    cfg = OffloadConfig(optimizer=True, activations=True)
    assert OffloadConfig.from_yaml_str(cfg.to_yaml()) == cfg
    assert TrainConfig.from_dict({"activation_checkpointing": True}).activation_checkpointing
