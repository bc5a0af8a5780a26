"""The planner: the fake step equals the real one on the tiny model; verdict, advice, CLI."""

import json
from pathlib import Path

import pytest
import torch

from edkm.cli.main import main
from edkm.config import Recipe
from edkm.errors import InputError
from edkm.plan import make_plan, measure_step, parse_bytes, render
from edkm.plan.step import build_model, model_config, table_rows

TINY = str(Path(__file__).parents[1] / "data" / "tiny_llama_config.json")
SMALL = {"train.batch_size": 2, "train.seq_len": 32, "train.device": "cpu"}


def _recipe(**changes):
    return Recipe().with_overrides(**{**SMALL, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"train.grad_accum": 2, "train.trainable": "palettized+norms"},
        {"offload.optimizer": True, "offload.enabled": True, "offload.min_bytes": 0},
        {
            "train.activation_checkpointing": True,
            "offload.activations": True,
            "offload.min_bytes": 0,
        },
        {"train.distill": 1.0},  # a dense teacher beside the model (the tied head included)
    ],
)
def test_fake_step_equals_the_real_step_on_the_tiny_model(changes, one_thread):
    """With the tables' widths read from the weights, fake and real steps agree to 1% (to the
    byte but for a few bytes per DKM layer under activation checkpointing)."""
    recipe = _recipe(**changes)
    config = model_config(TINY)
    torch.manual_seed(recipe.train.seed)
    rows = table_rows(build_model(config, recipe))
    fake = measure_step(config, recipe, kind="cpu", rows=rows)
    real = measure_step(config, recipe, fake=False, kind="cpu")
    assert fake.method == "memtracker-fake" and real.method == "memtracker"
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=1e-2)
    assert fake.host_pool_bytes == pytest.approx(real.host_pool_bytes, rel=1e-2)
    for key, value in real.by_category.items():
        assert fake.by_category[key] == pytest.approx(value, rel=5e-2, abs=4096), key


def test_without_weights_the_tables_are_an_upper_bound(one_thread):
    recipe = _recipe()
    config = model_config(TINY)
    bound = measure_step(config, recipe, kind="cpu")
    real = measure_step(config, recipe, fake=False, kind="cpu")
    plain = measure_step(config, recipe, kind="cpu", dkm=False)
    assert plain.peak_bytes < real.peak_bytes <= bound.peak_bytes


def test_optimizer_offload_moves_state_and_gradients_to_the_host_pool(one_thread):
    config = model_config(TINY)
    on = measure_step(config, _recipe(**{"offload.optimizer": True}), kind="cpu")
    off = measure_step(config, _recipe(), kind="cpu")
    assert off.by_category["Optstate"] > 0 and on.by_category.get("Optstate", 0) == 0
    assert on.by_category.get("Gradient", 0) == 0
    assert on.host_pool_bytes >= 3 * off.by_category["Optstate"] // 2


def test_plan_says_what_fits_and_advises_switches(one_thread):
    recipe = Recipe.from_dict({"train": {"batch_size": 4, "seq_len": 32}})
    roomy = make_plan(TINY, recipe, device_memory=parse_bytes("1GiB"), dkm_share=False)
    assert roomy.fits and not roomy.advice
    tight = make_plan(TINY, recipe, device_memory=roomy.device_bytes - 1, dkm_share=False)
    assert not tight.fits and tight.advice
    assert tight.advice[0].changes == {"train.activation_checkpointing": True}
    assert tight.advice[-1].step.peak_bytes < roomy.device_bytes
    text = render(tight)
    assert "DOES NOT FIT" in text and "train.activation_checkpointing=true" in text


def test_parse_bytes_and_bad_model():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9
    with pytest.raises(InputError, match="memory size"):
        parse_bytes("24 parsecs")
    with pytest.raises(InputError, match="does not exist"):
        model_config("no/such/config.json")


def test_cli_exit_status_and_json(tmp_path, capsys, one_thread):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {batch_size: 2, seq_len: 32}\n")
    args = ["plan", "--model", TINY, "--config", str(recipe), "--no-advice", "--json"]
    assert main([*args, "--device-memory", "1GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["device_peak_bytes"] > out["step"]["baseline_bytes"]
    assert main([*args, "--device-memory", "1KiB"]) == 1
    assert main(["plan", "--model", TINY, "--config", str(recipe)]) == 2
    assert "--device-memory is required" in capsys.readouterr().err
    assert main([*args, "--device-memory", "lots"]) == 2


@pytest.mark.slow  # default model (SmolLM2-135M): 71 s alone, 300 s on a shared 2-core machine
def test_fake_step_matches_the_real_step_on_the_default_model():
    recipe = Recipe.from_yaml(Path(__file__).parents[2] / "recipes" / "smollm2_3bit.yaml")
    recipe = recipe.with_overrides(
        **{"train.batch_size": 1, "train.seq_len": 32, "train.device": "cpu"}
    )
    config = model_config("default")
    torch.manual_seed(recipe.train.seed)
    model = build_model(config, recipe)
    rows = table_rows(model)
    real = measure_step(config, recipe, fake=False, kind="cpu", model=model)
    fake = measure_step(config, recipe, kind="cpu", rows=rows)
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.02)
