from edkm.eval.report import render_markdown, write_report


def _report():
    res = {"ppl": 20.0, "nll": 3.0, "tokens": 10, "windows": 2, "seq_len": 6}
    return {
        "recipe": {"model": "default", "data": "default", "dkm": {"bits": 3}},
        "results": {
            "original": res,
            "rtn_3bit_group128": {**res, "ppl": 400.0},
            "kmeans_3bit_per_tensor": {**res, "ppl": 5e5},
            "edkm_soft": {**res, "ppl": 60.0},
            "edkm_hard_reloaded": {**res, "ppl": 80.0},
        },
        "reload_logits_identical": True,
        "size": {
            "palettized_layers_fp16_bytes": 2 * 2**20,
            "palettized_layers_lut_indices_bytes": 2**20 // 4,
            "palettized_layers_ratio": 5.33,
            "model_fp16_bytes": 3 * 2**20,
            "model_palettized_bytes": 2**20,
        },
        "train": {"steps": 5, "tokens_seen": 1000, "train_blocks": 3, "train_time_s": 12.0},
        "eval": {"windows": 2, "seq_len": 6},
        "wall_time_s": 30.0,
        "device": "cpu",
        "torch": "2.x",
        "memory": {"peak_rss_mib": 100.0},
    }


def test_markdown_rows_and_ratios(tmp_path):
    md = render_markdown(_report())
    assert "| original (fp32) | 20.00 | 1.00 |" in md
    assert "| round-to-nearest, 3-bit, group128 | 400.00 | 20.00 |" in md
    assert "| post-training k-means, 3-bit, per tensor | 500000.00 | 25000.00 |" in md
    assert "| **eDKM hard, reloaded from disk (shipped)** | 80.00 | 4.00 |" in md
    assert "(5.33x smaller)" in md
    write_report(_report(), tmp_path)
    assert (tmp_path / "report.md").read_text() == md
    assert '"edkm_soft"' in (tmp_path / "report.json").read_text()
    assert not list(tmp_path.glob(".*tmp"))
