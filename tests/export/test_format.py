"""Tests for edkm.export.format: the folder written, its metadata, and one clear error line for
each way a folder can be bad or tampered with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edkm.errors import InputError
from edkm.export.format import (
    FORMAT,
    FORMAT_VERSION,
    HF_CONFIG_FILE,
    META_FILE,
    TENSORS_FILE,
    layer_entry,
    layer_tensors,
    make_meta,
    read_checkpoint,
    write_checkpoint,
)
from edkm.nn.bitpack import pack_indices
from edkm.nn.palette import Palette


def _palette(out_f: int = 4, in_f: int = 6, bits: int = 3, group_size: int | None = 2) -> Palette:
    gen = torch.Generator().manual_seed(out_f * in_f + bits)
    groups = 1 if group_size is None else out_f // group_size
    lut = torch.randn(groups, 1 << bits, generator=gen).half()
    idx = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    return Palette(lut, pack_indices(idx, bits), bits, group_size, (out_f, in_f))


def _write(path: Path, **meta_overrides: Any) -> Path:
    palette = _palette()
    tensors = {**layer_tensors("fc", palette), "norm.weight": torch.ones(6)}
    meta = make_meta(
        model_class="ToyForCausalLM",
        model_config={"model_type": "toy"},
        dtype="float32",
        dkm_config=None,
        layers={"fc": layer_entry(palette, torch.bfloat16, bias=False)},
        tied={"head.weight": "norm.weight"},
    )
    meta.update(meta_overrides)
    return write_checkpoint(path, tensors, meta)


def test_round_trip_of_the_folder(tmp_path):
    palette = _palette()
    folder = _write(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == [HF_CONFIG_FILE, TENSORS_FILE, META_FILE]
    hf = json.loads((folder / HF_CONFIG_FILE).read_text())
    assert hf["architectures"] == ["ToyForCausalLM"] and hf["model_type"] == "toy"
    assert hf["quantization_config"] == {
        "quant_method": "edkm",
        "format_version": 1,
        "prepass": [],
        "layers": {"fc": layer_entry(palette, torch.bfloat16, bias=False)},
        "dkm_config": None,
    }
    with safe_open(str(folder / TENSORS_FILE), "pt") as f:
        assert f.metadata() == {"format": FORMAT}
        assert sorted(f.keys()) == ["fc.lut", "fc.packed_indices", "norm.weight"]
    meta = json.loads((folder / META_FILE).read_text())
    assert list(meta) == [
        "format",
        "format_version",
        "edkm_version",
        "model_class",
        "model_config",
        "dtype",
        "dkm_config",
        "layers",
        "tied",
        "prepass",
    ]
    assert (meta["format"], meta["format_version"]) == (FORMAT, FORMAT_VERSION) == (FORMAT, 1)
    ckpt = read_checkpoint(folder)
    stored = ckpt.layers["fc"]
    assert stored.weight_dtype == torch.bfloat16 and stored.bias is False
    assert torch.equal(stored.palette.lut, palette.lut)
    assert torch.equal(stored.palette.indices(), palette.indices())
    assert (stored.palette.bits, stored.palette.group_size) == (3, 2)
    assert sorted(ckpt.tensors) == ["head.weight", "norm.weight"]  # the tied name is filled in
    assert ckpt.tensors["head.weight"] is ckpt.tensors["norm.weight"]
    assert ckpt.dtype == torch.float32 and ckpt.meta_file == folder / META_FILE


def test_shared_memory_tensors_are_written_apart(tmp_path):
    base = torch.arange(8.0)
    folder = write_checkpoint(
        tmp_path / "c",
        {"a": base, "b": base},
        make_meta(
            model_class="M", model_config={}, dtype="float32", dkm_config=None, layers={}, tied={}
        ),
    )
    stored = load_file(str(folder / TENSORS_FILE))
    assert torch.equal(stored["a"], base) and torch.equal(stored["b"], base)


def _tamper_meta(folder: Path, edit: Any) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda m: m.update(format="other"),
            r"not an edkm palettized checkpoint \(format 'other'\)",
        ),
        (lambda m: m.pop("tied"), r"missing key 'tied'"),
        (lambda m: m.update(layers=[]), r"'layers' must be a dict"),
        (lambda m: m.update(dtype="int8"), r"unknown dtype 'int8'"),
        (lambda m: m["layers"]["fc"].update(bits=9), r"layer 'fc' has invalid bits 9"),
        (lambda m: m["layers"]["fc"].update(shape=[4]), r"layer 'fc' has invalid shape \[4\]"),
        (lambda m: m["layers"]["fc"].update(group_size=3), r"layer 'fc' has invalid group_size 3"),
        (lambda m: m["layers"]["fc"].update(bias="no"), r"layer 'fc' has invalid bias 'no'"),
        (lambda m: m["layers"]["fc"].update(weight_dtype="fp7"), r"unknown dtype 'fp7'"),
        (lambda m: m["layers"].update(fc=3), r"layer 'fc' entry is not an object"),
        (
            lambda m: m["layers"]["fc"].update(bits=2),
            r"'fc' LUT is torch.float16 \(2, 8\), expected",
        ),
        (lambda m: m["layers"].update(gone=m["layers"]["fc"]), r"'gone' has no LUT or no indices"),
        (lambda m: m["tied"].update(x="nowhere"), r"tied tensor 'x' refers to missing 'nowhere'"),
    ],
)
def test_a_tampered_metadata_file_is_one_input_error(tmp_path, edit, message):
    folder = _write(tmp_path / "ckpt")
    _tamper_meta(folder, edit)
    with pytest.raises(InputError, match=message) as info:
        read_checkpoint(folder)
    assert len(str(info.value).splitlines()) == 1
    assert str(folder) in str(info.value)


def test_tampered_tensors_are_one_input_error(tmp_path):
    folder = _write(tmp_path / "ckpt")
    tensors = load_file(str(folder / TENSORS_FILE))
    bad_lut = dict(tensors, **{"fc.lut": tensors["fc.lut"].float()})
    save_file(bad_lut, str(folder / TENSORS_FILE))
    with pytest.raises(InputError, match=r"'fc' LUT is torch.float32 \(2, 8\), expected float16"):
        read_checkpoint(folder)
    nan_lut = tensors["fc.lut"].clone()
    nan_lut[1, 2] = float("nan")
    save_file(dict(tensors, **{"fc.lut": nan_lut}), str(folder / TENSORS_FILE))
    with pytest.raises(InputError, match=r"layer 'fc' LUT holds non-finite values"):
        read_checkpoint(folder)
    short = tensors["fc.packed_indices"][:-1].clone()
    save_file(dict(tensors, **{"fc.packed_indices": short}), str(folder / TENSORS_FILE))
    with pytest.raises(
        InputError, match=r"'fc' has 8 index bytes, expected 9 \(ceil\(4\*6\*3/8\)\)"
    ):
        read_checkpoint(folder)


def test_write_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"exists and is not a folder"):
        _write(tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match=r"is not a palettized checkpoint; refusing to replace"):
        _write(tmp_path / "mine")
    first = _write(tmp_path / "ckpt")
    _write(tmp_path / "ckpt", dtype="bfloat16")  # a checkpoint replaces a checkpoint
    assert read_checkpoint(first).dtype == torch.bfloat16
