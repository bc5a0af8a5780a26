"""Tests for edkm.eval.peer: coremltools' sensitive k-means as the report's data-aware peer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from edkm.cli.main import main
from edkm.config import DKMConfig
from edkm.eval.baselines import kmeans_
from edkm.nn.palettize import select_layers
from tests.conftest import make_tiny_llama
from tests.tiny_run import tiny_model_dir, tiny_recipe, tiny_text

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(model: torch.nn.Module, n: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(1)
    )


def _fisher(
    model: torch.nn.Module, blocks: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """Sum of squared gradients of the LM loss over the blocks, one block at a time."""
    probe = copy.deepcopy(model)
    modules = dict(probe.named_modules())
    fisher = {n: torch.zeros_like(modules[n].weight) for n in names}
    for block in blocks:
        probe.zero_grad()
        ids = block.unsqueeze(0)
        probe(input_ids=ids, labels=ids).loss.backward()
        for n in names:
            fisher[n] += modules[n].weight.grad.detach().square()
    return fisher


@pytest.mark.parametrize(
    "bits,config",
    [
        (3, DKMConfig(bits=3)),
        (2, DKMConfig(bits=2, granularity="per_grouped_channel", group_size=8)),
    ],
)
def test_skm_palettizes_the_selected_layers_with_fp16_luts(bits, config):
    pytest.importorskip("coremltools")
    from edkm.eval.peer import skm_

    model = make_tiny_llama(0)
    selected = [n for n, _, _ in select_layers(model, config)]
    others = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.removesuffix(".weight") not in selected
    }
    summary = skm_(model, _blocks(model), bits, config=config)
    assert summary.layers == selected and summary.bits == bits
    modules = dict(model.named_modules())
    for name in selected:
        w = modules[name].weight.detach()
        assert torch.equal(w, w.half().float())  # LUT entries stored in fp16
        groups = (
            w.reshape(1, -1)
            if config.group_size is None
            else w.reshape(-1, config.group_size * w.shape[1])
        )
        assert max(torch.unique(g).numel() for g in groups) <= 1 << bits
    for n, p in model.named_parameters():  # embeddings, norms (and the tied head) untouched
        if n in others:
            assert torch.equal(p.detach(), others[n]), n
    assert all(p.grad is None for p in model.parameters())  # nothing left for training
    # storage counted as k-means counts it: b-bit indices + fp16 LUTs of the same layout
    reference = kmeans_(make_tiny_llama(0), bits, config=config)
    assert summary.bits_per_weight == pytest.approx(reference.bits_per_weight)
    assert 0 < summary.weight_rel_error < 1


def test_skm_weighs_the_weights_by_their_sensitivity():
    """On the Fisher-weighted error it minimizes, SKM beats plain k-means at the same bits.

    One LUT per output channel, and four hidden channels scaled up 8x at the embedding so that
    their weights' sensitivities stand out: plain k-means spends its 4 centroids on every
    weight alike, sensitive k-means on the sensitive ones (measured: 0.65x the weighted error).
    """
    pytest.importorskip("coremltools")
    from edkm.eval.peer import skm_

    config = DKMConfig(bits=2, granularity="per_grouped_channel", group_size=1)
    original = make_tiny_llama(0)
    with torch.no_grad():
        original.model.embed_tokens.weight[:, :4] *= 8
    blocks = _blocks(original, n=6)
    names = [n for n, _, _ in select_layers(original, config)]
    fisher = _fisher(original, blocks, names)
    weighted = {}
    for label, apply in (
        ("skm", lambda m: skm_(m, blocks, 2, config=config)),
        ("kmeans", lambda m: kmeans_(m, 2, config=config)),
    ):
        model = copy.deepcopy(original)
        apply(model)
        a, b = dict(model.named_modules()), dict(original.named_modules())
        weighted[label] = sum(
            float((fisher[n] * (a[n].weight - b[n].weight).detach().square()).sum()) for n in names
        )
    assert weighted["skm"] < 0.9 * weighted["kmeans"]


def test_compress_reports_the_peer_row(tmp_path):
    pytest.importorskip("coremltools")
    model = tiny_model_dir(tmp_path / "model")
    data = tiny_text(tmp_path / "text.txt")
    recipe = tiny_recipe(model, data, steps=2).with_overrides(
        **{"eval.baselines": False, "eval.peer": "skm", "eval.peer_calib_blocks": 3}
    )
    config = tmp_path / "recipe.yaml"
    recipe.to_yaml(config)
    out = tmp_path / "run"
    assert main(["compress", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "report.json").read_text())["results"]
    assert set(results) == {"original", "skm_3bit_per_tensor", "edkm_soft", "edkm_hard_reloaded"}
    row = results["skm_3bit_per_tensor"]
    assert row["ppl"] > 1 and 3 < row["bits_per_weight"] < 3.5
    assert (
        "sensitive k-means (coremltools, data-aware), 3-bit, per tensor"
        in (out / "report.md").read_text()
    )


def test_peer_without_coremltools_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import edkm.eval.peer as peer

    monkeypatch.setattr(peer, "skm_available", lambda: False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("eval: {peer: skm}\n")
    assert main(["compress", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "eval.peer: skm needs coremltools: pip install edkm[coreml]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
