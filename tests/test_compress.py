import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edkm.cli.main import main
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text


@pytest.fixture
def tiny(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = tiny_text(tmp_path / "text.txt")
    recipe = tmp_path / "recipe.yaml"
    tiny_recipe(model, data).to_yaml(recipe)
    return {"model": model, "data": data, "recipe": recipe, "tmp": tmp_path}


def _run(*argv):
    return main(["compress", *map(str, argv)])


def test_full_run_writes_model_and_report(tiny, capsys):
    out = tiny["tmp"] / "run"
    assert _run("--config", tiny["recipe"], "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert set(results) == {
        "original",
        "rtn_3bit_per_tensor",
        "rtn_3bit_group128",
        "kmeans_3bit_per_tensor",
        "edkm_soft",
        "edkm_hard_reloaded",
    }
    assert all(r["ppl"] > 1 and r["windows"] == 3 for r in results.values())
    assert report["reload_logits_identical"] is True
    assert report["train"]["steps"] == 6
    assert report["size"]["palettized_layers_ratio"] > 4  # 16-bit -> 3-bit indices + LUT
    md = (out / "report.md").read_text()
    assert "eDKM hard, reloaded" in md and "post-training k-means" in md
    assert "report:" in capsys.readouterr().out
    # the shipped folder reloads through the eval command too
    assert (
        main(
            [
                "eval",
                "--model",
                str(out / "model"),
                "--data",
                str(tiny["data"]),
                "--seq-len",
                "16",
                "--max-windows",
                "3",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "extra,yaml_text,message",
    [
        (["--bits", "0"], None, "--bits must be an integer in 1..8, got 0"),
        (["--bits", "9"], None, "--bits must be an integer in 1..8, got 9"),
        ([], "train: {stepz: 3}\n", "unknown key 'stepz'"),
        ([], "train: {steps: many}\n", "Recipe.train.steps: expected int"),
        ([], "dkm: {bits: 12}\n", "Recipe.dkm.bits: must be an integer in 1..8"),
        ([], "train: {seq_len: 100000}\n", "shorter than one window"),
    ],
)
def test_bad_input_fails_before_training(tiny, capsys, extra, yaml_text, message):
    recipe = tiny["recipe"]
    if yaml_text is not None:
        recipe = tiny["tmp"] / "bad.yaml"
        recipe.write_text(yaml_text)
    out = tiny["tmp"] / "run"
    args = ["--model", tiny["model"], "--data", tiny["data"], "--config", recipe, "--out", out]
    assert _run(*args, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "train_log.jsonl").exists()


def test_output_folder_holding_a_run_is_refused(tiny, capsys):
    out = tiny["tmp"] / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"recipe": {}}))
    assert _run("--config", tiny["recipe"], "--out", out) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert _run("--config", tiny["recipe"], "--out", out, "--resume") == 2
    assert "recipe differs" in capsys.readouterr().err
    other = tiny["tmp"] / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert _run("--config", tiny["recipe"], "--out", other, "--overwrite") == 2
    assert (other / "precious.txt").exists()


def test_sigterm_then_resume_matches_uninterrupted_run(tiny):
    """The real signal path, in a child process: SIGTERM after step 3, then --resume."""
    env = {**os.environ, "EDKM_NO_PROGRESS": "1"}
    base = [sys.executable, "-m", "edkm", "compress", "--config", str(tiny["recipe"]), "--quiet"]
    stopped = tiny["tmp"] / "stopped"
    proc = subprocess.run(
        [*base, "--out", str(stopped)],
        capture_output=True,
        text=True,
        env={**env, "EDKM_TEST_SIGTERM_AT_STEP": "3"},
    )
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM received: stopped after step 3" in proc.stderr
    assert not (stopped / "report.json").exists()
    proc = subprocess.run(
        [*base, "--out", str(stopped), "--resume"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    whole = tiny["tmp"] / "whole"
    assert _run("--config", tiny["recipe"], "--out", whole, "--quiet") == 0
    a = load_file(str(stopped / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(whole / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((stopped / "report.json").read_text())["results"]
    rb = json.loads((whole / "report.json").read_text())["results"]
    assert ra == rb  # the soft row too: a resumed run evaluates at the final temperature


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_run_on_cuda_with_triton_dkm(tmp_path):
    from edkm.compress import compress

    model = tiny_model_dir(tmp_path / "model")
    data = tiny_text(tmp_path / "text.txt")
    recipe = tiny_recipe(model, data, device="auto", autocast="bf16")
    recipe = recipe.with_overrides(**{"dkm.method": "auto"})
    report = compress(recipe, out=tmp_path / "run", show_progress=False)
    assert report["device"].startswith("cuda")
    assert report["reload_logits_identical"] is True
    results = report["results"]
    assert all(torch.isfinite(torch.tensor(r["ppl"])) for r in results.values())


def test_baselines_leave_the_original_weights(tmp_path):
    from edkm.compress import _baselines
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = tiny_recipe(tmp_path, tmp_path)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    results = _baselines(model, ids, recipe, tmp_path)
    assert results["rtn_3bit_per_tensor"]["ppl"] != results["original"]["ppl"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    again = _baselines(make_tiny_llama(seed=1), ids, recipe, tmp_path)  # read from the cache
    assert again == results


def test_distilled_run_says_so_in_its_log_and_report(tmp_path):
    from edkm.compress import compress

    model = tiny_model_dir(tmp_path / "model")
    data = tiny_text(tmp_path / "text.txt")
    recipe = tiny_recipe(model, data, distill=0.5).with_overrides(**{"eval.baselines": False})
    report = compress(recipe, out=tmp_path / "run", show_progress=False)
    assert report["recipe"]["train"]["distill"] == 0.5
    assert report["reload_logits_identical"] is True
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(r["kd"] > 0 for r in log)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "distilled from the original model (weight 0.5)" in md
