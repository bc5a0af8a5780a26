"""Tests for edkm.export.hf_quantizer: transformers' from_pretrained / save_pretrained on edkm
folders (palettized, pre-passed, both), exactness against edkm.load_palettized, sizes, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import edkm
import edkm.prepass
from edkm.errors import InputError
from edkm.nn.palettized_linear import PalettizedLinear
from edkm.prepass import save_structured
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def _finalized(bits: int = 3, group_size: int | None = None, **overrides: Any) -> Any:
    model = make_tiny_llama(**overrides)
    kwargs: dict[str, Any] = {"bits": bits, "method": "reference"}
    if group_size is not None:
        kwargs.update(granularity="per_grouped_channel", group_size=group_size)
    edkm.palettize_(model, edkm.DKMConfig(**kwargs))
    return edkm.finalize(model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return edkm.save_palettized(_finalized(), tmp_path_factory.mktemp("hf") / "model")


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_matches_load_palettized(folder, dtype):
    hf: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ours: Any = edkm.load_palettized(folder, dtype=dtype)
    layer = hf.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, PalettizedLinear) and layer.weight_dtype == dtype
    assert layer.lut.dtype == torch.float16  # the LUT is never cast to the model dtype
    assert _same_state(hf, ours)
    with torch.no_grad():
        logits = hf(input_ids=IDS).logits
        assert logits.dtype == dtype and torch.equal(logits, ours(input_ids=IDS).logits)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(hf.generate(IDS, **kwargs), ours.generate(IDS, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_round_trip_is_exact(folder, tmp_path, dtype):
    hf: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    hf.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "edkm"
    back: Any = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=dtype)
    assert _same_state(hf, back)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=IDS).logits, back(input_ids=IDS).logits)


def test_load_palettized_model_saves_with_save_pretrained(folder, tmp_path):
    """A model from edkm.load_palettized carries the quantization_config, so transformers'
    save_pretrained writes a folder that from_pretrained reads."""
    ours: Any = edkm.load_palettized(folder)
    ours.save_pretrained(tmp_path / "hf")
    back: Any = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert _same_state(ours, back)


def test_on_disk_size_is_indices_luts_and_other_tensors(tmp_path):
    model = _finalized(bits=3, group_size=32, hidden_size=128, intermediate_size=256)
    path = edkm.save_palettized(model, tmp_path / "m")
    expected = 0
    for module in model.modules():
        if isinstance(module, PalettizedLinear):
            n = module.in_features * module.out_features
            expected += -(-n * module.bits // 8) + 2 * module.lut.numel()
    others = {id(p): p for n, p in model.named_parameters() if ".lut" not in n}
    expected += sum(p.numel() * p.element_size() for p in others.values())
    size = (path / "model.safetensors").stat().st_size
    assert abs(size - expected) / expected < 0.02, (size, expected)


# -- pre-passes: a fake kind that narrows every MLP (as a pruning pre-pass would) ----------


def narrow_mlp(model: Any, manifest: dict[str, Any]) -> None:
    """Restructure: every decoder MLP gets ``width`` intermediate channels."""
    width = int(manifest["width"])
    for layer in model.model.layers:
        mlp = layer.mlp
        device, dtype = mlp.gate_proj.weight.device, mlp.gate_proj.weight.dtype
        hidden = mlp.gate_proj.in_features
        kw = {"bias": False, "device": device, "dtype": dtype}
        mlp.gate_proj = nn.Linear(hidden, width, **kw)
        mlp.up_proj = nn.Linear(hidden, width, **kw)
        mlp.down_proj = nn.Linear(width, hidden, **kw)


def _narrowed(width: int = 48) -> tuple[Any, dict[str, Any]]:
    """A tiny model pruned to ``width`` MLP channels (its first ones), and its manifest."""
    model = make_tiny_llama()
    manifest = {"kind": "narrow", "width": width}
    weights = [
        (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
        for layer in model.model.layers
    ]
    narrow_mlp(model, manifest)
    with torch.no_grad():
        for layer, (gate, up, down) in zip(model.model.layers, weights):
            layer.mlp.gate_proj.weight.copy_(gate[:width])
            layer.mlp.up_proj.weight.copy_(up[:width])
            layer.mlp.down_proj.weight.copy_(down[:, :width])
    return model.eval(), manifest


@pytest.fixture
def fake_kind(monkeypatch):
    monkeypatch.setitem(edkm.prepass._RESTRUCTURERS, "narrow", f"{__name__}:narrow_mlp")


def test_dense_prepassed_folder_loads_with_from_pretrained(fake_kind, tmp_path):
    model, manifest = _narrowed()
    save_structured(model, tmp_path / "pruned", [manifest])
    hf: Any = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert hf.model.layers[1].mlp.down_proj.in_features == 48
    assert type(hf.model.layers[1].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(hf(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("how", ["argument", "config"])
def test_prepassed_and_palettized_folder_reloads_both_ways(fake_kind, tmp_path, how):
    model, manifest = _narrowed()
    if how == "config":  # as a model loaded by from_pretrained from a pre-passed folder carries it
        model.config.quantization_config = {
            "quant_method": "edkm",
            "format_version": 1,
            "prepass": [manifest],
        }
    edkm.palettize_(model, edkm.DKMConfig(bits=3, method="reference"))
    model = edkm.finalize(model)
    prepass = [manifest] if how == "argument" else None
    path = edkm.save_palettized(model, tmp_path / "m", prepass=prepass)
    assert json.loads((path / "palettization.json").read_text())["prepass"] == [manifest]
    ours: Any = edkm.load_palettized(path)
    hf: Any = AutoModelForCausalLM.from_pretrained(path)
    for loaded in (ours, hf):
        layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
        assert isinstance(layer, PalettizedLinear) and layer.in_features == 48
        assert torch.equal(layer.weight, model.get_submodule("model.layers.0.mlp.down_proj").weight)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


# -- bad folders: one InputError line, nothing unpickled -----------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_config(path: Path, edit: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(format_version=9), r"format_version 9 is not supported"),
        (lambda q: q.update(extra=1), r"unknown keys \['extra'\]"),
        (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(bits=9), r"invalid bits 9"),
        (
            lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(bits=4),
            r"'model\.layers\.0\.mlp\.up_proj' LUT is F16 \[1, 8\], expected F16 \[1, 16\]",
        ),
        (
            lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(shape=[64, 128]),
            r"layer 'model\.layers\.0\.mlp\.up_proj' shape \[64, 128\] does not match the model",
        ),
        (
            lambda q: q["layers"].update({"model.nope": q["layers"]["model.layers.0.mlp.up_proj"]}),
            r"layer 'model\.nope' has no LUT or no indices",
        ),
        (
            lambda q: q.update(prepass=[{"kind": "mystery"}]),
            r"unknown pre-pass manifest kind 'mystery'",
        ),
    ],
)
def test_tampered_config_is_one_input_error(folder, tmp_path, edit, message):
    path = _copy(folder, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(InputError, match=message) as err:
        AutoModelForCausalLM.from_pretrained(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("what", ["indices", "lut_nan"])
def test_tampered_tensors_are_one_input_error(folder, tmp_path, what):
    path = _copy(folder, tmp_path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj"
    if what == "indices":  # indices for another shape: byte count no longer matches
        tensors[f"{name}.packed_indices"] = tensors[f"{name}.packed_indices"][:-1].clone()
        message = rf"'{name}' has indices U8 \[767\], expected U8 \[768\]"
    else:
        tensors[f"{name}.lut"] = torch.full_like(tensors[f"{name}.lut"], float("nan"))
        message = rf"layer '{name}': the LUT holds non-finite values"
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


def test_pickle_files_are_refused(folder, tmp_path):
    path = _copy(folder, tmp_path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"safetensors files only \(nothing is unpickled\)"):
        AutoModelForCausalLM.from_pretrained(path)


def test_registration_is_lazy_and_idempotent():
    import subprocess
    import sys

    code = (
        "import sys, edkm; assert 'transformers' not in sys.modules and 'torch' not in sys.modules;"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M;"
        "print(M['edkm'].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "EdkmHfQuantizer"
    from edkm.export.hf_quantizer import register

    register()
    register()


@pytest.mark.parametrize(("bits", "group_size"), [(3, 8), (4, 32), (2, 1)])
def test_grouped_luts_round_trip_bit_exact(tmp_path, bits, group_size):
    """Grouped LUTs (fast-path DKM, finalized): save_palettized -> load_palettized and the HF
    folder (from_pretrained) give the same LUTs, packed indices and logits, bit for bit."""
    model = make_tiny_llama()
    cfg = edkm.DKMConfig(
        bits=bits, method="unique", granularity="per_grouped_channel", group_size=group_size
    )
    edkm.palettize_(model, cfg)
    with torch.no_grad():
        model(input_ids=IDS)  # one soft (uniquified DKM) forward, as training runs it
    model = edkm.finalize(model)
    path = edkm.save_palettized(model, tmp_path / "g")
    ours: Any = edkm.load_palettized(path)
    hf: Any = AutoModelForCausalLM.from_pretrained(path)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PalettizedLinear)]
    assert layers
    for name, layer in layers:
        assert layer.group_size == group_size
        assert layer.lut.shape == (layer.out_features // group_size, 1 << bits)
        for loaded in (ours, hf):
            other = loaded.get_submodule(name)
            assert isinstance(other, PalettizedLinear) and other.group_size == group_size
            assert other.lut.dtype == torch.float16 and torch.equal(other.lut, layer.lut)
            assert torch.equal(other.packed_indices, layer.packed_indices)
            assert torch.equal(other.indices(), layer.indices())
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        assert torch.equal(ours(input_ids=IDS).logits, logits)
        assert torch.equal(hf(input_ids=IDS).logits, logits)
