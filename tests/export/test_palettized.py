"""Tests for edkm.export.palettized: the LUT checkpoint round trip, its layout, atomic writes and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import edkm
from edkm.config import DKMConfig, LayerOverride
from edkm.errors import InputError
from edkm.export.format import META_FILE, TENSORS_FILE
from edkm.export.palettized import load_palettized, save_palettized
from edkm.nn.dense import densify_
from edkm.nn.palettize import finalize, palettize_, set_mode
from edkm.nn.palettized_linear import PalettizedLinear
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def _finalized(cfg: DKMConfig, *, train: bool = False, **overrides: Any) -> Any:
    model = make_tiny_llama(**overrides)
    palettize_(model, cfg)
    if train:  # one DKM step, so that the saved LUTs are trained ones
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    finalize(model)
    return model.eval()


@pytest.fixture(scope="module")
def finalized() -> nn.Module:
    return _finalized(DKMConfig(method="reference", bits=3), train=True)


@pytest.fixture(scope="module")
def saved(finalized, tmp_path_factory) -> Path:
    return save_palettized(finalized, tmp_path_factory.mktemp("ckpt") / "model")


def _palettized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, PalettizedLinear)]


@pytest.mark.parametrize("dense", [False, True])
def test_round_trip_is_bit_identical(finalized, saved, dense):
    loaded: Any = load_palettized(saved, dense=dense)
    assert not loaded.training
    names = _palettized_names(finalized)
    assert len(names) == 14
    for name in names:
        module = loaded.get_submodule(name)
        assert isinstance(module, nn.Linear if dense else PalettizedLinear), name
        assert torch.equal(module.weight, finalized.get_submodule(name).weight.detach()), name
    ref_state = finalized.state_dict()
    for key, value in loaded.state_dict().items():
        if key in ref_state:
            assert torch.equal(value, ref_state[key]), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied embeddings survive
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, finalized(input_ids=IDS).logits)


def test_file_layout(finalized, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", TENSORS_FILE, META_FILE]
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["format"] == "edkm-palettized" and meta["format_version"] == 1
    assert DKMConfig.from_dict(meta["dkm_config"]) == DKMConfig(method="reference", bits=3)
    assert meta["model_class"] == "LlamaForCausalLM"
    assert meta["model_config"]["num_key_value_heads"] == 2
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with safe_open(str(saved / TENSORS_FILE), "pt") as f:
        keys = set(f.keys())
        for name, info in meta["layers"].items():
            out_f, in_f = info["shape"]
            assert info["bits"] == 3 and info["weight_dtype"] == "float32"
            assert f"{name}.weight" not in keys
            packed = f.get_tensor(f"{name}.packed_indices")
            assert packed.dtype == torch.uint8
            assert packed.numel() == -(-out_f * in_f * 3 // 8)  # ceil(N*b/8), no padding
            assert f.get_tensor(f"{name}.lut").dtype == torch.float16
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


def test_grouped_luts_and_odd_bits_round_trip(tmp_path):
    cfg = DKMConfig(method="reference", bits=5, granularity="per_grouped_channel", group_size=16)
    model = _finalized(cfg)
    path = save_palettized(model, tmp_path / "g")
    for dense in (False, True):
        loaded: Any = load_palettized(path, dense=dense)
        layer = loaded.get_submodule("model.layers.1.mlp.down_proj")
        assert torch.equal(layer.weight, model.get_submodule("model.layers.1.mlp.down_proj").weight)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    with safe_open(str(path / TENSORS_FILE), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.k_proj.lut").shape == (2, 32)


def test_untied_bf16_model_round_trip(tmp_path):
    model = make_tiny_llama(tie_word_embeddings=False).to(torch.bfloat16)
    palettize_(
        model,
        DKMConfig(
            method="reference", bits=2, module_name_configs={"lm_head": LayerOverride(bits=4)}
        ),
    )
    finalize(model)
    path = save_palettized(model, tmp_path / "bf16")
    loaded: Any = load_palettized(path)
    assert loaded.lm_head.weight_dtype == torch.bfloat16 and loaded.lm_head.bits == 4
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_resave_of_loaded_models_is_identical(saved, tmp_path):
    original = load_file(str(saved / TENSORS_FILE))
    for dense in (False, True):
        path = save_palettized(load_palettized(saved, dense=dense), tmp_path / f"re{dense}")
        again = load_file(str(path / TENSORS_FILE))
        assert again.keys() == original.keys()
        assert all(torch.equal(again[k], original[k]) for k in original)


def _bits(path: Path) -> int:
    return int(getattr(load_palettized(path).get_submodule("model.layers.0.mlp.up_proj"), "bits"))  # noqa: B009


def test_overwrite_is_atomic_and_complete(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    first = _finalized(DKMConfig(method="reference", bits=2))
    second = _finalized(DKMConfig(method="reference", bits=4))
    save_palettized(first, target)
    save_palettized(second, target)
    assert _bits(target) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match=r"disk full"):
        save_palettized(first, target)
    assert _bits(target) == 4  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_replace_a_foreign_folder(finalized, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"is not a palettized checkpoint; refusing to replace"):
        save_palettized(finalized, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_errors(tmp_path):
    model = make_tiny_llama()
    with pytest.raises(InputError, match=r"no palettized layers"):
        save_palettized(model, tmp_path / "a")
    palettize_(model, DKMConfig(method="reference", bits=2))
    with pytest.raises(InputError, match=r"still DKM-wrapped; call edkm.finalize"):
        save_palettized(model, tmp_path / "a")
    finalize(model)
    o_proj = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():  # a finalized weight is decoded afresh: editing it changes nothing
        o_proj.weight[0, 0] += 1.0
    assert torch.equal(o_proj.weight, o_proj.to_palette().dense(o_proj.weight_dtype))
    o_proj.lut_trainable_(True)
    with pytest.raises(InputError, match=r"o_proj': its LUT is trainable; freeze it"):
        save_palettized(model, tmp_path / "a")
    o_proj.lut_trainable_(False)
    densify_(model)  # the dense form holds weights that can change
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] += 1.0
    with pytest.raises(
        InputError, match=r"layer 'model.layers.0.self_attn.o_proj': its weight changed"
    ):
        save_palettized(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for file in saved.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_load_errors_name_the_file(saved, tmp_path):
    with pytest.raises(InputError, match=r"checkpoint folder '.*nowhere' does not exist"):
        load_palettized(tmp_path / "nowhere")
    path = _copy(saved, tmp_path)
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text())

    meta_file.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(InputError, match=rf"'.*{META_FILE}': format version 2 is not supported"):
        load_palettized(path)
    meta_file.write_text("{not json")
    with pytest.raises(InputError, match=rf"'.*{META_FILE}': not valid JSON"):
        load_palettized(path)
    meta_file.unlink()
    with pytest.raises(InputError, match=rf"'.*{META_FILE}' is missing"):
        load_palettized(path)
    meta_file.write_text(json.dumps(meta))

    tensors_file = path / TENSORS_FILE
    data = tensors_file.read_bytes()
    tensors_file.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=rf"'.*{TENSORS_FILE}': truncated or corrupt safetensors"):
        load_palettized(path)
    tensors_file.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match=rf"'.*{TENSORS_FILE}': truncated or corrupt"):
        load_palettized(path)
    tensors_file.unlink()
    with pytest.raises(InputError, match=rf"'.*{TENSORS_FILE}' is missing"):
        load_palettized(path)

    tensors = load_file(str(saved / TENSORS_FILE))
    key = "model.layers.1.self_attn.v_proj.packed_indices"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(tensors_file))
    with pytest.raises(
        InputError,
        match=rf"'.*{TENSORS_FILE}': layer 'model.layers.1.self_attn.v_proj' has 767 index bytes, expected 768",
    ):
        load_palettized(path)


def test_hard_mode_finalized_and_reloaded_weights_are_identical(tmp_path):
    """The export invariant: hard-mode DKMLinear == finalized == saved and reloaded (atol=0),
    with at most 2**bits distinct values per LUT group."""
    cfg = DKMConfig(method="reference", bits=3, granularity="per_grouped_channel", group_size=32)
    model = make_tiny_llama().to(torch.bfloat16)
    palettize_(model, cfg)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    set_mode(model, "hard")
    model.eval()
    hard = {n: m.hard_weight() for n, m in model.named_modules() if hasattr(m, "hard_weight")}
    with torch.no_grad():
        hard_logits = model(input_ids=IDS).logits
    finalize(model)
    loaded: Any = load_palettized(save_palettized(model, tmp_path / "m"))
    assert len(hard) == 14
    for name, weight in hard.items():
        final = model.get_submodule(name).weight
        reloaded = loaded.get_submodule(name).weight
        torch.testing.assert_close(final, weight, rtol=0, atol=0)
        torch.testing.assert_close(reloaded, weight, rtol=0, atol=0)
        for group in weight.reshape(-1, 32 * weight.shape[1]):
            assert group.unique().numel() <= 8, name
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, hard_logits)
        assert torch.equal(loaded(input_ids=IDS).logits, hard_logits)


def test_public_names_are_exported():
    assert edkm.save_palettized is save_palettized
    assert edkm.load_palettized is load_palettized
    assert edkm.PalettizedLinear is PalettizedLinear
