"""Importance of coupled channel groups (LLM-Pruner, Ma et al., NeurIPS 2023, section 3.2).

Removing a group of weights ``W`` changes the calibration loss by about
``dL = g.W - 1/2 W^T H W`` (Taylor expansion around the trained weights, ``g`` the loss
gradient). The Hessian ``H`` is replaced by its diagonal Fisher approximation ``F = E[g_i^2]``
over the calibration blocks (per-block gradients squared, averaged). With ``s = W * g`` and
``h = 1/2 W^2 * F`` element by element, the importance kinds are:

- ``taylor1``: first order, ``|s|``;
- ``taylor2``: the second-order term alone, ``|h|``;
- ``mix``: both, ``|s - h|`` (the paper's full second-order estimate);
- ``l2``: ``W^2`` (magnitude baseline, no data);
- ``random``: uniform random scores (baseline).

``level="element"`` sums the absolute element scores over the group's weights (the paper's
element-wise importance); ``level="vector"`` takes the absolute value of the signed sum over
each weight vector (a row of a layer pruned on its outputs, a column of one pruned on its
inputs; the paper's vector-wise importance) and sums those over the group's vectors. Each
member layer of a group gets its own score; :func:`aggregate` combines them per group
(``sum``, ``mean``, ``max``, ``prod`` or ``last``: the last member layer only, the paper's
"last-only").

Written here rather than with torch-pruning's importance classes because the gradient and
Fisher accumulation must run block by block on LLaMA models without a traced graph, and the
groups already come from the model adapter.

Example:
    >>> import torch
    >>> w, g = torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    >>> element_scores(w, g, torch.zeros(2, 2), "taylor1", "element", axis=0)
    tensor([1.5000, 4.0000], dtype=torch.float64)
    >>> element_scores(w, g, torch.zeros(2, 2), "taylor1", "vector", axis=0)
    tensor([0.5000, 2.0000], dtype=torch.float64)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from edkm.adapters.groups import GroupSet
from edkm.errors import InputError
from edkm.progress import progress

__all__ = [
    "AGGREGATES",
    "IMPORTANCES",
    "LEVELS",
    "accumulate_gradients",
    "aggregate",
    "element_scores",
    "group_scores",
]

IMPORTANCES = ("taylor1", "taylor2", "mix", "l2", "random")
AGGREGATES = ("sum", "mean", "max", "prod", "last")
LEVELS = ("element", "vector")
NEEDS_GRAD = ("taylor1", "taylor2", "mix")


def element_scores(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    fisher: torch.Tensor | None,
    importance: str,
    level: str,
    *,
    axis: int,
) -> torch.Tensor:
    """Score of every channel of ``weight`` along ``axis`` (0: rows, 1: columns), float64.

    Example:
        >>> w = torch.ones(2, 3)
        >>> element_scores(w, None, None, "l2", "element", axis=1)
        tensor([2., 2., 2.], dtype=torch.float64)
    """
    w = weight.detach().to(torch.float64)
    other = 1 - axis
    if importance == "l2":
        return w.pow(2).sum(other)
    if grad is None or fisher is None:
        raise InputError(f"importance {importance!r} needs calibration gradients")
    g = grad.to(torch.float64)
    first = w * g
    second = 0.5 * w.pow(2) * fisher.to(torch.float64)
    if importance == "taylor1":
        e = first
    elif importance == "taylor2":
        e = second
    elif importance == "mix":
        e = first - second
    else:
        raise InputError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if level == "element":
        return e.abs().sum(other)
    if level == "vector":
        return e.sum(other).abs()
    raise InputError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")


def aggregate(per_slot: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Combine the member layers' scores of each group (rows: member layers, in order).

    Example:
        >>> aggregate([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])], "max")
        tensor([3., 2.])
    """
    stacked = torch.stack(list(per_slot))
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    if how == "last":
        return stacked[-1]
    raise InputError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")


def group_scores(
    block: nn.Module,
    groups: GroupSet,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    prefix: str,
    *,
    importance: str,
    level: str = "element",
    how: str = "sum",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One score per group of ``groups`` (float64, higher: more important).

    ``stats`` maps a weight's full name (``prefix`` + slot path + ``.weight``) to its
    ``(mean gradient, Fisher diagonal)`` from :func:`accumulate_gradients`.

    Example:
        >>> group_scores(block, groups, stats, "model.layers.0", importance="mix")  # doctest: +SKIP
    """
    if importance == "random":
        return torch.rand(groups.count, generator=generator, dtype=torch.float64)
    per_slot = []
    for slot in groups.members:
        weight: Any = block.get_submodule(slot.path).weight
        name = f"{prefix}.{slot.path}.weight" if prefix else f"{slot.path}.weight"
        grad, fisher = (None, None) if stats is None else stats.get(name, (None, None))
        channel = element_scores(weight, grad, fisher, importance, level, axis=slot.axis)
        per_slot.append(channel.view(groups.count, slot.width).sum(1))
    return aggregate(per_slot, how)


@contextlib.contextmanager
def _only_grad(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


def accumulate_gradients(
    model: Any,
    calib: torch.Tensor,
    names: Sequence[str],
    *,
    show_progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean gradient and Fisher diagonal of the weights ``names`` over the calibration blocks.

    Each block's causal-LM loss (mean over its tokens) is backpropagated on its own;
    ``grad = mean_b g_b`` (the gradient of the mean loss) and ``fisher = mean_b g_b^2``. Only
    those weights require gradients meanwhile, so backpropagation stops at the first selected
    block. Dropout is off (the model is put in eval mode).

    Example:
        >>> stats = accumulate_gradients(model, calib, ["model.layers.0.mlp.up_proj.weight"])  # doctest: +SKIP
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise InputError(f"no parameter named {missing[0]!r}")
    chosen = [params[n] for n in names]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    fishers = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    was_training = model.training
    model.eval()
    device = chosen[0].device if chosen else torch.device("cpu")
    n = int(calib.shape[0])
    try:
        with (
            _only_grad(model, chosen),
            progress(total=n, desc="importance", unit="block", disable=not show_progress) as bar,
        ):
            for i in range(n):
                ids = calib[i : i + 1].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                for p, g_acc, f_acc in zip(chosen, grads, fishers):
                    if p.grad is not None:
                        g = p.grad.to(torch.float32)
                        g_acc.add_(g, alpha=1.0 / n)
                        f_acc.addcmul_(g, g, value=1.0 / n)
                    p.grad = None
                bar.update(1)
    finally:
        model.train(was_training)
    return {name: (g, f) for name, g, f in zip(names, grads, fishers)}
