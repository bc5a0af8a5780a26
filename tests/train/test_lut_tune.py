"""Tests for edkm.train.lut_tune: the LUT gather against its reference, swap/bake exactness, the
LUT phase lowering the shipped model's loss, what it trains, and resume inside compress."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import edkm
from edkm.config import LUTTuneConfig, Recipe
from edkm.errors import InputError
from edkm.nn.lut_linear import LUTLinear, lut_gather, lut_gather_reference
from edkm.train.loop import TrainingInterrupted
from edkm.train.lut_tune import bake_luts, lut_train_config, swap_in_luts, tune_luts
from tests.conftest import make_tiny_llama
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text
from tests.train.test_loop import CFG, _blocks

LUT = LUTTuneConfig(steps=6, lr=1e-2, warmup_steps=1, trainable="lut", checkpoint_every=2)


@pytest.mark.parametrize("group_size", [None, 1, 4])
@pytest.mark.parametrize("shape", [(8, 5), (12, 31)])
def test_gather_matches_the_reference(group_size, shape):
    g = torch.Generator().manual_seed(0)
    groups = 1 if group_size is None else shape[0] // group_size
    lut = torch.randn(groups, 8, generator=g)
    idx = torch.randint(0, 8, shape, generator=g, dtype=torch.uint8)
    up = torch.randn(shape, generator=g)
    for out_dtype in (torch.float32, torch.bfloat16):
        a = lut.clone().requires_grad_(True)
        b = lut.clone().requires_grad_(True)
        wa = lut_gather(a, idx, group_size, out_dtype)
        wb = lut_gather_reference(b, idx, group_size, out_dtype)
        assert wa.dtype == out_dtype and torch.equal(wa, wb)
        (wa.float() * up).sum().backward()
        (wb.float() * up).sum().backward()
        # the LUT gradient: the sum of the upstream gradients of the weights using each entry
        oracle = torch.zeros(groups, 8, dtype=torch.float64)
        rows = torch.arange(shape[0]) // (shape[0] if group_size is None else group_size)
        grad_up = up.to(out_dtype).double()
        oracle.index_put_((rows.unsqueeze(1).expand(shape), idx.long()), grad_up, accumulate=True)
        torch.testing.assert_close(a.grad.double(), oracle, rtol=1e-5, atol=1e-5)
        if out_dtype == torch.float32:  # the reference accumulates in bf16 otherwise
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_gather_saves_only_the_uint8_index_buffer_for_backward():
    # the int64 flat indices (8 bytes per weight) must not stay alive until backward
    lut = torch.randn(2, 8, requires_grad=True)
    idx = torch.randint(0, 8, (6, 10), dtype=torch.uint8)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        w = lut_gather(lut, idx, group_size=3)
    assert len(saved) == 1 and saved[0].dtype == torch.uint8
    assert saved[0].data_ptr() == idx.data_ptr()  # the buffer itself, no copy
    w.sum().backward()
    counts = torch.stack(
        [torch.bincount(idx[r * 3 : r * 3 + 3].long().reshape(-1), minlength=8) for r in range(2)]
    )
    torch.testing.assert_close(lut.grad, counts.float())


def _finalized(seed=0, bits=3):
    model = make_tiny_llama(seed)
    edkm.palettize_(model, edkm.DKMConfig(bits=bits, iters=2))
    return edkm.finalize(model)


def test_swap_and_bake_without_training_change_nothing(tmp_path):
    model = _finalized()
    ids = _blocks(2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "palette")
    }
    assert swap_in_luts(model) == len(weights) == 14
    assert all(isinstance(model.get_submodule(n), LUTLinear) for n in weights)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    bake_luts(model)
    for name, weight in weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    edkm.save_palettized(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(edkm.load_palettized(tmp_path / "m")(input_ids=ids).logits, before)


def _loss(model, blocks):
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


def test_tuning_lowers_the_shipped_loss_and_trains_only_the_luts(tmp_path):
    blocks = _blocks(4)
    model = _finalized()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "proj" not in k}
    indices = {n: m.palette.indices() for n, m in model.named_modules() if hasattr(m, "palette")}
    luts = {n: m.palette.lut.clone() for n, m in model.named_modules() if hasattr(m, "palette")}
    loss_before = _loss(model, blocks)
    model, state = tune_luts(model, blocks, CFG, LUT, run_dir=tmp_path, show_progress=False)
    assert state.step == 6
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    assert _loss(model, blocks) < loss_before
    for key, value in frozen.items():  # embeddings and norms did not move
        assert torch.equal(model.state_dict()[key], value), key
    changed = 0
    for name, idx in indices.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.palette.indices(), idx)  # indices fixed
        assert layer.weight.unique().numel() <= 8
        assert torch.equal(layer.weight, layer.palette.dense(layer.weight.dtype))
        changed += not torch.equal(layer.palette.lut, luts[name])
    assert changed == len(indices)
    # what ships is what was trained
    edkm.save_palettized(model, tmp_path / "m")
    reloaded = edkm.load_palettized(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=blocks).logits, model(input_ids=blocks).logits)


@pytest.mark.parametrize(
    "trainable,moves",
    [("lut+norms", {"norm"}), ("all", {"norm", "embed_tokens", "lm_head"})],  # tied
)
def test_trainable_choices(tmp_path, trainable, moves):
    model = _finalized()
    before = {k: v.clone() for k, v in model.state_dict().items() if "proj" not in k}
    lut = dataclasses.replace(LUT, trainable=trainable, steps=3)
    model, _ = tune_luts(model, _blocks(4), CFG, lut, run_dir=tmp_path, show_progress=False)
    after = model.state_dict()
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        assert moved == any(m in key for m in moves), key
    assert all(p.requires_grad for p in model.parameters())  # left as it found them


def test_lut_phase_config_and_errors(tmp_path):
    cfg = lut_train_config(CFG, LUT)
    assert (cfg.steps, cfg.lr, cfg.seed, cfg.trainable) == (6, 1e-2, CFG.seed + 1, "all")
    assert (cfg.batch_size, cfg.seq_len, cfg.distill) == (CFG.batch_size, CFG.seq_len, CFG.distill)
    with pytest.raises(ValueError, match="LUT phase is off"):
        lut_train_config(CFG, LUTTuneConfig())
    with pytest.raises(InputError, match="no finalized layer"):
        tune_luts(make_tiny_llama(), _blocks(), CFG, LUT, run_dir=tmp_path, show_progress=False)
    for kwargs, message in [
        ({"steps": -1}, "LUTTuneConfig.steps: must be >= 0"),
        ({"steps": 3, "warmup_steps": 4}, "LUTTuneConfig.warmup_steps: must be in 0..steps"),
        ({"lr": 0.0}, "LUTTuneConfig.lr: must be a finite number > 0"),
        ({"trainable": "norms"}, "LUTTuneConfig.trainable: must be one of"),
    ]:
        with pytest.raises(InputError, match=message):
            LUTTuneConfig(**kwargs)
    with pytest.raises(InputError, match="unknown key 'step'"):
        Recipe.from_yaml_str("lut_tune: {step: 3}")


def test_compress_with_lut_phase_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM in the DKM phase, then in the LUT phase; the resumed run ships what an
    uninterrupted one ships."""
    from edkm.compress import compress

    model = tiny_model_dir(tmp_path / "model")
    data = tiny_text(tmp_path / "text.txt")
    recipe = tiny_recipe(model, data, distill=0.5).with_overrides(
        **{"eval.baselines": False, "lut_tune": dataclasses.asdict(LUT)}
    )
    whole = compress(recipe, out=tmp_path / "whole", show_progress=False)
    assert whole["lut_tune"]["steps"] == 6
    res = whole["results"]
    assert list(res) == ["original", "edkm_soft", "edkm_hard", "edkm_hard_reloaded"]
    assert res["edkm_hard_reloaded"]["ppl"] < res["edkm_hard"]["ppl"]
    md = (tmp_path / "whole" / "report.md").read_text()
    assert "eDKM hard, before LUT fine-tuning" in md and "LUT fine-tuning (indices fixed" in md

    out = tmp_path / "part"
    monkeypatch.setenv("EDKM_TEST_SIGTERM_AT_STEP", "3")
    with pytest.raises(TrainingInterrupted, match="after step 3"):  # in the DKM phase
        compress(recipe, out=out, show_progress=False)
    with pytest.raises(TrainingInterrupted, match="after step 3"):  # in the LUT phase
        compress(recipe, out=out, resume=True, show_progress=False)
    assert (out / "lut_tune" / "checkpoints").is_dir() and not (out / "report.json").exists()
    monkeypatch.delenv("EDKM_TEST_SIGTERM_AT_STEP")
    resumed = compress(recipe, out=out, resume=True, show_progress=False)
    assert resumed["results"] == whole["results"]
    a = edkm.load_palettized(out / "model").state_dict()
    b = edkm.load_palettized(tmp_path / "whole" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
