"""Perplexity on held-out text.

Protocol (the same for every model in a report, so numbers are comparable):
1. the held-out documents are joined with a blank line and tokenized once, without special
   tokens;
2. the token stream is cut into non-overlapping windows of ``seq_len`` tokens, starting at token
   0; the tail shorter than a window is dropped; ``max_windows`` keeps the first windows only;
3. each window is scored on its own (no context carried over from the previous window): the
   loss covers the ``seq_len - 1`` next-token predictions inside the window;
4. perplexity = exp(sum of token negative log-likelihoods / number of predicted tokens),
   accumulated in float64.

Example:
    >>> from edkm.eval.perplexity import perplexity
    >>> result = perplexity(model, tokenizer, text, seq_len=512, max_windows=8)  # doctest: +SKIP
    >>> result.ppl  # doctest: +SKIP
    17.3
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from edkm.errors import InputError
from edkm.io.data import token_blocks, tokenize
from edkm.progress import progress


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with the counts needed to reproduce or combine it."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity_of_blocks(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    desc: str = "perplexity",
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a model over pre-tokenized ``(n, seq_len)`` windows (protocol above).

    Example:
        >>> blocks = torch.randint(0, 256, (4, 32))
        >>> perplexity_of_blocks(tiny_model, blocks).windows  # doctest: +SKIP
        4
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] == 0:
        raise InputError(f"need (n >= 1, seq_len >= 2) token windows, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = 0.0
    count = 0
    try:
        with progress(
            total=blocks.shape[0], desc=desc, unit="win", disable=not show_progress
        ) as bar:
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start : start + batch_size].to(device)
                logits = model(input_ids=batch).logits
                nll = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    batch[:, 1:].flatten(),
                    reduction="sum",
                )
                total += float(nll.double())
                count += batch[:, 1:].numel()
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        model.train(was_training)
    mean = total / count
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, tokens=count, windows=blocks.shape[0], seq_len=blocks.shape[1]
    )


def eval_blocks(
    tokenizer: Any, text: str, *, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Tokenize held-out text and cut it into the evaluation windows of the protocol.

    Example:
        >>> eval_blocks(tok, text, seq_len=512, max_windows=8).shape  # doctest: +SKIP
        torch.Size([8, 512])
    """
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows must be at least 1, got {max_windows}")
    if not text.strip():
        raise InputError("the evaluation text is empty")
    blocks = token_blocks(tokenize(tokenizer, text), seq_len, what="the evaluation text")
    return blocks if max_windows is None else blocks[:max_windows]


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with non-overlapping windows (protocol above).

    Example:
        >>> from edkm.io.models import load_model
        >>> from edkm.io.data import load_split
        >>> model, tok = load_model("default")  # doctest: +SKIP
        >>> perplexity(model, tok, load_split().eval_text, max_windows=8).ppl  # doctest: +SKIP
    """
    blocks = eval_blocks(tokenizer, text, seq_len=seq_len, max_windows=max_windows)
    return perplexity_of_blocks(model, blocks, batch_size=batch_size, show_progress=show_progress)
