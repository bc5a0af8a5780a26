"""Tests for edkm.train.lut_tune: swap/bake exactness, the LUT phase lowering the shipped model's
loss, what it trains, and resume inside compress (the LUT gather is tested in
tests/nn/test_lut_gather.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import edkm
from edkm.config import LUTTuneConfig, Recipe
from edkm.errors import InputError
from edkm.nn.dense import densify_
from edkm.nn.palettized_linear import PalettizedLinear
from edkm.train.loop import TrainingInterrupted
from edkm.train.lut_tune import bake_luts, lut_train_config, swap_in_luts, tune_luts
from tests.conftest import make_tiny_llama
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text
from tests.train.test_loop import CFG, _blocks

LUT = LUTTuneConfig(steps=6, lr=1e-2, warmup_steps=1, trainable="lut", checkpoint_every=2)


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
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, PalettizedLinear)
    }
    assert swap_in_luts(model) == len(weights) == 14
    assert all(model.get_submodule(n).lut_trainable for n in weights)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    bake_luts(model)
    for name, weight in weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    edkm.save_palettized(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(edkm.load_palettized(tmp_path / "m")(input_ids=ids).logits, before)


def test_swap_takes_densified_layers_back_and_bake_names_an_overflowing_layer():
    model = _finalized()
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, PalettizedLinear)}
    densify_(model)  # the form load_palettized(dense=True) gives
    assert swap_in_luts(model) == 14
    assert all(model.get_submodule(n).lut_trainable for n in weights)
    name = "model.layers.1.mlp.up_proj"
    lut = model.get_submodule(name).lut
    saved = lut.detach().clone()
    with torch.no_grad():
        lut[0, 0] = 1e6  # beyond fp16
    with pytest.raises(InputError, match=rf"layer '{name}': a trained LUT entry is not finite"):
        bake_luts(model)
    with torch.no_grad():
        lut.copy_(saved)
    bake_luts(model)
    for n, weight in weights.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, PalettizedLinear) and not layer.lut_trainable
        assert torch.equal(layer.weight, weight), n


def _loss(model, blocks):
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


def test_tuning_lowers_the_shipped_loss_and_trains_only_the_luts(tmp_path):
    blocks = _blocks(4)
    model = _finalized()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "proj" not in k}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PalettizedLinear)}
    indices = {n: m.indices().clone() for n, m in layers.items()}
    luts = {n: m.lut.clone() for n, m in layers.items()}
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
        assert torch.equal(layer.indices(), idx)  # indices fixed
        assert layer.weight.unique().numel() <= 8
        assert torch.equal(layer.weight, layer.to_palette().dense(layer.weight.dtype))
        changed += not torch.equal(layer.lut, luts[name])
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
