"""Tests for edkm.cli.export: ``edkm export`` on good and bad folders (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edkm
from edkm.cli.main import main
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    model = make_tiny_llama()
    edkm.palettize_(model, edkm.DKMConfig(bits=4, method="reference"))
    return edkm.save_palettized(edkm.finalize(model), tmp_path_factory.mktemp("cli") / "model")


def _one_error_line(capsys, argv: list[str], message: str) -> None:
    capsys.readouterr()  # drop what the setup printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edkm export: error: ")
    assert message in err, err


def test_bad_folders_are_one_line_exit_2(tmp_path, capsys, folder):
    out = str(tmp_path / "m.mlpackage")
    _one_error_line(
        capsys, ["export", "--model", str(tmp_path / "nope"), "--out", out], "does not exist"
    )
    make_tiny_llama().save_pretrained(tmp_path / "plain")
    _one_error_line(
        capsys,
        ["export", "--model", str(tmp_path / "plain"), "--out", out],
        "is not a palettized edkm model",
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{oops")
    _one_error_line(
        capsys, ["export", "--model", str(tmp_path / "broken"), "--out", out], "not valid JSON"
    )
    meta = json.loads((folder / "palettization.json").read_text())
    meta["layers"]["model.layers.0.mlp.up_proj"]["bits"] = 0
    bad = tmp_path / "tampered"
    bad.mkdir()
    (bad / "palettization.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    _one_error_line(capsys, ["export", "--model", str(bad), "--out", out], "invalid bits 0")
    _one_error_line(
        capsys,
        ["export", "--model", str(folder), "--out", out, "--seq-len", "0"],
        "--seq-len must be at least 1",
    )


def test_exports_a_save_pretrained_folder_and_checks_it(tmp_path, capsys, folder):
    pytest.importorskip("coremltools")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "hf")
    out = tmp_path / "m.mlpackage"
    argv = [
        "export",
        "--model",
        str(tmp_path / "hf"),
        "--out",
        str(out),
        "--target",
        "iOS16",
        "--seq-len",
        "4",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "checked: 14 constexpr_lut_to_dense ops equal the model's LUTs and indices" in printed
    assert (out / "Manifest.json").is_file()
