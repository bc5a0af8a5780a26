"""SliceGPT pre-pass: rotate the residual stream of a LLaMA-family model by PCA and slice it.

SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns", ICLR 2024) uses the computational invariance of pre-norm transformers: with each
RMSNorm's weight fused into the Linear layers it feeds, rotating the residual stream by any
orthogonal Q (embeddings, block inputs and outputs, LM head) leaves the model's function
unchanged. Choosing Q at each norm as the principal axes of the signal there, the last
columns carry little energy, and deleting them shrinks every matrix that reads or writes the
residual stream. What :func:`slice_model` does, in order (weight math in float64):

1. unties the LM head from the embeddings (they get different rotations);
2. fuses every RMSNorm weight into the Linear layers after it (no mean subtraction: that step
   is for LayerNorm models and would break exact invariance for RMSNorm);
3. runs the calibration blocks block by block through the model *as sliced so far*; at each
   residual position (before a block's attention, before its MLP, before the final norm)
   accumulates ``X^T X`` of the normalised signal (:mod:`edkm.prepass.slicegpt_pca`), takes its
   eigenvectors Q (descending), rotates and slices the layers that write the stream there and
   those that read it after, and inserts the residual shortcut ``Q_p^T Q_{p+1}`` (sliced) as a
   small Linear layer (:mod:`edkm.prepass.slicegpt_layers`);
4. keeps the stock norm modules, with weight ``sqrt(D/d)`` and ``eps * D/d`` so that the sliced
   norm computes the paper's ``x / sqrt(sum(x^2)/D + eps)``.

Grouped-query attention needs nothing special: heads are never touched, only the residual
width. The kept width per position comes from :func:`kept_dims` (one sparsity for every
position, or one per layer), rounded down to a multiple of ``round_to`` (8 by default).
``rotation="none"`` keeps the first d channels of the unrotated stream (the "drop without
rotation" baseline); ``"random"`` uses random orthogonal Q (the invariance test).

The result is described by a manifest (kind ``"slicegpt"``, :mod:`edkm.prepass`) that
:func:`restructure` applies to a freshly built stock model; ``edkm.prepass.save_structured``
writes the model, ``load_structured`` reads it back.

Example:
    >>> from edkm.io.models import load_model
    >>> model, tok = load_model("default")  # doctest: +SKIP
    >>> manifest = slice_model(model, calib_blocks, 0.25)  # doctest: +SKIP
    >>> manifest["dims"][:2]  # doctest: +SKIP
    [432, 432]
    >>> kept_dims(576, 2, 0.25)
    [432, 432, 432, 432, 432]
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from edkm.adapters import get_adapter
from edkm.adapters.llama import SHORTCUT_ROLES, LlamaAdapter
from edkm.errors import InputError
from edkm.prepass import record_manifest
from edkm.prepass.slicegpt_layers import (
    MANIFEST_KIND,
    MANIFEST_VERSION,
    SlicedLlamaDecoderLayer,
    found_module,
    linear_from,
    make_sliced,
    new_embedding,
    restructure,
    set_norm,
    sliced_norm_weight,
    untie_head,
)
from edkm.prepass.slicegpt_pca import PCAAccumulator, random_orthogonal, rms_normalize
from edkm.progress import progress

__all__ = [
    "check_sparsity",
    "kept_dims",
    "parameter_count",
    "restructure",
    "run_prepass",
    "slice_model",
]

Rotation = Literal["pca", "random", "none"]
DEFAULT_ROUND_TO = 8
CALIB_BATCH = 8  # calibration blocks per forward


def check_sparsity(value: object, what: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), else an ``InputError`` naming ``what``.

    Example:
        >>> check_sparsity(1.5)
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: sparsity must be a number in [0, 1) (the share of the hidden size to delete), got 1.5
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 <= float(value) < 1 or math.isnan(float(value)):  # type: ignore[arg-type]
        raise InputError(
            f"{what} must be a number in [0, 1) (the share of the hidden size to delete), "
            f"got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def _kept(hidden: int, sparsity: float, round_to: int) -> int:
    if sparsity == 0:
        return hidden  # rotation only: never sliced by rounding alone
    kept = math.floor((1 - sparsity) * hidden + 1e-9)
    kept -= kept % round_to
    if kept < 1:
        raise InputError(
            f"sparsity {sparsity:g} keeps no dimension of the hidden size {hidden} once rounded "
            f"down to a multiple of {round_to}"
        )
    return kept


def kept_dims(
    hidden: int,
    num_layers: int,
    sparsity: float | Sequence[float],
    *,
    round_to: int = DEFAULT_ROUND_TO,
) -> list[int]:
    """Residual widths at the ``2 * num_layers + 1`` positions (schedule of the module doc).

    ``sparsity`` is one value for every position (the constant schedule) or one per layer
    (position ``2l`` and ``2l + 1`` take layer l's; the final norm and LM head take the last
    layer's). Each width is ``floor((1 - s) * hidden)`` rounded down to a multiple of
    ``round_to``; ``s = 0`` keeps the full width.

    Example:
        >>> kept_dims(64, 2, [0.25, 0.5], round_to=8)
        [48, 48, 32, 32, 32]
    """
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise InputError(f"round_to must be a positive integer, got {round_to!r}")
    if not isinstance(sparsity, Sequence):
        per_layer = [check_sparsity(sparsity)] * num_layers
    else:
        per_layer = [check_sparsity(s, f"sparsity of layer {i}") for i, s in enumerate(sparsity)]
        if len(per_layer) != num_layers:
            raise InputError(
                f"the per-layer schedule lists {len(per_layer)} sparsities; the model has "
                f"{num_layers} layers"
            )
    dims = [_kept(hidden, s, round_to) for s in per_layer for _ in range(2)]
    return [*dims, dims[-1]]


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, a tensor shared by several modules (tied weights) counted once.

    Example:
        >>> parameter_count(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())  # parameters() already deduplicates


def _check_model(model: nn.Module) -> LlamaAdapter:
    adapter = get_adapter(model)  # a non-LLaMA model: InputError listing supported classes
    if not isinstance(adapter, LlamaAdapter) or adapter.lm_head() is None:
        raise InputError(
            f"SliceGPT slices LLaMA-family causal LMs (LlamaForCausalLM), got "
            f"{type(model).__name__}"
        )
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ("DKMLinear", "PalettizedLinear"):
            raise InputError(f"layer '{name}' is palettized; slice before palettizing")
        if isinstance(module, SlicedLlamaDecoderLayer):
            raise InputError(f"'{name}' is already sliced; slice the original model")
    for i in range(len(adapter.blocks())):
        for _role, (name, norm) in adapter.block_norms(i).items():
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                raise InputError(
                    f"norm '{name}' is a {type(norm).__name__}; SliceGPT here needs RMSNorm "
                    f"(LLaMA-family) models"
                )
    return adapter


class _Stop(Exception):
    pass


def _capture_inputs(
    model: nn.Module, calib: torch.Tensor, mask: torch.Tensor | None, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Per calibration batch: the first block's input and the keywords the model passes it."""
    first = get_adapter(model).blocks()[0][1]
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib.shape[0], CALIB_BATCH):
            ids = calib[start : start + CALIB_BATCH].to(device)
            extra = (
                {}
                if mask is None
                else {"attention_mask": mask[start : start + CALIB_BATCH].to(device)}
            )
            with contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False, **extra)
    finally:
        handle.remove()
    return inputs, kwargs_list


def _rotation(
    kind: Rotation,
    signals: list[torch.Tensor] | None,
    masks: list[torch.Tensor | None],
    eps: float,
    dim: int,
    generator: torch.Generator,
) -> torch.Tensor:
    if kind == "none":
        return torch.eye(dim, dtype=torch.float64)
    if kind == "random":
        return random_orthogonal(dim, generator)
    acc = PCAAccumulator(dim)
    for x, m in zip(signals or [], masks):
        acc.add(rms_normalize(x, eps), m)
    return acc.finish()[1]


def slice_model(
    model: Any,
    calib: torch.Tensor,
    sparsity: float | Sequence[float],
    *,
    round_to: int = DEFAULT_ROUND_TO,
    rotation: Rotation = "pca",
    mask: torch.Tensor | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Rotate and slice ``model`` in place (module doc); returns the manifest.

    ``calib`` is an ``(n, seq_len)`` int64 tensor of calibration token blocks (training text,
    never held-out text); ``mask`` (same shape, optional) marks real tokens, padding is left out
    of the PCA. ``sparsity``: see :func:`kept_dims`.

    Example:
        >>> manifest = slice_model(model, calib, 0.25)  # doctest: +SKIP
    """
    adapter = _check_model(model)
    if rotation not in ("pca", "random", "none"):
        raise InputError(f"rotation must be 'pca', 'random' or 'none', got {rotation!r}")
    if calib.dim() != 2 or calib.shape[0] < 1 or calib.dtype != torch.int64:
        raise InputError(
            f"calibration must be (n, seq_len) int64 token blocks, got {tuple(calib.shape)}"
        )
    blocks = adapter.blocks()
    emb_name, emb = found_module(adapter.embedding())
    hidden = int(emb.weight.shape[1])
    dims = kept_dims(hidden, len(blocks), sparsity, round_to=round_to)
    t0 = time.perf_counter()
    params_before = parameter_count(model)
    device, dtype = emb.weight.device, emb.weight.dtype
    generator = torch.Generator().manual_seed(seed)
    branches = adapter.residual_branches()
    final_norm: Any = found_module(adapter.final_norm())[1]
    head_name, head = found_module(adapter.lm_head())
    eps = [
        float(getattr(blk.get_submodule(b.norm), "variance_epsilon"))  # noqa: B009
        for _, blk in blocks
        for b in branches
    ] + [float(final_norm.variance_epsilon)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        need = rotation == "pca"  # only PCA looks at the calibration signal
        inputs, layer_kwargs = _capture_inputs(model, calib, mask, device) if need else ([], [])
        masks = [
            None if mask is None else mask[s : s + CALIB_BATCH]
            for s in range(0, calib.shape[0], CALIB_BATCH)
        ]
        untie_head(model)
        # each norm's weight is fused into the input channels of the layers it feeds, in the
        # same float64 product as their rotation (one rounding to the model's dtype)
        norm_w = [
            blk.get_submodule(b.norm).weight.to(torch.float64)
            for _, blk in blocks
            for b in branches
        ] + [final_norm.weight.to(torch.float64)]
        q = _rotation(rotation, inputs if need else None, masks, eps[0], hidden, generator).to(
            device
        )
        qs = q[:, : dims[0]]
        model.set_submodule(emb_name, new_embedding(emb, emb.weight.to(torch.float64) @ qs))
        # the calibration signal, in the rotated and sliced basis (only PCA needs it)
        xs = [(x.to(torch.float64) @ qs).to(dtype) for x in inputs] if need else []
        del inputs
        bar = progress(
            total=len(blocks), desc=f"slicing ({rotation})", unit="block", disable=not show_progress
        )
        with bar:
            for index, (_, block) in enumerate(blocks):
                layer: Any = make_sliced(block)
                for j, branch in enumerate(branches):
                    p = 2 * index + j
                    d_in, d_out = dims[p], dims[p + 1]
                    for path in branch.readers:
                        old = layer.get_submodule(path)
                        w = (old.weight.to(torch.float64) * norm_w[p]) @ qs
                        layer.set_submodule(path, linear_from(w, old.bias, old.weight))
                    norm = layer.get_submodule(branch.norm)
                    set_norm(
                        norm, sliced_norm_weight(hidden, d_in, norm.weight), eps[p] * hidden / d_in
                    )
                    # the branch's output, still in the unrotated basis (its writer is not
                    # rotated yet), plus the residual brought back to that basis
                    signals = []
                    for x, kw in zip(xs if need else [], layer_kwargs):
                        out = layer.attention_branch(x, **kw) if j == 0 else layer.mlp_branch(x)
                        signals.append(x.to(torch.float64) @ qs.T + out.to(torch.float64))
                    q_next = _rotation(
                        rotation, signals if need else None, masks, eps[p + 1], hidden, generator
                    ).to(device)
                    qn = q_next[:, :d_out]
                    writer = layer.get_submodule(branch.writer)
                    w = qn.T @ writer.weight.to(torch.float64)
                    b = None if writer.bias is None else writer.bias.to(torch.float64) @ qn
                    layer.set_submodule(branch.writer, linear_from(w, b, writer.weight))
                    shortcut = qn.T @ qs  # (d_out, d_in): x_next = x @ (qs^T qn)
                    setattr(layer, SHORTCUT_ROLES[j], linear_from(shortcut, None, writer.weight))
                    xs = [(s @ qn).to(dtype) for s in signals]
                    q, qs = q_next, qn
                bar.update(1)
        set_norm(
            final_norm,
            sliced_norm_weight(hidden, dims[-1], final_norm.weight),
            eps[-1] * hidden / dims[-1],
        )
        model.set_submodule(
            head_name,
            linear_from((head.weight.to(torch.float64) * norm_w[-1]) @ qs, head.bias, head.weight),
        )
    model.train(was_training)
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "hidden_size": hidden,
        "dims": dims,
        "norm_eps": [e * hidden / d for e, d in zip(eps, dims)],
        "sparsity": sparsity if isinstance(sparsity, (int, float)) else list(sparsity),
        "round_to": round_to,
        "rotation": rotation,
        "calibration": {
            "blocks": int(calib.shape[0]),
            "seq_len": int(calib.shape[1]),
            "tokens": int(calib.numel() if mask is None else int(mask.sum())),
        },
        "seed": seed,
        "params_before": params_before,
        "params_after": parameter_count(model),
        "time_s": round(time.perf_counter() - t0, 1),
    }
    record_manifest(model, manifest)
    return manifest


def run_prepass(
    model: nn.Module, tokenizer: Any, calib: torch.Tensor, amount: float, *, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """The ``slice`` pre-pass of :func:`edkm.prepass.run_prepass`: ``amount`` is the sparsity.

    Example:
        >>> model, manifest = run_prepass(model, tok, calib, 0.25)  # doctest: +SKIP
    """
    del tokenizer  # the calibration blocks are already tokenized
    manifest = slice_model(model, calib, check_sparsity(amount), seed=seed)
    return model, manifest
