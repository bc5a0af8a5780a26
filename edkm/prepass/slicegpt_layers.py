"""The modules of a sliced LLaMA-family model, and ``restructure`` (manifest kind ``slicegpt``).

After slicing, the residual stream between two norms lives in its own rotated basis of its own
width ``dims[p]`` (position ``p = 2 * block`` feeds a block's attention, ``2 * block + 1`` its
MLP, ``2 * num_layers`` the final norm and LM head). A residual branch therefore adds its output
to ``shortcut(x)`` instead of ``x``, where ``shortcut`` is the small Linear layer holding
``Q_p[:, :d_p]^T Q_{p+1}[:, :d_{p+1}]``. :class:`SlicedLlamaDecoderLayer` is the stock
``LlamaDecoderLayer`` with that one change; its shortcuts are ordinary ``nn.Linear`` children
(``attn_shortcut``, ``mlp_shortcut``) that the LLaMA adapter lists, so palettization wraps them
like any decoder Linear and a plain ``state_dict`` round trip restores everything.

The norms stay stock modules: a sliced norm of width ``d`` gets the constant weight
``sqrt(D / d)`` and ``eps * D / d``, so that it computes ``x / sqrt(sum(x^2) / D + eps)``, the
paper's norm (the full-width RMSNorm with the dropped channels taken as zero).

Example:
    >>> from tests.conftest import make_tiny_llama  # doctest: +SKIP
    >>> model = make_tiny_llama()  # doctest: +SKIP
    >>> restructure(model, manifest)  # doctest: +SKIP
    >>> type(model.model.layers[0]).__name__  # doctest: +SKIP
    'SlicedLlamaDecoderLayer'
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

from edkm.adapters import get_adapter
from edkm.adapters.llama import SHORTCUT_ROLES, LlamaAdapter
from edkm.errors import InputError

__all__ = [
    "MANIFEST_KIND",
    "MANIFEST_VERSION",
    "SlicedLlamaDecoderLayer",
    "check_manifest",
    "restructure",
]

MANIFEST_KIND = "slicegpt"
MANIFEST_VERSION = 1

# LlamaDecoderLayer.forward's positional parameters after hidden_states (for callers that pass
# them positionally), and the name the attention module uses for the KV cache: transformers
# renamed ``past_key_values`` to ``cache`` in 5.2x and the attention has no alias for it.
_LAYER_PARAMS = [
    n
    for n, p in inspect.signature(LlamaDecoderLayer.forward).parameters.items()
    if n not in ("self", "hidden_states") and p.kind is p.POSITIONAL_OR_KEYWORD
]
_ATTN_PARAMS = set(inspect.signature(LlamaAttention.forward).parameters)


def _attention_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(zip(_LAYER_PARAMS, args))
    out.update(kwargs)
    for old, new in (("past_key_values", "cache"), ("cache", "past_key_values")):
        if old in out and old not in _ATTN_PARAMS and new in _ATTN_PARAMS:
            out[new] = out.pop(old)
    return out


class SlicedLlamaDecoderLayer(LlamaDecoderLayer):
    """A ``LlamaDecoderLayer`` whose residual adds go through the shortcut Linear layers.

    Built from a stock layer by :func:`make_sliced` (its modules are kept, the class changes
    and ``attn_shortcut`` / ``mlp_shortcut`` are added), never constructed directly.
    """

    attn_shortcut: nn.Module
    mlp_shortcut: nn.Module

    def attention_branch(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The attention branch's output (what is added to the shortcut of the residual)."""
        normed = self.input_layernorm(hidden_states)
        out, _ = self.self_attn(hidden_states=normed, **_attention_kwargs(args, kwargs))
        return out

    def mlp_branch(self, hidden_states: torch.Tensor) -> Any:
        """The MLP branch's output."""
        return self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        hidden_states = self.attn_shortcut(hidden_states) + self.attention_branch(
            hidden_states, *args, **kwargs
        )
        return self.mlp_shortcut(hidden_states) + self.mlp_branch(hidden_states)


def make_sliced(layer: nn.Module) -> SlicedLlamaDecoderLayer:
    """Turn a stock ``LlamaDecoderLayer`` into a :class:`SlicedLlamaDecoderLayer` in place."""
    if isinstance(layer, SlicedLlamaDecoderLayer):
        return layer
    if type(layer) is not LlamaDecoderLayer:
        raise InputError(f"SliceGPT supports LlamaDecoderLayer blocks, got {type(layer).__name__}")
    layer.__class__ = SlicedLlamaDecoderLayer
    return layer  # type: ignore[return-value]


def new_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` on ``like``'s device and dtype, left uninitialised (filled by a load)."""
    return nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=bias, device=like.device, dtype=like.dtype
    )


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (and ``bias``), cast to ``like``'s device and dtype."""
    layer = new_linear(weight.shape[1], weight.shape[0], bias is not None, like)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def new_embedding(old: Any, weight: torch.Tensor) -> nn.Embedding:
    """An ``nn.Embedding`` like ``old`` (vocabulary, padding index, device, dtype) whose width
    is ``weight``'s; it holds ``weight`` when that has a row per token, else is uninitialised."""
    like = old.weight
    emb = nn.utils.skip_init(
        nn.Embedding,
        old.num_embeddings,
        weight.shape[1],
        padding_idx=old.padding_idx,
        device=like.device,
        dtype=like.dtype,
    )
    if weight.shape[0] == old.num_embeddings:
        with torch.no_grad():
            emb.weight.copy_(weight)
    return emb


def set_norm(norm: Any, weight: torch.Tensor, eps: float) -> None:
    """Give a stock RMSNorm a new weight (and width) and ``variance_epsilon``."""
    old = norm.weight
    norm.weight = nn.Parameter(weight.to(device=old.device, dtype=old.dtype), old.requires_grad)
    norm.variance_epsilon = eps


def sliced_norm_weight(hidden: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The constant weight ``sqrt(hidden / dim)`` of a norm sliced from ``hidden`` to ``dim``."""
    return torch.full((dim,), math.sqrt(hidden / dim), dtype=torch.float64, device=like.device)


def check_manifest(manifest: dict[str, Any], num_layers: int, hidden: int) -> list[int]:
    """The manifest's residual widths, after checking it fits a model of this shape."""
    if manifest.get("kind") != MANIFEST_KIND or manifest.get("version") != MANIFEST_VERSION:
        raise InputError(
            f"not a slicegpt manifest of version {MANIFEST_VERSION}: kind "
            f"{manifest.get('kind')!r}, version {manifest.get('version')!r}"
        )
    dims, eps = manifest.get("dims"), manifest.get("norm_eps")
    n = 2 * num_layers + 1
    if not isinstance(dims, list) or len(dims) != n or not isinstance(eps, list) or len(eps) != n:
        raise InputError(
            f"slicegpt manifest: dims and norm_eps must list {n} entries for {num_layers} layers"
        )
    if manifest.get("hidden_size") != hidden:
        raise InputError(
            f"slicegpt manifest is for hidden size {manifest.get('hidden_size')}, the model has "
            f"{hidden}"
        )
    if not all(isinstance(d, int) and 0 < d <= hidden for d in dims):
        raise InputError(f"slicegpt manifest: dims must be integers in 1..{hidden}")
    return list(dims)


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight (a copy) and record ``tie_word_embeddings=False``."""
    adapter = get_adapter(model)
    head = adapter.lm_head()
    if head is None:
        raise InputError("SliceGPT needs a causal LM with an LM head (e.g. LlamaForCausalLM)")
    module: Any = head[1]
    if adapter.tied_embeddings():
        w = module.weight
        fresh = torch.empty_like(w) if w.is_meta else w.detach().clone()
        module.weight = nn.Parameter(fresh, w.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", None)
        if callable(text) and text() is not config:
            text().tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        object.__setattr__(model, "all_tied_weights_keys", {})


def found_module(found: tuple[str, nn.Module] | None) -> tuple[str, Any]:
    if found is None:
        raise InputError("SliceGPT needs a causal LM with embeddings and an LM head")
    return found


def restructure(model: Any, manifest: dict[str, Any]) -> None:
    """Reshape a freshly built stock LLaMA causal LM (real or meta) into the sliced layout.

    Afterwards ``model.state_dict()`` has the keys and shapes of the sliced model that
    ``manifest`` describes (embedding, norms, every block's Linear layers, the shortcut Linear
    layers, the untied LM head); values are left uninitialised, to be loaded. Norm epsilons are
    set from the manifest (they are not tensors).

    Example:
        >>> restructure(model, {"kind": "slicegpt", "version": 1, ...})  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    if not isinstance(adapter, LlamaAdapter) or adapter.embedding() is None:
        raise InputError(
            f"SliceGPT manifests apply to LLaMA causal LMs, not {type(model).__name__}"
        )
    blocks = adapter.blocks()
    emb_name, emb = found_module(adapter.embedding())
    hidden = int(emb.weight.shape[1])
    dims = check_manifest(manifest, len(blocks), hidden)
    eps = [float(e) for e in manifest["norm_eps"]]
    untie_head(model)
    like = emb.weight
    model.set_submodule(emb_name, new_embedding(emb, torch.empty(0, dims[0], dtype=like.dtype)))
    branches = adapter.residual_branches()
    for index, (_, block) in enumerate(blocks):
        layer: Any = make_sliced(block)
        for j, branch in enumerate(branches):
            p = 2 * index + j
            d_in, d_out = dims[p], dims[p + 1]
            for path in branch.readers:
                old = layer.get_submodule(path)
                layer.set_submodule(
                    path, new_linear(d_in, old.out_features, old.bias is not None, old.weight)
                )
            old = layer.get_submodule(branch.writer)
            layer.set_submodule(
                branch.writer, new_linear(old.in_features, d_out, old.bias is not None, old.weight)
            )
            norm = layer.get_submodule(branch.norm)
            set_norm(
                norm, torch.empty(d_in, dtype=torch.float64, device=norm.weight.device), eps[p]
            )
            setattr(layer, SHORTCUT_ROLES[j], new_linear(d_in, d_out, False, old.weight))
    final = adapter.final_norm()
    if final is None:
        raise InputError("SliceGPT needs a model with a final norm")
    set_norm(final[1], torch.empty(dims[-1], dtype=torch.float64, device=like.device), eps[-1])
    head_name, head = found_module(adapter.lm_head())
    model.set_submodule(
        head_name, new_linear(dims[-1], head.out_features, head.bias is not None, head.weight)
    )
