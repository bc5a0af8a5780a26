"""benchmarks/sharding.py at a tiny width: counted traffic follows the ring formulas."""

from __future__ import annotations

import torch


def test_sharding_benchmark_counts_the_engines_collectives(tmp_path) -> None:
    from benchmarks import sharding

    threads = torch.get_num_threads()
    try:
        args = ["--width", "128", "--seq", "16", "--worlds", "1,2", "--out-dir", str(tmp_path)]
        records = sharding.main([*args, "--rows", "sharded DKM"])
    finally:
        torch.set_num_threads(threads)
    rows = {(r["world"], r["row"]): r for r in records}
    dkm1, dkm2 = rows[(1, "sharded DKM")], rows[(2, "sharded DKM")]
    assert dkm1["sent_bytes"] == 0  # one rank sends nothing
    buf = dkm2["collective_buffer_bytes"]
    # 7 weights: histogram and bin sums all-reduced, (G=1) x 65,536 x 4 bytes each
    assert buf["all_reduce"] == 7 * 2 * 65536 * 4
    assert dkm2["collective_calls"] == {"all_reduce": 14, "all_gather": 14, "reduce_scatter": 7}
    want = 2 * buf["all_reduce"] // 2 + (buf["all_gather"] + buf["reduce_scatter"]) // 2
    assert dkm2["sent_bytes"] == want
    # half the rows on each rank: less DKM memory than one rank with all of them
    assert 0 < dkm2["dkm_bytes"] < dkm1["dkm_bytes"]
    assert (tmp_path / "sharding_fake.json").is_file()
