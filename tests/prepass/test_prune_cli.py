"""``edkm prune``, ``edkm compress --prepass prune:R`` and benchmarks/prune.py on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from edkm.cli.main import main
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tmp_path):
    return {
        "model": tiny_model_dir(tmp_path / "model"),
        "data": tiny_text(tmp_path / "text.txt"),
        "tmp": tmp_path,
    }


def _argv(tiny, *extra):
    argv = ["prune", "--model", str(tiny["model"]), "--calib", str(tiny["data"]), "--quiet"]
    return [*argv, "--calib-blocks", "4", "--calib-seq-len", "16", *extra]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ratio", "1.5"], "--ratio must be a number in [0, 1)"),
        (["--ratio", "-0.1"], "--ratio must be a number in [0, 1)"),
        (["--ratio", "lots"], "--ratio must be a number in [0, 1)"),
        (["--ratio", "0.9"], "would remove all 2 attention groups of block 0"),
        (["--ratio", "0.2", "--layers", "4:-2"], "layer range '4:-2' is out of range"),
        (["--ratio", "0.2", "--layers", "1:1"], "selects no block of the 2 blocks"),
        (["--ratio", "0.2", "--layers", "x"], "must be 'all', START:STOP or one index"),
        (["--ratio", "0.2", "--recovery-steps", "-1"], "--recovery-steps must be at least 0"),
    ],
)
def test_bad_ratio_or_layer_range_is_one_line_and_exit_2(tiny, capsys, extra, message):
    assert main([*_argv(tiny, *extra), "--out", str(tiny["tmp"] / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_prune_command_writes_a_folder_that_reloads_with_identical_logits(tiny, capsys):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from edkm.io.loading import load_any_model
    from edkm.prepass import load_structured

    out = tiny["tmp"] / "pruned"
    argv = _argv(tiny, "--ratio", "0.5", "--layers", "1:", "--recovery-steps", "2")
    assert main([*argv, "--eval-windows", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameters 90,432 -> 72,000" in printed and "LoRA recovery 2 steps" in printed
    assert {"dense_ppl", "pruned_ppl", "recovered_ppl"} <= set(json.loads(printed.splitlines()[1]))
    config = json.loads((out / "config.json").read_text())
    (manifest,) = config["quantization_config"]["prepass"]
    assert manifest["kind"] == "prune" and manifest["recovery"]["steps"] == 2
    assert manifest["widths"][1] == {"heads": 2, "kv_heads": 1, "intermediate": 64}
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    a = load_structured(out)
    b, _ = load_any_model(out)
    import edkm  # noqa: F401  (registers the from_pretrained integration)

    c = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        want = a(input_ids=ids).logits
        assert torch.equal(b(input_ids=ids).logits, want)
        assert torch.equal(c(input_ids=ids).logits, want)
    assert main([*argv, "--out", str(out)]) == 2  # not empty: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    args = ["eval", "--model", str(out), "--data", str(tiny["data"]), "--seq-len", "16"]
    assert main([*args, "--max-windows", "2"]) == 0


def test_compress_with_pruning_reports_dense_pruned_recovered_and_palettized(tiny, capsys):
    pytest.importorskip("peft")
    recipe = tiny["tmp"] / "recipe.yaml"
    tiny_recipe(tiny["model"], tiny["data"], steps=2, checkpoint_every=1).with_overrides(
        prepass_recovery_steps=2, prepass_calib_blocks=4
    ).to_yaml(recipe)
    out = tiny["tmp"] / "run"
    argv = ["compress", "--config", str(recipe), "--prepass", "prune:0.5", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert list(results)[:3] == ["original", "prepass_pruned", "prepass"]
    dense, pruned = results["original"]["params"], results["prepass_pruned"]["params"]
    assert results["prepass"]["params"] == pruned == results["edkm_hard_reloaded"]["params"]
    assert pruned < dense
    # LoRA changed the weights: the recovered row differs from the pruned one
    assert results["prepass"]["ppl"] != results["prepass_pruned"]["ppl"]
    (manifest,) = report["prepass"]["manifests"]
    assert manifest["kind"] == "prune" and manifest["recovery"]["steps"] == 2
    assert report["reload_logits_identical"] is True
    md = (out / "report.md").read_text()
    assert "after pre-pass (prune:0.5), before LoRA recovery" in md
    assert "after pre-pass (prune:0.5) + LoRA recovery (2 steps)" in md
    assert "prune:0.5 + eDKM hard, reloaded" in md
    from edkm.io.loading import load_any_model

    model, _ = load_any_model(out / "model")
    assert model.model.layers[0].mlp.down_proj.in_features == 64
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(10)[None]).logits).all()


def test_benchmark_rows_on_the_tiny_model(tiny):
    pytest.importorskip("peft")
    from benchmarks import prune

    out = tiny["tmp"] / "bench" / "prune.json"
    argv = ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--ratio", "0.5"]
    argv += ["--layers", "all", "--importances", "taylor1,l2,random", "--calib-blocks", "4"]
    argv += ["--calib-seq-len", "16", "--seq-len", "16", "--max-windows", "2"]
    records = prune.main([*argv, "--recovery-steps", "2", "--out", str(out)])
    rows = [r["row"] for r in records]
    assert rows == [
        "dense",
        "taylor1",
        "taylor1 + LoRA",
        "l2",
        "l2 + LoRA",
        "random",
        "random + LoRA",
    ]
    assert (
        len({r["params"] for r in records[1:]}) == 1 and records[1]["params"] < records[0]["params"]
    )
    assert all(r["ppl"] > 1 for r in records)
    assert json.loads(out.read_text()) == records
    assert "| taylor1 + LoRA |" in out.with_suffix(".md").read_text()


def test_benchmark_ablation_shares_one_gradient_pass(tiny):
    from benchmarks import prune

    out = tiny["tmp"] / "bench" / "prune_ablation.json"
    argv = ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--ratio", "0.5"]
    argv += ["--layers", "1:", "--calib-blocks", "4", "--calib-seq-len", "16", "--seq-len", "16"]
    records = prune.main([*argv, "--max-windows", "2", "--ablation", "--out", str(out)])
    assert len(records) == 1 + len(prune.ABLATION)
    assert len({r["gradient_pass_s"] for r in records[1:]}) == 1
    assert "| mix | vector | sum |" in out.with_suffix(".md").read_text()
