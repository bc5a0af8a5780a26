"""``edkm slice`` and ``edkm compress --prepass`` on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from edkm.cli.main import main
from edkm.config import Recipe
from edkm.config.base import ConfigError
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path):
    return {
        "model": tiny_model_dir(tmp_path / "model"),
        "data": tiny_text(tmp_path / "text.txt"),
        "tmp": tmp_path,
    }


@pytest.mark.parametrize(
    "sparsity,message",
    [
        ("1.5", "--sparsity must be in [0, 1)"),
        ("-0.1", "--sparsity must be in [0, 1)"),
        ("nan", "--sparsity must be in [0, 1)"),
        ("lots", "--sparsity must be a number in [0, 1) or a comma-separated list"),
        ("0.1,0.2,0.3", "lists 3 sparsities; the model has 2 layers"),
    ],
)
def test_bad_sparsity_is_one_line_and_exit_2(tiny, capsys, sparsity, message):
    argv = ["slice", "--model", str(tiny["model"]), "--calib", str(tiny["data"])]
    argv += ["--calib-seq-len", "16", "--sparsity", sparsity, "--out", str(tiny["tmp"] / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_slice_command_writes_a_loadable_folder(tiny, capsys):
    out = tiny["tmp"] / "sliced"
    argv = ["slice", "--model", str(tiny["model"]), "--calib", str(tiny["data"]), "--quiet"]
    argv += ["--sparsity", "0.25", "--calib-blocks", "4", "--calib-seq-len", "16"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "residual width 64 -> 48" in printed and "parameters" in printed
    config = json.loads((out / "config.json").read_text())
    (manifest,) = config["quantization_config"]["prepass"]
    assert manifest["dims"] == [48] * 5 and manifest["calibration"]["blocks"] == 4
    assert config["tie_word_embeddings"] is False
    assert main([*argv, "--out", str(out)]) == 2  # not empty: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    args = ["eval", "--model", str(out), "--data", str(tiny["data"]), "--seq-len", "16"]
    assert main([*args, "--max-windows", "2"]) == 0


def test_recipe_prepass_is_validated_on_construction():
    assert Recipe(prepass="slice:0.25").prepass == ["slice:0.25"]
    assert Recipe.from_dict(Recipe(prepass=["slice:0.1"]).to_dict()).prepass == ["slice:0.1"]
    for spec, message in [
        ("slice", "must be written NAME:AMOUNT"),
        ("slice:1", r"the amount must be a number in \[0, 1\), got 1"),
        ("squash:0.2", "unknown pre-pass 'squash'"),
    ]:
        with pytest.raises(ConfigError, match=rf"Recipe.prepass\[0\]: .*{message}"):
            Recipe(prepass=[spec])


def test_an_absent_prepass_module_is_a_clear_error(tiny, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "edkm.prepass.prune" else real(name, *a),
    )
    argv = ["compress", "--model", str(tiny["model"]), "--data", str(tiny["data"])]
    assert main([*argv, "--prepass", "prune:0.2", "--out", str(tiny["tmp"] / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pre-pass 'prune' is not available: edkm.prepass.prune is not installed")


def test_compress_with_slicing_end_to_end(tiny, capsys):
    recipe = tiny["tmp"] / "recipe.yaml"
    tiny_recipe(tiny["model"], tiny["data"], steps=2, checkpoint_every=1).to_yaml(recipe)
    out = tiny["tmp"] / "run"
    argv = ["compress", "--config", str(recipe), "--prepass", "slice:0.2", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert list(results)[:2] == ["original", "prepass"] and "edkm_hard_reloaded" in results
    dense, sliced = results["original"]["params"], results["prepass"]["params"]
    assert results["edkm_hard_reloaded"]["params"] == sliced != dense
    # bits per weight of the palettized layers: their dtype before, indices + LUTs after
    assert results["original"]["bits_per_weight"] == results["prepass"]["bits_per_weight"] == 32
    assert 3 < results["edkm_hard_reloaded"]["bits_per_weight"] < 3.5
    (manifest,) = report["prepass"]["manifests"]
    assert manifest["dims"] == [48] * 5  # 0.2 of 64 -> 51.2 -> 48
    assert report["reload_logits_identical"] is True
    assert report["recipe"]["prepass"] == ["slice:0.2"]
    phases = report["phases_s"]
    assert list(phases) == ["load", "prepass", "baselines", "dkm_init", "train", "after_training"]
    assert abs(sum(phases.values()) - report["wall_time_s"]) < 1.0
    md = (out / "report.md").read_text()
    assert "after pre-pass (slice:0.2)" in md and "| parameters |" in md
    assert "slice:0.2 + eDKM hard, reloaded" in md
    # the shipped folder records the manifest and reloads through edkm's loader
    meta = json.loads((out / "model" / "palettization.json").read_text())
    assert meta["prepass"][0]["kind"] == "slicegpt"
    from edkm.io.loading import load_any_model

    model, _ = load_any_model(out / "model")
    assert model.model.embed_tokens.weight.shape[1] == 48
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(10)[None]).logits).all()
    # a resumed run loads the pre-passed model from prepass/ instead of slicing again
    assert (out / "prepass" / "config.json").is_file()
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["results"]["prepass"] == results["prepass"]


def test_benchmark_rows_on_the_tiny_model(tiny):
    from benchmarks import slicegpt

    out = tiny["tmp"] / "bench" / "slicegpt.json"
    argv = ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--sparsities", "0.25"]
    argv += ["--calib-blocks", "4", "--calib-seq-len", "16", "--seq-len", "16"]
    records = slicegpt.main([*argv, "--max-windows", "2", "--out", str(out)])
    assert [r["row"] for r in records] == ["dense", "SliceGPT 0.25", "drop, no rotation 0.25"]
    assert [r["hidden_kept"] for r in records] == [64, 48, 48]
    assert records[1]["params"] == records[2]["params"] != records[0]["params"]
    assert all(r["ppl"] > 1 for r in records)
    assert json.loads(out.read_text()) == records
    assert "| SliceGPT 0.25 | 48 |" in out.with_suffix(".md").read_text()
