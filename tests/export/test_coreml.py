"""Tests for edkm.export.coreml: the package holds one constexpr_lut_to_dense per palettized
weight, with our LUT and indices bit for bit (read back on Linux, without running it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import edkm
from edkm.errors import InputError
from tests.conftest import make_tiny_llama

ct = pytest.importorskip("coremltools")

from edkm.export.coreml import (  # noqa: E402 (needs coremltools, skipped above without it)
    check_export,
    export_coreml,
    op_name,
    read_palettes,
)


def _palettized(bits: int, group_size: int | None = None, seed: int = 0) -> Any:
    model = make_tiny_llama(seed=seed)
    kwargs: dict[str, Any] = {"bits": bits, "method": "reference"}
    if group_size is not None:
        kwargs.update(granularity="per_grouped_channel", group_size=group_size)
    edkm.palettize_(model, edkm.DKMConfig(**kwargs))
    return edkm.finalize(model)


CASES = {"3bit": (3, None, "iOS18"), "4bit_ios16": (4, None, "iOS16"), "3bit_g16": (3, 16, "iOS18")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Any, Path]]:
    """Each case converted once (a conversion takes seconds)."""
    out = {}
    for case, (bits, group_size, target) in CASES.items():
        model = _palettized(bits, group_size)
        folder = tmp_path_factory.mktemp(case)
        out[case] = (model, export_coreml(model, folder / "m.mlpackage", target=target, seq_len=8))
    return out


@pytest.mark.parametrize(
    ("case", "lut_shape"),
    [("3bit", (1, 1, 8, 1)), ("4bit_ios16", (16,)), ("3bit_g16", (4, 1, 8, 1))],
)
def test_package_holds_our_luts_and_indices_bit_for_bit(exported, case, lut_shape):
    model, path = exported[case]
    assert check_export(path, model) == 14
    found = read_palettes(path)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    lut, indices = found[op_name("model.layers.1.mlp.down_proj")]
    assert lut.shape == lut_shape and lut.dtype == np.float16
    ours = layer.lut.numpy()
    assert np.array_equal(lut.reshape(ours.shape).view(np.uint16), ours.view(np.uint16))
    assert np.array_equal(indices, layer.indices().numpy())
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids"]


def test_a_different_checkpoint_fails_the_check(exported):
    _, path = exported["3bit"]
    other = _palettized(3, seed=1)
    with pytest.raises(
        InputError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' LUT differs"
    ):
        check_export(path, other)


def test_targets_and_paths_are_checked(tmp_path):
    model = _palettized(3)
    with pytest.raises(InputError, match=r"3-bit LUTs need --target iOS18"):
        export_coreml(model, tmp_path / "m.mlpackage", target="iOS16")
    with pytest.raises(InputError, match=r"grouped LUTs need --target iOS18"):
        export_coreml(_palettized(4, 16), tmp_path / "m.mlpackage", target="iOS16")
    with pytest.raises(InputError, match=r"--out must end in \.mlpackage"):
        export_coreml(model, tmp_path / "m.zip")
    (tmp_path / "x.mlpackage").mkdir()
    (tmp_path / "x.mlpackage" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"is not a Core ML package; refusing"):
        export_coreml(model, tmp_path / "x.mlpackage")
    with pytest.raises(InputError, match=r"no palettized layers"):
        export_coreml(make_tiny_llama(), tmp_path / "m.mlpackage")
    with pytest.raises(InputError, match=r"is not a Core ML package \(no Manifest\.json\)"):
        read_palettes(tmp_path)


@pytest.mark.slow
def test_default_model_decoder_exports_bit_exact(tmp_path):
    """All 210 decoder Linear layers of SmolLM2-135M at 3 bits per tensor; the conversion time
    is written to the test's folder (and printed with -s)."""
    from edkm.io.models import load_model

    model, _ = load_model("default", dtype=torch.float32)
    edkm.palettize_(model, edkm.DKMConfig(bits=3))
    model = edkm.finalize(model)
    start = time.perf_counter()
    path = export_coreml(model, tmp_path / "smollm2.mlpackage", seq_len=64)
    seconds = time.perf_counter() - start
    assert check_export(path, model) == 210
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    record = {"convert_s": round(seconds, 1), "package_bytes": size, "layers": 210}
    (tmp_path / "timing.json").write_text(json.dumps(record))
    print(record)
