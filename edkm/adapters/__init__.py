"""Model adapters: where each model family keeps its decoder blocks, Linear layers and norms.

Every stage (palettization, export, pre-passes, evaluation) asks an adapter about the
architecture instead of matching module names itself, so supporting a new family means writing
one adapter. ``get_adapter(model)`` picks the adapter of a model, or raises an ``InputError``
listing the supported classes. Adapters match by class name (including base classes), so asking
for one never imports ``transformers``.

Example:
    >>> import torch
    >>> get_adapter(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    edkm.errors.InputError: no edkm model adapter for Linear; supported: LlamaForCausalLM, LlamaModel, LlamaDecoderLayer
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

from torch import nn

from edkm.errors import InputError

__all__ = ["HeadLayout", "ModelAdapter", "get_adapter", "register_adapter"]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Attention head layout of one decoder block, with grouped-query attention (GQA).

    Example:
        >>> HeadLayout(num_heads=4, num_kv_heads=2, head_dim=16).kv_groups
        2
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_groups(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        """Output channels of the query projection (and input channels of the output one)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Output channels of each of the key and value projections."""
        return self.num_kv_heads * self.head_dim


class ModelAdapter(ABC):
    """What edkm needs to know about one model family. Names are relative to ``root``.

    Subclasses set ``family``, ``model_classes`` (class names they accept) and ``linear_roles``
    (role -> path of the Linear inside a decoder block, in forward order), and implement the
    abstract methods. Methods return the module found at each place now, so they also see
    modules that edkm swapped in (a DKM-wrapped or palettized Linear).
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    linear_roles: ClassVar[dict[str, str]]
    norm_roles: ClassVar[dict[str, str]]

    def __init__(self, model: nn.Module) -> None:
        self.root = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when ``model`` is (a subclass of) one of ``model_classes``."""
        names = {klass.__name__ for klass in type(model).__mro__}
        return any(name in names for name in cls.model_classes)

    @abstractmethod
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The decoder blocks in order, as ``(name, module)``."""

    @abstractmethod
    def embedding(self) -> tuple[str, nn.Module] | None:
        """The token embedding, or ``None`` when the model has none (a bare block)."""

    @abstractmethod
    def lm_head(self) -> tuple[str, nn.Module] | None:
        """The output projection to the vocabulary, or ``None`` when the model has none."""

    @abstractmethod
    def final_norm(self) -> tuple[str, nn.Module] | None:
        """The norm after the last block, or ``None`` when the model has none."""

    @abstractmethod
    def head_layout(self, block: int = 0) -> HeadLayout:
        """Head counts and size of block ``block`` (read from its modules)."""

    @property
    def config(self) -> Any:
        """The model's Hugging Face config, or ``None``."""
        return getattr(self.root, "config", None)

    def block_linears(self, block: int) -> dict[str, tuple[str, nn.Module]]:
        """Role (``"q"``, ``"down"``, ...) -> ``(name, module)`` of the Linear layers of a block."""
        prefix, module = self.blocks()[block]
        out = {}
        for role, path in self.linear_roles.items():
            out[role] = (_join(prefix, path), module.get_submodule(path))
        return out

    def block_norms(self, block: int) -> dict[str, tuple[str, nn.Module]]:
        """Role -> ``(name, module)`` of the norms inside block ``block``."""
        prefix, module = self.blocks()[block]
        return {
            role: (_join(prefix, p), module.get_submodule(p)) for role, p in self.norm_roles.items()
        }

    def linear_layers(self) -> list[tuple[str, nn.Module]]:
        """Every Linear layer inside the decoder blocks, block by block in forward order.

        These are the default palettization targets (never embeddings or the LM head).
        """
        return [item for i in range(len(self.blocks())) for item in self.block_linears(i).values()]

    def tied_embeddings(self) -> bool:
        """True when the LM head shares its weight with the token embedding."""
        emb, head = self.embedding(), self.lm_head()
        if emb is None or head is None:
            return False
        return getattr(emb[1], "weight", None) is getattr(head[1], "weight", None)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


_ADAPTERS: list[type[ModelAdapter]] = []
_A = TypeVar("_A", bound=type[ModelAdapter])


def register_adapter(cls: _A) -> _A:
    """Class decorator adding an adapter to those ``get_adapter`` tries."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter of ``model``; an ``InputError`` names the class when none fits.

    Example:
        >>> from transformers import LlamaConfig, LlamaModel  # doctest: +SKIP
        >>> get_adapter(LlamaModel(LlamaConfig(num_hidden_layers=1))).family  # doctest: +SKIP
        'llama'
    """
    from edkm.adapters import llama  # noqa: F401  (registers the built-in adapter)

    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(name for cls in _ADAPTERS for name in cls.model_classes)
    raise InputError(f"no edkm model adapter for {type(model).__name__}; supported: {supported}")
