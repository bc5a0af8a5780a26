"""SliceGPT pre-pass: invariance, kept widths, restructure, save/load, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edkm.adapters import get_adapter
from edkm.errors import InputError
from edkm.prepass import load_structured, manifests_of, restructure, save_structured
from edkm.prepass.slicegpt import kept_dims, parameter_count, run_prepass, slice_model
from edkm.prepass.slicegpt_layers import SlicedLlamaDecoderLayer
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n: int = 6, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("rotation", ["pca", "random"])
def test_rotation_without_slicing_keeps_the_logits_fp64(rotation):
    model = make_tiny_llama().double()  # GQA: 4 query / 2 key-value heads, tied embeddings
    ref = copy.deepcopy(model)
    manifest = slice_model(model, _calib(), 0.0, rotation=rotation, show_progress=False)
    assert manifest["dims"] == [64] * 5
    with torch.no_grad():
        a, b = ref(input_ids=_ids()).logits, model(input_ids=_ids()).logits
    # the stock RMSNorm computes in float32 even for a float64 model: float32 rounding is
    # the floor here (measured ~1e-7)
    assert _rel(a, b) <= 1e-6
    # the rotation is real (not an identity that would pass trivially)
    q = model.model.layers[0].attn_shortcut.weight
    assert not torch.allclose(q, torch.eye(64, dtype=q.dtype), atol=1e-3)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False


def test_dropping_without_rotation_at_zero_sparsity_is_exact():
    model = make_tiny_llama().double()
    ref = copy.deepcopy(model)
    slice_model(model, _calib(), 0.0, rotation="none", show_progress=False)
    with torch.no_grad():
        assert _rel(ref(input_ids=_ids()).logits, model(input_ids=_ids()).logits) <= 1e-12


def test_kept_dims_schedule_and_rounding():
    assert kept_dims(576, 3, 0.25) == [432] * 7
    assert kept_dims(576, 2, 0.1) == [512] * 5  # 518.4 -> 518 -> multiple of 8
    assert kept_dims(576, 2, 0.1, round_to=1) == [518] * 5
    assert kept_dims(64, 2, [0.0, 0.5]) == [64, 64, 32, 32, 32]
    # a hidden size that is not a multiple of round_to: kept widths still are
    assert kept_dims(60, 1, 0.25) == [40, 40, 40]
    assert kept_dims(60, 1, 0.0) == [60, 60, 60]  # sparsity 0 never slices
    with pytest.raises(InputError, match="keeps no dimension"):
        kept_dims(64, 1, 0.9, round_to=16)
    with pytest.raises(InputError, match=r"sparsity must be a number in \[0, 1\)"):
        kept_dims(64, 1, 1.0)
    with pytest.raises(InputError, match="lists 1 sparsities; the model has 2 layers"):
        kept_dims(64, 2, [0.1])
    with pytest.raises(InputError, match="round_to must be a positive integer"):
        kept_dims(64, 1, 0.1, round_to=0)


def test_sliced_model_matches_restructure_of_a_meta_stock_model_and_lists_shortcuts():
    model = make_tiny_llama()
    dense_params = parameter_count(model)
    model, manifest = run_prepass(model, None, _calib(), 0.25)
    assert manifest["dims"] == [48] * 5 and manifest["kind"] == "slicegpt"
    assert manifests_of(model) == [manifest]
    assert isinstance(model.model.layers[1], SlicedLlamaDecoderLayer)
    assert model.model.embed_tokens.weight.shape == (256, 48)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)  # heads untouched
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 48)  # GQA kv heads
    assert model.model.layers[0].mlp.down_proj.weight.shape == (48, 128)
    assert model.lm_head.weight.shape == (256, 48)
    # the adapter lists the shortcut Linear layers, so palettization targets them too
    adapter = get_adapter(model)
    roles = list(adapter.block_linears(0))
    assert roles[-2:] == ["attn_shortcut", "mlp_shortcut"] and len(adapter.linear_layers()) == 18
    # norms: the paper's x / sqrt(sum(x^2)/D + eps) with stock modules
    norm = model.model.layers[0].input_layernorm
    assert torch.allclose(norm.weight, torch.full((48,), (64 / 48) ** 0.5))
    assert norm.variance_epsilon == pytest.approx(1e-6 * 64 / 48)
    x = torch.randn(3, 48)
    paper = x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / 64 + 1e-6)
    assert torch.allclose(norm(x), paper, atol=1e-6)
    # parameters: the untied head (256 x 48) and two 48 x 48 shortcuts per block come on top
    d = 48
    block = (64 + 32 + 32) * d + d * 64 + 2 * 128 * d + d * 128 + 2 * d + 2 * d * d
    assert manifest["params_before"] == dense_params
    assert parameter_count(model) == manifest["params_after"] == 2 * 256 * d + 2 * block + d
    with torch.device("meta"):
        stock = make_tiny_llama()
    restructure(stock, [manifest])
    got = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert stock.model.layers[0].post_attention_layernorm.variance_epsilon == pytest.approx(
        1e-6 * 64 / 48
    )


def test_save_and_load_give_identical_logits_and_generate(tmp_path):
    from edkm.io.loading import load_any_model
    from tests.io.test_models import _save_tiny_with_tokenizer

    folder = tmp_path / "tiny"
    _save_tiny_with_tokenizer(make_tiny_llama(), folder)
    model, tok = load_any_model(folder)
    manifest = slice_model(model, _calib(), [0.25, 0.5], show_progress=False)
    assert manifest["dims"] == [48, 48, 32, 32, 32]
    out = save_structured(model, tmp_path / "sliced", [manifest], tokenizer=tok)
    reloaded = load_structured(out)
    again, _ = load_any_model(out)  # edkm's loader routes pre-passed folders
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
        assert torch.equal(reloaded(input_ids=_ids()).logits, want)
        assert torch.equal(again(input_ids=_ids()).logits, want)
        # the KV-cache path goes through the sliced layer's forward too
        gen = again.generate(_ids()[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)


def test_non_llama_models_and_repeated_slicing_are_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(InputError, match="no edkm model adapter for GPT2LMHeadModel"):
        slice_model(gpt2, _calib(), 0.25)
    with pytest.raises(InputError, match="LLaMA-family causal LMs"):
        slice_model(make_tiny_llama().model, _calib(), 0.25)  # no LM head
    model = make_tiny_llama()
    slice_model(model, _calib(), 0.25, show_progress=False)
    with pytest.raises(InputError, match="already sliced"):
        slice_model(model, _calib(), 0.25)
    with pytest.raises(InputError, match="int64 token blocks"):
        slice_model(make_tiny_llama(), torch.zeros(4), 0.25)


def test_palettized_sliced_model_reloads(tmp_path):
    import edkm

    model = make_tiny_llama()
    slice_model(model, _calib(), 0.25, show_progress=False)
    summary = edkm.palettize_(model, edkm.DKMConfig(bits=3))
    assert summary.num_layers == 18  # 14 stock Linear layers + 4 shortcuts
    model = edkm.finalize(model)
    folder = edkm.save_palettized(model, tmp_path / "pal")
    reloaded = edkm.load_palettized(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    name = "model.layers.1.mlp_shortcut"
    assert type(reloaded.get_submodule(name)).__name__ == "PalettizedLinear"
    assert isinstance(reloaded.model.embed_tokens, nn.Embedding)


@pytest.mark.slow
def test_default_model_rotation_keeps_the_logits_fp64():
    from edkm.io.models import load_model

    model, _ = load_model("default", dtype=torch.float64)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))
    for rotation in ("pca", "random"):
        sliced = copy.deepcopy(model)
        slice_model(sliced, calib, 0.0, rotation=rotation, show_progress=False)
        with torch.no_grad():
            assert _rel(ref, sliced(input_ids=ids).logits) <= 1e-6
        del sliced


def test_from_pretrained_loads_sliced_and_sliced_palettized_folders(tmp_path):
    # transformers' own loader, through the quantizer that importing edkm registers
    from transformers import AutoModelForCausalLM

    import edkm as e

    model = make_tiny_llama()
    manifest = slice_model(model, _calib(), 0.25, show_progress=False)
    sliced = save_structured(model, tmp_path / "sliced", [manifest])
    hf = AutoModelForCausalLM.from_pretrained(sliced)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    assert isinstance(hf.model.layers[0], SlicedLlamaDecoderLayer)

    e.palettize_(model, e.DKMConfig(bits=3))
    model = e.finalize(model)
    pal = e.save_palettized(model, tmp_path / "pal")
    hf_pal = AutoModelForCausalLM.from_pretrained(pal)
    with torch.no_grad():
        assert torch.equal(hf_pal(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    assert type(hf_pal.get_submodule("model.layers.1.mlp_shortcut")).__name__ == "PalettizedLinear"
