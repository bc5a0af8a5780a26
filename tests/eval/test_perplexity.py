import math

import pytest
import torch

from edkm.errors import InputError
from edkm.eval.perplexity import eval_blocks, perplexity, perplexity_of_blocks


def test_perplexity_matches_manual_cross_entropy(tiny_llama):
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (5, 16))
    res = perplexity_of_blocks(tiny_llama, blocks, batch_size=2, show_progress=False)
    with torch.no_grad():
        losses = [tiny_llama(input_ids=b[None], labels=b[None]).loss for b in blocks]
    # every window has the same number of predictions, so the mean of means is the mean
    assert res.ppl == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert (res.windows, res.tokens, res.seq_len) == (5, 75, 16)


def test_windows_are_scored_independently(tiny_llama):
    torch.manual_seed(1)
    blocks = torch.randint(0, 256, (4, 16))
    whole = perplexity_of_blocks(tiny_llama, blocks, batch_size=4, show_progress=False)
    one_by_one = perplexity_of_blocks(tiny_llama, blocks, batch_size=1, show_progress=False)
    assert whole.ppl == pytest.approx(one_by_one.ppl, rel=1e-5)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_eval_blocks_errors():
    tok = _CharTokenizer()
    assert eval_blocks(tok, "abcdefghij", seq_len=4).shape == (2, 4)
    assert eval_blocks(tok, "abcdefghij", seq_len=4, max_windows=1).shape == (1, 4)
    with pytest.raises(InputError, match="at least 2"):
        eval_blocks(tok, "abc", seq_len=0)
    with pytest.raises(InputError, match="shorter than one window"):
        eval_blocks(tok, "abc", seq_len=8)
    with pytest.raises(InputError, match="empty"):
        eval_blocks(tok, "  ", seq_len=8)


@pytest.mark.slow
def test_default_model_golden_perplexity():
    """Golden number: SmolLM2-135M (fp32, de-quantized GGUF) on the first 4 held-out windows."""
    from edkm.io.data import load_split
    from edkm.io.models import load_model

    model, tok = load_model("default", dtype=torch.float32)
    res = perplexity(model, tok, load_split("default").eval_text, seq_len=256, max_windows=4)
    assert res.tokens == 4 * 255
    assert res.ppl == pytest.approx(28.39609, rel=2e-4)
