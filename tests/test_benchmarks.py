"""The benchmarks run end to end at a tiny size and measure what they say."""

from __future__ import annotations

import json
import os

import torch

from benchmarks import dkm_layer


def test_dkm_layer_rows_at_a_tiny_shape(tmp_path):
    out = tmp_path / "dkm_layer.json"
    threads = torch.get_num_threads()
    try:
        args = ["--shapes", "512x256", "--methods", "copy,reference,unique", "--repeats", "1"]
        dkm_layer.main([*args, "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"copy", "reference", "unique"}
    assert all(r["median_ms"] > 0 for r in rows.values())
    # the copy's output is released before its gradient is made: one weight's bytes at a time
    assert rows["copy"]["peak_bytes"] == 512 * 256 * 2
    # the reference keeps N x K attention maps for backward; the unique path keeps its fixed
    # ~1 MiB of tables and block buffers (which is why the shape is not tinier)
    assert rows["unique"]["peak_bytes"] < rows["reference"]["peak_bytes"]
    assert rows["unique"]["peak_reduction_vs_reference"] > 1


def test_ablation_measures_the_shipped_layer_through_the_trainers_offload(tmp_path):
    """The ablation at a tiny width: the shipped DKMLinear, the trainer's OffloadConfig path."""
    from benchmarks import ablation

    threads = torch.get_num_threads()
    try:
        args = ["--mode", "real", "--width", "128", "--seq", "32", "--min-bytes", "4096"]
        ablation.main([*args, "--rows", "+ uniquification", "--out-dir", str(tmp_path)])
        size = {"width": 128, "mlp": 344, "seq": 32, "min_bytes": 4096}
        # marshaling of reference DKM: memory that does not depend on the values, so a fake
        # and a real run must measure the same
        marshal = {
            m: ablation.run_row("+ marshaling", "reference", True, mode=m, **size)
            for m in ("fake", "real")
        }
    finally:
        torch.set_num_threads(threads)
    records = json.loads((tmp_path / "ablation_real.json").read_text())
    assert [r["row"] for r in records] == ["no DKM", "+ uniquification"]
    floor, unique = records
    assert unique["layer"] == "edkm.nn.dkm_linear.DKMLinear"
    assert unique["offload_config"]["enabled"] and unique["dkm_config"]["method"] == "unique"
    assert floor["bytes_to_host"] == 0 and "offload_config" not in floor
    stats = unique["offload"]
    # what the uniquified layers save above the threshold: the bf16 soft weight each matmul
    # keeps (the input and the weight stay), one host copy each, brought back once
    assert stats["bytes_to_host"] == 2 * unique["linear_params"] == stats["bytes_to_device"]
    assert stats["host_copies"] == stats["restores"] and stats["copies_avoided"] == 0
    fake, real = marshal["fake"], marshal["real"]
    assert fake["measurement"] == "memtracker-fake" and real["measurement"] == "memtracker"
    assert fake["peak_bytes"] == real["peak_bytes"]
    # (the real run also saves the weight once more, kept: the finite check runs under grad)
    moved = ("tensors_offloaded", "host_copies", "copies_avoided", "bytes_to_host", "restores")
    assert all(fake["offload"][k] == real["offload"][k] for k in moved)
    assert real["offload"]["copies_avoided"] > 0  # views of one storage share a host copy
    assert (tmp_path / "ablation_real.md").is_file()


def _ones_from_env(var: str):
    """Setup for the RSS child: the run allocates as many fp32 elements as ``var`` says."""
    import torch

    n = int(os.environ.get(var, "0"))
    return lambda: torch.ones(n) * 2


def test_subprocess_peak_rss_gives_the_child_its_environment():
    from benchmarks._common import subprocess_peak_rss

    var = "EDKM_TEST_RSS_ELEMENTS"
    before = dict(os.environ)
    with_env = subprocess_peak_rss(_ones_from_env, var, env={var: str(16 << 20)}, timeout=120)
    without = subprocess_peak_rss(_ones_from_env, var, timeout=120)
    assert dict(os.environ) == before  # the parent's environment is left as it was
    # two 64 MiB tensors at once in the child given the variable, nothing without it
    assert with_env["peak_rss_delta"] > 100 << 20
    assert without["peak_rss_delta"] < 32 << 20
