"""LLM-Pruner pre-pass: remove coupled channel groups of a LLaMA-family model by importance.

LLM-Pruner (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models",
NeurIPS 2023) prunes in three stages, which :func:`prune_model` and :func:`run_prepass` follow:

1. **discovery**: the groups of weights that depend on each other. Here they come from the
   model adapter (:meth:`edkm.adapters.llama.LlamaAdapter.coupled_groups`): in every block, one
   group per key/value head (its ``k_proj``/``v_proj`` rows, the rows of the query heads sharing
   it in ``q_proj``, the matching ``o_proj`` columns) and one per MLP channel (a ``gate_proj``
   and ``up_proj`` row and a ``down_proj`` column). The residual width is never touched.
2. **estimation**: each group's importance from calibration text
   (:mod:`edkm.prepass.prune_importance`: first- and second-order Taylor, their mix, element-
   or vector-wise, aggregated over the group's layers; l2 and random baselines).
3. **recovery**: LoRA fine-tuning with peft, merged back into plain Linear layers
   (:mod:`edkm.prepass.prune_recover`), so palettization sees ordinary ``nn.Linear`` modules.

What a ratio means: in each block of the layer range (``"4:-2"``, a Python slice of block
indices; LLM-Pruner's block-wise setting leaves the first and last blocks dense), ``round(ratio
* count)`` groups of each kind are removed, the least important first, at least one group of
each kind is always kept. On SmolLM2-135M (9 query / 3 key-value heads, MLP width 1536)
ratio 0.2 removes 307 MLP channels and one key-value head with its 3 query heads, i.e. 1/3 of
the attention, in each selected block (GQA granularity: a block's attention can only lose whole
thirds).

The result is described by a manifest (kind ``"prune"``, :mod:`edkm.prepass`) listing every
block's widths; :func:`restructure` gives a freshly built stock model those widths, so
``edkm.prepass.save_structured`` / ``load_structured`` and ``from_pretrained`` (edkm's
registered integration) round-trip a pruned model from safetensors.

Example:
    >>> parse_layers("4:-2", 30)
    range(4, 28)
    >>> removed_count(0.2, 1536), removed_count(0.2, 3)
    (307, 1)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from edkm.adapters import get_adapter
from edkm.adapters.groups import GroupSet
from edkm.adapters.llama import LlamaAdapter
from edkm.errors import InputError
from edkm.prepass import record_manifest
from edkm.prepass.prune_importance import (
    AGGREGATES,
    IMPORTANCES,
    LEVELS,
    NEEDS_GRAD,
    accumulate_gradients,
    group_scores,
)

__all__ = [
    "MANIFEST_KIND",
    "MANIFEST_VERSION",
    "RECOVERY_STEPS",
    "check_manifest",
    "check_ratio",
    "parameter_count",
    "parse_layers",
    "prune_groups",
    "prune_model",
    "removed_count",
    "restructure",
    "run_prepass",
    "widths_of",
]

MANIFEST_KIND = "prune"
MANIFEST_VERSION = 1
DEFAULT_LAYERS = "all"
RECOVERY_STEPS = 50  # LoRA steps of the compress pre-pass (edkm compress --prepass prune:R)
SCOPES = ("both", "attention", "mlp")


def check_ratio(value: object, what: str = "ratio") -> float:
    """``value`` as a float in [0, 1), else an ``InputError`` naming ``what``.

    Example:
        >>> check_ratio(1.0)
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: ratio must be a number in [0, 1) (the share of each selected block's groups to remove), got 1.0
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or math.isnan(float(value)) or not 0 <= float(value) < 1:  # type: ignore[arg-type]
        raise InputError(
            f"{what} must be a number in [0, 1) (the share of each selected block's groups to "
            f"remove), got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def parse_layers(spec: object, num_blocks: int) -> range:
    """The block indices of a layer range: ``"all"``, ``"A:B"`` (a Python slice, negative
    indices from the end, either side may be empty) or one index ``"A"``.

    Example:
        >>> parse_layers("all", 4), parse_layers(":-1", 4), parse_layers("2", 4)
        (range(0, 4), range(0, 3), range(2, 3))
        >>> parse_layers("3:1", 4)
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: layer range '3:1' selects no block of the 4 blocks (write START:STOP, e.g. 4:-2)
    """
    text = str(spec).strip()
    if text == "all":
        return range(num_blocks)
    parts = text.split(":")
    try:
        if len(parts) == 1:
            index = int(parts[0])
            if not -num_blocks <= index < num_blocks:
                raise InputError(
                    f"layer {index} is out of range: the model has {num_blocks} blocks "
                    f"(0..{num_blocks - 1})"
                )
            index %= num_blocks
            return range(index, index + 1)
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise InputError(
            f"layer range {text!r} must be 'all', START:STOP or one index (e.g. 4:-2)"
        ) from None
    for bound in (start, stop):
        if bound is not None and not -num_blocks <= bound <= num_blocks:
            raise InputError(
                f"layer range {text!r} is out of range: the model has {num_blocks} blocks"
            )
    selected = range(num_blocks)[slice(start, stop)]
    if len(selected) == 0:
        raise InputError(
            f"layer range {text!r} selects no block of the {num_blocks} blocks (write "
            "START:STOP, e.g. 4:-2)"
        )
    return selected


def removed_count(ratio: float, count: int) -> int:
    """Groups removed out of ``count`` at ``ratio`` (rounded to nearest, half up).

    Example:
        >>> removed_count(0.5, 3), removed_count(0.1, 3)
        (2, 0)
    """
    return math.floor(ratio * count + 0.5)


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model`` (a tied tensor once).

    Example:
        >>> parameter_count(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def _check_model(model: Any) -> LlamaAdapter:
    adapter = get_adapter(model)
    if not isinstance(adapter, LlamaAdapter) or adapter.lm_head() is None:
        raise InputError(
            f"LLM-Pruner here prunes LLaMA-family causal LMs (LlamaForCausalLM), got "
            f"{type(model).__name__}"
        )
    for name, module in model.named_modules():
        if type(module).__name__ in ("DKMLinear", "PalettizedLinear"):
            raise InputError(f"layer '{name}' is palettized; prune before palettizing")
    return adapter


def widths_of(model: Any) -> list[dict[str, int]]:
    """Every block's widths as the manifest lists them: query heads, key/value heads, MLP.

    Example:
        >>> widths_of(model)[0]  # doctest: +SKIP
        {'heads': 9, 'kv_heads': 3, 'intermediate': 1536}
    """
    adapter = get_adapter(model)
    out = []
    for i, (_, block) in enumerate(adapter.blocks()):
        layout = adapter.head_layout(i)
        gate = block.get_submodule("mlp.gate_proj")
        out.append(
            {
                "heads": layout.num_heads,
                "kv_heads": layout.num_kv_heads,
                "intermediate": int(getattr(gate, "out_features")),  # noqa: B009
            }
        )
    return out


def _new_linear(old: Any, in_features: int, out_features: int) -> nn.Linear:
    w = old.weight
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=w.device, dtype=w.dtype
    )


def _slice_linear(old: Any, axis: int, keep: torch.Tensor) -> nn.Linear:
    """A Linear keeping the channels ``keep`` along ``axis`` of ``old`` (same values)."""
    w = old.weight.detach()
    keep = keep.to(w.device)
    weight = w.index_select(axis, keep)
    new = _new_linear(old, int(weight.shape[1]), int(weight.shape[0]))
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            bias = old.bias.detach()
            new.bias.copy_(bias.index_select(0, keep) if axis == 0 else bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def prune_groups(block: nn.Module, groups: GroupSet, remove: Sequence[int]) -> None:
    """Remove the groups ``remove`` of ``groups`` from ``block`` in place (every member layer).

    Example:
        >>> prune_groups(model.model.layers[0], get_adapter(model).coupled_groups(0)[1], [3])  # doctest: +SKIP
    """
    gone = sorted({int(g) for g in remove})
    if any(not 0 <= g < groups.count for g in gone):
        raise InputError(f"group index out of range 0..{groups.count - 1}: {gone}")
    if len(gone) >= groups.count:
        raise InputError(f"cannot remove all {groups.count} {groups.kind} groups of a block")
    for slot in groups.members:
        old = block.get_submodule(slot.path)
        dropped = set(groups.channels(slot, gone))
        keep = torch.tensor([c for c in range(groups.size(slot)) if c not in dropped])
        block.set_submodule(slot.path, _slice_linear(old, slot.axis, keep))


def prune_model(
    model: Any,
    calib: torch.Tensor | None,
    ratio: float,
    *,
    importance: str = "taylor1",
    level: str = "element",
    aggregate: str = "sum",
    layers: str = DEFAULT_LAYERS,
    scope: str = "both",
    seed: int = 0,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prune ``model`` in place (module doc); returns the manifest (without recovery).

    ``calib`` is an ``(n, seq_len)`` int64 tensor of calibration blocks from the training text
    (only the Taylor importances read it; ``None`` is fine for ``l2`` and ``random``).
    ``stats`` (optional): gradient statistics already computed on ``calib`` for the same
    weights by :func:`~edkm.prepass.prune_importance.accumulate_gradients` (several importance
    variants then share one gradient pass); they must cover every weight pruned.

    Example:
        >>> manifest = prune_model(model, calib, 0.2, importance="taylor1", layers="4:-2")  # doctest: +SKIP
        >>> manifest["widths"][4]  # doctest: +SKIP
        {'heads': 6, 'kv_heads': 2, 'intermediate': 1229}
    """
    adapter = _check_model(model)
    ratio = check_ratio(ratio)
    for value, allowed, what in (
        (importance, IMPORTANCES, "importance"),
        (level, LEVELS, "level"),
        (aggregate, AGGREGATES, "aggregate"),
        (scope, SCOPES, "scope"),
    ):
        if value not in allowed:
            raise InputError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    blocks = adapter.blocks()
    selected = parse_layers(layers, len(blocks))
    kinds = ("attention", "mlp") if scope == "both" else (scope,)
    plan: list[tuple[int, GroupSet, int]] = []
    for b in selected:
        for groups in adapter.coupled_groups(b):
            if groups.kind not in kinds:
                continue
            n = removed_count(ratio, groups.count)
            if n >= groups.count:
                raise InputError(
                    f"ratio {ratio:g} would remove all {groups.count} {groups.kind} groups of "
                    f"block {b}; use a smaller ratio"
                )
            if n:
                plan.append((b, groups, n))
    needs_grad = importance in NEEDS_GRAD
    if needs_grad and (
        calib is None or calib.dim() != 2 or calib.dtype != torch.int64 or calib.shape[0] < 1
    ):
        shape = None if calib is None else tuple(calib.shape)
        raise InputError(
            f"importance {importance!r} needs calibration as (n, seq_len) int64 token blocks, "
            f"got {shape}"
        )
    t0 = time.perf_counter()
    params_before = parameter_count(model)
    given, stats = stats, None
    if needs_grad and plan:
        names = sorted(
            {
                f"{blocks[b][0]}.{slot.path}.weight"
                for b, groups, _ in plan
                for slot in groups.members
            }
        )
        assert calib is not None
        if given is not None:
            missing = [n for n in names if n not in given]
            if missing:
                raise InputError(f"the gradient statistics given lack {missing[0]!r}")
            stats = given
        else:
            stats = accumulate_gradients(model, calib, names, show_progress=show_progress)
    generator = torch.Generator().manual_seed(seed)
    removed: dict[str, dict[str, list[int]]] = {}
    with torch.no_grad():
        for b, groups, n in plan:
            prefix, block = blocks[b]
            scores = group_scores(
                block,
                groups,
                stats,
                prefix,
                importance=importance,
                level=level,
                how=aggregate,
                generator=generator,
            )
            order = torch.argsort(scores, stable=True)
            gone = sorted(int(i) for i in order[:n])
            prune_groups(block, groups, gone)
            removed.setdefault(str(b), {})[groups.kind] = gone
    del stats, given
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "head_dim": adapter.head_layout(0).head_dim,
        "widths": widths_of(model),
        "ratio": ratio,
        "layers": str(layers),
        "selected_blocks": [selected.start, selected.stop],
        "scope": scope,
        "importance": importance,
        "level": level,
        "aggregate": aggregate,
        "removed": removed,
        "calibration": None
        if calib is None or not needs_grad
        else {"blocks": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "seed": seed,
        "params_before": params_before,
        "params_after": parameter_count(model),
        "time_s": round(time.perf_counter() - t0, 1),
        "recovery": None,
    }
    record_manifest(model, manifest)
    return manifest


def check_manifest(manifest: dict[str, Any], num_blocks: int) -> list[dict[str, int]]:
    """The per-block widths of a ``prune`` manifest, checked against a model's block count.

    Example:
        >>> check_manifest({"kind": "prune", "version": 1, "widths": []}, 2)
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: prune manifest lists 0 blocks; the model has 2
    """
    if manifest.get("version") != MANIFEST_VERSION:
        raise InputError(
            f"prune manifest version {manifest.get('version')!r} is not supported (this edkm "
            f"reads {MANIFEST_VERSION})"
        )
    widths = manifest.get("widths")
    if not isinstance(widths, list) or len(widths) != num_blocks:
        n = len(widths) if isinstance(widths, list) else None
        raise InputError(f"prune manifest lists {n} blocks; the model has {num_blocks}")
    for i, w in enumerate(widths):
        ok = isinstance(w, dict) and all(
            isinstance(w.get(k), int) and not isinstance(w.get(k), bool) and w[k] >= 1
            for k in ("heads", "kv_heads", "intermediate")
        )
        if not ok or w["heads"] % w["kv_heads"]:
            raise InputError(f"prune manifest: block {i} has invalid widths {w!r}")
    return widths


def restructure(model: Any, manifest: dict[str, Any]) -> None:
    """Give a freshly built stock LLaMA causal LM (real or meta) the widths of ``manifest``.

    Afterwards ``model.state_dict()`` has the keys and shapes of the pruned model; the values
    of the resized Linear layers are uninitialised, to be loaded. Works after a SliceGPT
    manifest too (the input and output widths are read from the current modules).

    Example:
        >>> restructure(model, {"kind": "prune", "version": 1, "widths": [...]})  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    if not isinstance(adapter, LlamaAdapter):
        raise InputError(f"prune manifests apply to LLaMA models, not {type(model).__name__}")
    blocks = adapter.blocks()
    widths = check_manifest(manifest, len(blocks))
    for i, ((_, block), w) in enumerate(zip(blocks, widths)):
        layout = adapter.head_layout(i)
        if w["heads"] // w["kv_heads"] != layout.kv_groups:
            raise InputError(
                f"prune manifest: block {i} has {w['heads']} query heads for {w['kv_heads']} "
                f"key/value heads; the model shares each key/value head among {layout.kv_groups}"
            )
        hd = layout.head_dim
        for path, out in (
            ("self_attn.q_proj", w["heads"] * hd),
            ("self_attn.k_proj", w["kv_heads"] * hd),
            ("self_attn.v_proj", w["kv_heads"] * hd),
            ("mlp.gate_proj", w["intermediate"]),
            ("mlp.up_proj", w["intermediate"]),
        ):
            old: Any = block.get_submodule(path)
            block.set_submodule(path, _new_linear(old, old.in_features, out))
        for path, inp in (
            ("self_attn.o_proj", w["heads"] * hd),
            ("mlp.down_proj", w["intermediate"]),
        ):
            old = block.get_submodule(path)
            block.set_submodule(path, _new_linear(old, inp, old.out_features))


def run_prepass(
    model: nn.Module,
    tokenizer: Any,
    calib: torch.Tensor,
    amount: float,
    *,
    seed: int = 0,
    recovery_steps: int = RECOVERY_STEPS,
    on_pruned: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    show_progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The ``prune`` pre-pass of :func:`edkm.prepass.run_prepass`: ``amount`` is the ratio.

    Taylor (first order, element-wise, summed over each group's layers) on ``calib``, every
    block, then ``recovery_steps`` LoRA steps on ``calib`` merged back into plain Linear
    layers (``0``: no recovery). ``on_pruned(model, manifest)`` is called between pruning and
    recovery (``edkm compress`` measures the pruned model there).

    Example:
        >>> model, manifest = run_prepass(model, tok, calib, 0.2)  # doctest: +SKIP
    """
    from edkm.prepass.prune_recover import lora_recover

    del tokenizer  # the calibration blocks are already tokenized
    manifest = prune_model(
        model, calib, check_ratio(amount), seed=seed, show_progress=show_progress
    )
    if on_pruned is not None:
        on_pruned(model, manifest)
    if recovery_steps:
        model, info = lora_recover(
            model, calib, steps=recovery_steps, seed=seed, show_progress=show_progress
        )
        manifest["recovery"] = info
    return model, manifest
