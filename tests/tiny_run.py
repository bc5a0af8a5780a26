"""Helpers shared by the training tests: a tiny model folder, tiny text, a tiny recipe."""

from __future__ import annotations

import random
from pathlib import Path

from edkm.config import EvalConfig, Recipe, TrainConfig
from tests.conftest import make_tiny_llama
from tests.io.test_models import _save_tiny_with_tokenizer


def tiny_model_dir(path: Path) -> Path:
    _save_tiny_with_tokenizer(make_tiny_llama(), path)
    return path


def tiny_text(path: Path, docs: int = 30, words: int = 120, seed: int = 0) -> Path:
    """Documents of 't<k>' words with a learnable pattern (each word predicts the next)."""
    rng = random.Random(seed)
    parts = []
    for _ in range(docs):
        k = rng.randrange(256)
        seq = []
        for _ in range(words):
            seq.append(f"t{k}")
            k = (k * 5 + 3) % 256 if rng.random() < 0.9 else rng.randrange(256)
        parts.append(" ".join(seq))
    path.write_text("\n\n".join(parts) + "\n")
    return path


def tiny_recipe(model: Path, data: Path, **train: object) -> Recipe:
    kwargs: dict[str, object] = dict(
        steps=6,
        batch_size=2,
        seq_len=16,
        lr=1e-3,
        warmup_steps=1,
        checkpoint_every=2,
        device="cpu",
        autocast="off",
    )
    kwargs.update(train)
    return Recipe(
        model=str(model),
        data=str(data),
        train=TrainConfig(**kwargs),  # type: ignore[arg-type]
        eval=EvalConfig(seq_len=16, max_windows=3, batch_size=3),
    )
