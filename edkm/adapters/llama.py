"""LLaMA-family adapter: ``LlamaForCausalLM``, a bare ``LlamaModel`` or one ``LlamaDecoderLayer``.

A LLaMA decoder block is ``x + o(attn(q(n1(x)), k(n1(x)), v(n1(x))))`` followed by
``h + down(silu(gate(n2(h))) * up(n2(h)))`` with RMS norms ``n1 = input_layernorm`` and
``n2 = post_attention_layernorm``; attention uses grouped-query heads (``num_kv_heads`` divides
``num_heads``). Head counts are read from the projection shapes, not from the config, so the
layout stays right after a pre-pass has removed heads.

Example:
    >>> from edkm.adapters import get_adapter
    >>> adapter = get_adapter(model)  # doctest: +SKIP
    >>> [name for name, _ in adapter.block_linears(0).values()][:2]  # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from edkm.adapters import HeadLayout, ModelAdapter, register_adapter
from edkm.adapters.groups import GroupSet, Slot


@register_adapter
class LlamaAdapter(ModelAdapter):
    """Adapter for LLaMA-architecture models (also SmolLM2, which is a ``LlamaForCausalLM``)."""

    family = "llama"
    model_classes = ("LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer")
    linear_roles: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    norm_roles: ClassVar[dict[str, str]] = {
        "input": "input_layernorm",
        "post_attention": "post_attention_layernorm",
    }

    def _kind(self) -> str:
        names = {klass.__name__ for klass in type(self.root).__mro__}
        for kind in self.model_classes:
            if kind in names:
                return kind
        raise AssertionError("matches() accepted a model of no known class")

    def _base(self) -> tuple[str, nn.Module] | None:
        """The ``LlamaModel`` part (``model`` inside a causal LM) as ``(prefix, module)``."""
        kind = self._kind()
        if kind == "LlamaForCausalLM":
            return "model", self.root.get_submodule("model")
        if kind == "LlamaModel":
            return "", self.root
        return None

    def blocks(self) -> list[tuple[str, nn.Module]]:
        base = self._base()
        if base is None:  # a single decoder layer is its own (only) block
            return [("", self.root)]
        prefix, module = base
        layers = module.get_submodule("layers")
        head = f"{prefix}.layers" if prefix else "layers"
        return [(f"{head}.{i}", layer) for i, layer in enumerate(layers.children())]

    def embedding(self) -> tuple[str, nn.Module] | None:
        return self._base_child("embed_tokens")

    def final_norm(self) -> tuple[str, nn.Module] | None:
        return self._base_child("norm")

    def lm_head(self) -> tuple[str, nn.Module] | None:
        if self._kind() != "LlamaForCausalLM":
            return None
        return "lm_head", self.root.get_submodule("lm_head")

    def _base_child(self, name: str) -> tuple[str, nn.Module] | None:
        base = self._base()
        if base is None:
            return None
        prefix, module = base
        return (f"{prefix}.{name}" if prefix else name), module.get_submodule(name)

    def head_layout(self, block: int = 0) -> HeadLayout:
        attn = self.blocks()[block][1].get_submodule("self_attn")
        head_dim = int(getattr(attn, "head_dim"))  # noqa: B009  (a plain int attribute)
        q_out = int(getattr(attn.get_submodule("q_proj"), "out_features"))  # noqa: B009
        kv_out = int(getattr(attn.get_submodule("k_proj"), "out_features"))  # noqa: B009
        if q_out % head_dim or kv_out % head_dim:
            raise ValueError(
                f"block {block}: projection widths {q_out}/{kv_out} are not multiples of "
                f"head_dim {head_dim}"
            )
        return HeadLayout(
            num_heads=q_out // head_dim, num_kv_heads=kv_out // head_dim, head_dim=head_dim
        )

    # ---- coupled channel groups, for structured pruning (LLM-Pruner) ----

    def coupled_groups(self, block: int) -> list[GroupSet]:
        """The channel groups of block ``block`` that are removed together, read from the
        current module shapes (blocks may differ after pruning).

        ``attention``: one group per key/value head: its rows of ``k_proj`` and ``v_proj``, the
        rows of the ``kv_groups`` query heads that share it in ``q_proj``, and the matching
        input columns of ``o_proj`` (grouped-query attention stays consistent: the ratio of
        query to key/value heads is unchanged). ``mlp``: one group per intermediate channel:
        a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.

        Example:
            >>> from tests.conftest import make_tiny_llama  # doctest: +SKIP
            >>> [(g.kind, g.count) for g in get_adapter(model).coupled_groups(0)]  # doctest: +SKIP
            [('attention', 2), ('mlp', 128)]
        """
        layout = self.head_layout(block)
        q_width = layout.kv_groups * layout.head_dim
        gate = self.blocks()[block][1].get_submodule("mlp.gate_proj")
        attention = GroupSet(
            "attention",
            block,
            layout.num_kv_heads,
            (
                Slot("self_attn.q_proj", 0, q_width),
                Slot("self_attn.k_proj", 0, layout.head_dim),
                Slot("self_attn.v_proj", 0, layout.head_dim),
                Slot("self_attn.o_proj", 1, q_width),
            ),
        )
        mlp = GroupSet(
            "mlp",
            block,
            int(getattr(gate, "out_features")),  # noqa: B009
            (Slot("mlp.gate_proj", 0, 1), Slot("mlp.up_proj", 0, 1), Slot("mlp.down_proj", 1, 1)),
        )
        return [attention, mlp]

    # ---- residual-stream structure, for the pre-passes (SliceGPT) ----

    def residual_branches(self) -> list[ResidualBranch]:
        """The two branches of every block that read the residual stream through a norm and
        add their output back to it, in forward order (paths relative to the block).

        Example:
            >>> [b.writer for b in LlamaAdapter(nn.Identity()).residual_branches()]
            ['self_attn.o_proj', 'mlp.down_proj']
        """
        return [
            ResidualBranch("attention", "input_layernorm", _ATTN_READERS, "self_attn.o_proj"),
            ResidualBranch("mlp", "post_attention_layernorm", _MLP_READERS, "mlp.down_proj"),
        ]

    def shortcut_linears(self, block: int) -> dict[str, tuple[str, nn.Module]]:
        """Role -> ``(name, module)`` of the residual shortcut Linear layers a SliceGPT pre-pass
        installed in block ``block`` (``attn_shortcut``, ``mlp_shortcut``); empty for a stock
        block. They map the residual stream from one rotated basis to the next."""
        prefix, module = self.blocks()[block]
        out = {}
        for role in SHORTCUT_ROLES:
            child = getattr(module, role, None)
            if isinstance(child, nn.Module):
                out[role] = (f"{prefix}.{role}" if prefix else role, child)
        return out

    def block_linears(self, block: int) -> dict[str, tuple[str, nn.Module]]:
        """The stock roles, then a pre-pass's shortcut Linear layers when present (so that
        palettization and the baselines see them as ordinary decoder Linear layers)."""
        out = super().block_linears(block)
        out.update(self.shortcut_linears(block))
        return out


SHORTCUT_ROLES = ("attn_shortcut", "mlp_shortcut")
_ATTN_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")


@dataclasses.dataclass(frozen=True)
class ResidualBranch:
    """One residual branch of a block: ``x + writer(f(readers(norm(x))))``."""

    name: str
    norm: str  # path of the norm that reads the residual stream
    readers: tuple[str, ...]  # Linear layers fed by the norm
    writer: str  # Linear layer whose output is added to the residual stream
