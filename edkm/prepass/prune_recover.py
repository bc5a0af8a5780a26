"""LoRA recovery after pruning (LLM-Pruner's third stage), with peft, merged back.

A short fine-tuning of low-rank adapters on every Linear layer of the decoder blocks
(``peft.LoraConfig`` + ``get_peft_model``), on training-text blocks, then
``merge_and_unload``: the result is the same model class with plain ``nn.Linear`` layers whose
weights include the learned update, ready to be saved and palettized. Only the adapters train
(the pruned weights are frozen meanwhile), with AdamW and a linear warm-up.

Example:
    >>> model, info = lora_recover(model, train_blocks, steps=50)  # doctest: +SKIP
    >>> info["steps"], info["rank"]  # doctest: +SKIP
    (50, 8)
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from edkm.errors import InputError
from edkm.progress import progress

__all__ = ["TARGET_MODULES", "lora_recover"]

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise InputError(
            "LoRA recovery needs peft: pip install 'edkm[prune]' (or pass recovery steps 0)"
        ) from err
    return peft


def lora_recover(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 2e-4,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    batch_size: int = 2,
    warmup: int = 5,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune LoRA adapters on ``blocks`` for ``steps`` steps and merge them.

    ``blocks`` is an ``(n, seq_len)`` int64 tensor of training-text token blocks; batches of
    ``batch_size`` blocks cycle through a seeded permutation. Returns the merged model (plain
    Linear layers; the same object class as ``model``) and a summary dict for the manifest.

    Example:
        >>> merged, info = lora_recover(model, blocks, steps=0)  # doctest: +SKIP
    """
    for name, value, least in (
        ("steps", steps, 0),
        ("rank", rank, 1),
        ("batch_size", batch_size, 1),
    ):
        if not isinstance(value, int) or value < least:
            raise InputError(f"LoRA recovery {name} must be an integer >= {least}, got {value!r}")
    if blocks.dim() != 2 or blocks.dtype != torch.int64 or blocks.shape[0] < 1:
        raise InputError(
            f"LoRA recovery needs (n, seq_len) int64 token blocks, got {tuple(blocks.shape)}"
        )
    if steps == 0:
        return model, {"steps": 0}
    peft = _peft()
    t0 = time.perf_counter()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    device = next(model.parameters()).device
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, config)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup))
        )
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(blocks.shape[0], generator=generator)
        wrapped.train()
        position = 0
        with progress(
            total=steps, desc="LoRA recovery", unit="step", disable=not show_progress
        ) as bar:
            for _ in range(steps):
                idx = []
                for _ in range(batch_size):
                    if position == len(order):
                        order = torch.randperm(blocks.shape[0], generator=generator)
                        position = 0
                    idx.append(int(order[position]))
                    position += 1
                ids = blocks[idx].to(device)
                loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
        wrapped.eval()
        merged = wrapped.merge_and_unload()
    merged.eval()
    for n, p in merged.named_parameters():
        p.requires_grad_(flags.get(n, True))
    leftovers = [n for n, m in merged.named_modules() if "lora" in type(m).__name__.lower()]
    if leftovers:
        raise RuntimeError(f"peft left LoRA modules after merging: {leftovers[:3]}")
    info = {
        "method": "lora",
        "library": f"peft {peft.__version__}",
        "steps": steps,
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "lr": lr,
        "batch_size": batch_size,
        "blocks": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "target_modules": list(TARGET_MODULES),
        "loss_first": round(losses[0], 4),
        "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4),
        "time_s": round(time.perf_counter() - t0, 1),
    }
    return merged, info
