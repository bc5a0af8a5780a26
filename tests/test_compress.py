import importlib
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
    # stored bits per weight of the quantized layers, from their tensors (edkm.eval.report)
    shipped = results["edkm_hard_reloaded"]["bits_per_weight"]
    assert shipped == report["size"]["palettized_layers_bits_per_weight"]
    assert 3 < shipped < results["kmeans_3bit_per_tensor"]["bits_per_weight"] + 0.01 < 3.5
    assert results["rtn_3bit_group128"]["bits_per_weight"] > 3
    assert results["original"]["bits_per_weight"] in (16.0, 32.0)
    assert report["train"]["steps"] == 6
    assert report["size"]["palettized_layers_ratio"] > 4  # 16-bit -> 3-bit indices + LUT
    host = {"peak_rss_mib", "rss_mib", "host_total_mib", "host_available_mib"}
    assert host <= set(report["memory"])  # psutil / getrusage figures
    assert all(report["memory"][k] > 0 for k in host)
    # where the time went: every phase, adding up to the whole run (rounding aside)
    phases = report["phases_s"]
    assert list(phases) == ["load", "baselines", "dkm_init", "train", "after_training"]
    assert all(v >= 0 for v in phases.values())
    assert abs(sum(phases.values()) - report["wall_time_s"]) < 1.0
    assert report["train"]["precision"] in ("bf16 autocast", "float32")
    md = (out / "report.md").read_text()
    assert "eDKM hard, reloaded" in md and "post-training k-means" in md
    assert f"{report['train']['precision']}): loading " in md and "DKM init" in md
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


def test_text_column_reaches_the_data(tiny, capsys, monkeypatch):
    """``--text-column`` lands in the recipe, and the recipe's column is what the run reads."""
    import datasets
    from transformers import AutoTokenizer

    from edkm.compress import _load_inputs
    from edkm.config import Recipe
    from edkm.errors import InputError

    monkeypatch.setenv("EDKM_CACHE_DIR", str(tiny["tmp"] / "cache"))
    docs = [d.strip() for d in tiny["data"].read_text().split("\n\n") if d.strip()]
    parquet = tiny["tmp"] / "text.parquet"
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(parquet))
    capsys.readouterr()  # the writer's progress bar
    out = tiny["tmp"] / "run"
    args = ["--model", tiny["model"], "--data", parquet, "--config", tiny["recipe"], "--out", out]
    assert _run(*args) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "'body'" in err and len(err.strip().splitlines()) == 1

    seen = []

    def fake_compress(recipe, **_):
        seen.append(recipe)
        raise InputError("stop here")

    # the module, not the function of the same name that ``edkm.compress`` may resolve to
    monkeypatch.setattr(importlib.import_module("edkm.compress"), "compress", fake_compress)
    assert _run(*args, "--text-column", "body") == 2
    assert seen[0].text_column == "body" and seen[0].data == str(parquet)

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    from_txt = _load_inputs(Recipe.from_yaml(tiny["recipe"]), tokenizer)
    from_parquet = _load_inputs(seen[0], tokenizer)
    assert from_parquet[0] == from_txt[0]  # the same documents on the same side of the split
    assert torch.equal(from_parquet[1], from_txt[1]) and torch.equal(from_parquet[2], from_txt[2])


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
    ra = json.loads((stopped / "report.json").read_text())
    rb = json.loads((whole / "report.json").read_text())
    assert ra["results"] == rb["results"]  # the soft row too: evaluated at the final temperature
    # the resumed invocation's time figures are its own, and the report says so
    assert (ra["train"]["resumed_from_step"], rb["train"]["resumed_from_step"]) == (3, 0)
    assert "resumed after step 3 (its time only)" in (stopped / "report.md").read_text()
    assert "Whole run: " in (whole / "report.md").read_text()


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


class _OffloadWitness:
    """Watches a run from outside the offload hooks: the distinct storages they offloaded per
    backward (by ``untyped_storage()`` pointer), the raw losses, and the gradients before each
    optimizer step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        from edkm.offload import SavedTensorOffload

        self.storages: dict[tuple[str, int], torch.UntypedStorage] = {}
        self.per_backward: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.grads: list[list[torch.Tensor]] = []
        pack, backward = SavedTensorOffload._pack, torch.Tensor.backward

        def counting_pack(off: SavedTensorOffload, t: torch.Tensor) -> object:
            out = pack(off, t)
            if out is not t:  # offloaded (a record came back instead of the tensor)
                st = t.untyped_storage()
                # holding the storage keeps its address from being reused by a later tensor
                self.storages[(str(t.device), st.data_ptr())] = st
            return out

        def watched_backward(loss: torch.Tensor, *args: object, **kwargs: object) -> None:
            self.losses.append(loss.detach().clone())
            backward(loss, *args, **kwargs)
            self.per_backward.append(len(self.storages))
            self.storages.clear()

        def before_step(opt: torch.optim.Optimizer, *_: object) -> None:
            params = [p for g in opt.param_groups for p in g["params"]]
            self.grads.append([p.grad.clone() for p in params if p.grad is not None])

        monkeypatch.setattr(SavedTensorOffload, "_pack", counting_pack)
        monkeypatch.setattr(torch.Tensor, "backward", watched_backward)
        self._handle = register_optimizer_step_pre_hook(before_step)

    def close(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("method", ["auto", "reference"])
def test_offloaded_run_is_bit_identical_with_one_host_copy_per_storage(tiny, monkeypatch, method):
    """``offload: {enabled: true}`` moves the DKM layers' saved tensors to the host and back:
    the same losses, gradients and weights bit for bit, one host copy per distinct storage.

    ``auto`` is the default (uniquified DKM on CPU: it saves little but the soft weight);
    reference DKM saves the most (N x K maps, and views sharing a storage)."""
    base = tiny_recipe(tiny["model"], tiny["data"], steps=3, checkpoint_every=3)
    base = base.with_overrides(**{"eval.baselines": False, "dkm.method": method})
    runs = {}
    # min_bytes 0: every tensor of the tiny model is far below the 1 MiB default; the
    # reference run switches offload on with the command line's --offload instead of the recipe
    flag = ["--offload"] if method == "reference" else []
    on = {"min_bytes": 0} if flag else {"enabled": True, "min_bytes": 0}
    for name, offload, extra in (("plain", {}, []), ("offload", on, flag)):
        recipe = tiny["tmp"] / f"{name}.yaml"
        base.with_overrides(offload=offload).to_yaml(recipe)
        witness = _OffloadWitness(monkeypatch)
        try:
            out = tiny["tmp"] / name
            assert _run("--config", recipe, "--out", out, "--quiet", *extra) == 0
        finally:
            witness.close()
            monkeypatch.undo()
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        report = json.loads((out / "report.json").read_text())
        weights = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
        runs[name] = (witness, log, report, weights)
    (w0, log0, rep0, weights0), (w1, log1, rep1, weights1) = runs["plain"], runs["offload"]

    def same_step(r: dict) -> dict:
        return {k: r[k] for k in ("step", "loss", "grad_norm", "lr", "tau_scale", "tokens")}

    assert [same_step(r) for r in log1] == [same_step(r) for r in log0]
    assert len(w1.losses) == 3 and all(map(torch.equal, w1.losses, w0.losses))
    assert len(w1.grads) == 3
    for g1, g0 in zip(w1.grads, w0.grads, strict=True):
        assert len(g1) == len(g0) > 0 and all(map(torch.equal, g1, g0))
    assert weights1.keys() == weights0.keys()
    assert all(torch.equal(weights1[k], weights0[k]) for k in weights0)
    assert rep1["results"] == rep0["results"]
    # the host copy count is the number of distinct storages offloaded, step by step
    assert w0.per_backward == [0, 0, 0] and "offload" not in log0[0]
    counts = [r["offload"]["host_copies"] for r in log1]
    assert counts == w1.per_backward and min(counts) > 0
    assert rep1["recipe"]["offload"]["enabled"] is True
    total = rep1["train"]["offload"]
    assert rep0["train"]["offload"] is None
    assert total["host_copies"] == sum(w1.per_backward) and total["steps"] == 3
    assert total["bytes_to_device"] == total["bytes_to_host"] > 0
    assert total["tensors_offloaded"] == total["host_copies"] + total["copies_avoided"]
    if method == "reference":
        assert total["copies_avoided"] > 0  # views of one storage shared a host copy


def test_baselines_follow_a_grouped_recipe_and_count_bits(tmp_path, one_thread):
    """A grouped-LUT recipe: the k-means row uses the same LUT layout as DKM (bits per weight
    b + G * 2**b * 16 / N), the dense row counts the weights' dtype."""
    import dataclasses

    from edkm.compress import _baselines
    from edkm.config import DKMConfig
    from edkm.nn.palettize import select_layers
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    dkm = DKMConfig(bits=3, granularity="per_grouped_channel", group_size=16)
    recipe = dataclasses.replace(tiny_recipe(tmp_path, tmp_path), dkm=dkm)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    results = _baselines(model, ids, recipe, tmp_path, show=False)
    assert set(results) == {
        "original",
        "rtn_3bit_per_tensor",
        "rtn_3bit_group128",
        "kmeans_3bit_lut_groups_of_16",
    }
    shapes = [m.weight.shape for _, m, _ in select_layers(model, dkm)]
    n = sum(o * i for o, i in shapes)
    luts = sum(o // 16 for o, _ in shapes)
    assert results["kmeans_3bit_lut_groups_of_16"]["bits_per_weight"] == 3 + luts * 8 * 16 / n
    assert results["original"]["bits_per_weight"] == 32.0
