"""The DKM layer benchmark runs end to end at a tiny size and measures what it says."""

from __future__ import annotations

import json

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
