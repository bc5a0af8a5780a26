import pytest

from edkm.errors import InputError
from edkm.io.models import load_model, resolve_model_path


def test_missing_and_non_model_folders(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(InputError, match=r"no config\.json"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weights"):
        resolve_model_path(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        resolve_model_path(f)


def _save_tiny_with_tokenizer(model, path):
    """Save a tiny model with a word-level tokenizer ('t0'..'t255', split on spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)


def test_local_folder_round_trip(tmp_path, tiny_llama):
    import torch

    _save_tiny_with_tokenizer(tiny_llama, tmp_path)
    model, tokenizer = load_model(tmp_path)
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(ids).logits, tiny_llama(ids).logits)
    assert tokenizer("t5 t7")["input_ids"] == [5, 7]


@pytest.mark.slow
def test_default_model_is_smollm2():
    model, _tokenizer = load_model("default")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # GGUF Q4_1 blocks: each weight keeps many distinct values after de-quantization
    assert model.model.layers[0].self_attn.q_proj.weight.unique().numel() > 10_000
