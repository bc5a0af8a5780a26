from edkm.eval.report import render_markdown, write_report


def _report():
    res = {"ppl": 20.0, "nll": 3.0, "tokens": 10, "windows": 2, "seq_len": 6}
    return {
        "recipe": {"model": "default", "data": "default", "dkm": {"bits": 3}},
        "results": {
            "original": {**res, "bits_per_weight": 32.0},
            "rtn_3bit_group128": {**res, "ppl": 400.0, "bits_per_weight": 3.1484375},
            "kmeans_3bit_per_tensor": {**res, "ppl": 5e5, "bits_per_weight": 3.0001},
            "edkm_soft": {**res, "ppl": 60.0},
            "edkm_hard_reloaded": {**res, "ppl": 80.0, "bits_per_weight": 3.0001},
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
    assert "| model | perplexity | x original | bits/weight |" in md
    assert "| original (fp32) | 20.00 | 1.00 | 32.000 |" in md
    assert "| round-to-nearest, 3-bit, group128 | 400.00 | 20.00 | 3.148 |" in md
    assert "| post-training k-means, 3-bit, per tensor | 500000.00 | 25000.00 | 3.000 |" in md
    assert "| eDKM soft (DKM weights, before finalize) | 60.00 | 3.00 |  |" in md
    assert "| **eDKM hard, reloaded from disk (shipped)** | 80.00 | 4.00 | 3.000 |" in md
    assert "bits/weight: stored bits per weight of the quantized Linear layers" in md
    assert "(5.33x smaller)" in md
    write_report(_report(), tmp_path)
    assert (tmp_path / "report.md").read_text() == md
    assert '"edkm_soft"' in (tmp_path / "report.json").read_text()
    assert not list(tmp_path.glob(".*tmp"))


def test_phase_line_names_the_lut_phase_only_when_it_ran():
    phases = {"load": 1.0, "train": 12.0, "after_training": 17.0}
    md = render_markdown({**_report(), "phases_s": phases})
    assert "training 12 s, evaluation, finalize and export 17 s." in md
    lut = {"steps": 4, "tokens_seen": 64, "train_time_s": 5.0}
    md = render_markdown({**_report(), "phases_s": phases, "lut_tune": lut})
    assert "LUT fine-tuning (indices fixed, trainable: all): 4 steps, 64 tokens, 5 s." in md
    assert "training 12 s, evaluation, LUT fine-tuning, finalize and export 17 s." in md


def test_host_memory_figures_match_psutil():
    import psutil

    from edkm.eval.report import host_memory

    mem = host_memory()
    host = psutil.virtual_memory()
    assert mem["host_total_mib"] == round(host.total / 2**20, 1)
    # available memory and the RSS move while the test runs: compare within a margin
    assert abs(mem["host_available_mib"] - host.available / 2**20) < 0.1 * host.total / 2**20
    rss = psutil.Process().memory_info().rss / 2**20
    assert 0 < mem["rss_mib"] <= mem["peak_rss_mib"]
    assert abs(mem["rss_mib"] - rss) < max(64.0, 0.2 * rss)
    assert mem["peak_rss_mib"] < mem["host_total_mib"]


def test_report_prints_the_memory_figures(tmp_path):
    import json

    from edkm.eval.report import host_memory

    report = {**_report(), "memory": {**host_memory(), "peak_cuda_allocated_mib": 12.5}}
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| memory | MiB |" in md
    for label, key in [
        ("process peak resident set (getrusage)", "peak_rss_mib"),
        ("process resident set at the end (psutil)", "rss_mib"),
        ("host memory, total (psutil)", "host_total_mib"),
        ("host memory, available at the end (psutil)", "host_available_mib"),
        ("CUDA peak allocated (torch)", "peak_cuda_allocated_mib"),
    ]:
        assert f"| {label} | {report['memory'][key]:,.0f} |" in md
    assert json.loads((tmp_path / "report.json").read_text())["memory"] == report["memory"]
    # a report written before these figures existed still renders
    assert "| process peak resident set (getrusage) | 100 |" in render_markdown(_report())


def test_palettized_bits_per_weight_counts_shipped_indices_and_luts(tmp_path, one_thread):

    import edkm
    from edkm.eval.report import palettized_bits_per_weight
    from edkm.nn.palettized_linear import PalettizedLinear
    from tests.conftest import make_tiny_llama

    for bits, group_size in ((3, None), (4, 16), (2, 32)):
        model = make_tiny_llama()
        assert palettized_bits_per_weight(model) is None
        kwargs = {} if group_size is None else {"granularity": "per_grouped_channel"}
        cfg = edkm.DKMConfig(bits=bits, method="reference", group_size=group_size, **kwargs)
        edkm.palettize_(model, cfg)
        edkm.finalize(model)
        shapes = [
            (m.out_features, m.in_features)
            for m in model.modules()
            if isinstance(m, PalettizedLinear)
        ]
        n = sum(o * i for o, i in shapes)
        luts = sum(1 if group_size is None else o // group_size for o, _ in shapes)
        # every layer here holds a multiple of 8 indices: no padding byte
        assert palettized_bits_per_weight(model) == bits + luts * (1 << bits) * 16 / n
        path = edkm.save_palettized(model, tmp_path / f"m{bits}")
        assert palettized_bits_per_weight(edkm.load_palettized(path)) == (
            palettized_bits_per_weight(model)
        )
