"""A data-aware post-training peer for the report: coremltools' sensitive k-means (``skm_``).

Sensitive k-means (SqueezeLLM's method, coremltools' ``SKMPalettizer``) weighs every weight by
its squared gradient (a diagonal Fisher estimate) over calibration text and runs weighted k-means
per LUT: the post-training palettizer a Core ML user would reach for instead of training. It is
compared with eDKM at the same bits and on the same layers (``DKMConfig`` picks them, as for
``palettize_``), with the same LUT layout (per tensor, or ``group_size`` output channels).

coremltools does the work (sensitivities, weighted k-means); written here is only the adapter:
a coremltools config naming exactly the selected layers (the tied LM head is never named: its
weight is the embedding's, which the sensitivity pass does not key), a loss on calibration
blocks, and the read-back into the model in place with fp16 LUT entries (what
``save_palettized`` and Core ML store; coremltools keeps fp32 centroids), so that the
``bits_per_weight`` it reports (indices + fp16 LUTs, as ``kmeans_``) is what it is measured at.
Needs the ``coreml`` extra (``pip install edkm[coreml]``).

Example:
    >>> summary = skm_(model, blocks, bits=3)  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
from torch import nn

from edkm.config import DKMConfig
from edkm.errors import InputError, check_bits
from edkm.eval.baselines import BaselineSummary, quantize_selected_, storage_bits
from edkm.nn.palettize import select_layers

__all__ = ["skm_", "skm_available"]


def skm_available() -> bool:
    """Whether coremltools (the ``coreml`` extra) can be imported.

    Example:
        >>> isinstance(skm_available(), bool)
        True
    """
    import importlib.util

    return importlib.util.find_spec("coremltools") is not None


def _layer_config(bits: int, group_size: int | None) -> dict[str, Any]:
    if group_size is None:
        return {"n_bits": bits, "granularity": "per_tensor"}
    return {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": group_size}


def skm_(
    model: nn.Module,
    blocks: torch.Tensor,
    bits: int | None = None,
    config: DKMConfig | None = None,
) -> BaselineSummary:
    """Sensitive k-means of the selected Linear weights, in place (module docstring).

    ``blocks`` ((n, seq_len) token ids from the training split) give the sensitivities, one
    block per backward pass. ``bits=None`` takes each layer's bits from ``config``.
    """
    if not skm_available():
        raise InputError("the sensitive k-means peer needs coremltools: pip install edkm[coreml]")
    if bits is not None:
        check_bits(bits)
    if blocks.dim() != 2 or blocks.shape[0] < 1:
        raise InputError(f"skm_ needs (n, seq_len) calibration blocks, got {tuple(blocks.shape)}")
    config = DKMConfig() if config is None else config
    layers = {
        name: _layer_config(spec.bits if bits is None else bits, spec.group_size)
        for name, _, spec in select_layers(model, config)
    }
    compressed = _run_skm(model, blocks, layers)

    def quantize(w: torch.Tensor, b: int, spec: Any, name: str) -> tuple[torch.Tensor, int]:
        new = compressed[name].to(device=w.device, dtype=torch.float16).to(w.dtype)
        groups = 1 if spec.group_size is None else w.shape[0] // spec.group_size
        return new, storage_bits(w.numel(), b, lut_entries=groups * (1 << b))

    gs = config.group_size
    return quantize_selected_(
        model, config, "skm" if gs is None else f"skm_g{gs}", bits, gs, quantize
    )


def _run_skm(
    model: nn.Module, blocks: torch.Tensor, layers: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """coremltools' SKMPalettizer on a copy of ``model``: the palettized weight of each layer."""
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    device = next(model.parameters()).device
    samples = [blocks[i : i + 1].to(device) for i in range(blocks.shape[0])]
    skm_config = SKMPalettizerConfig.from_dict(
        {
            "global_config": None,
            "module_name_configs": layers,
            "calibration_nsamples": len(samples),
        }
    )

    def loss_fn(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return net(input_ids=batch, labels=batch).loss

    was_training = model.training
    model.eval()
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)  # coremltools logs every sample and k-means step at INFO
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its per-layer progress bar
            out = SKMPalettizer(model, skm_config).compress(
                dataloader=samples, loss_fn=loss_fn, inplace=False
            )
    finally:
        logging.disable(disabled)
        model.train(was_training)
    found = dict(out.named_modules())
    return {name: found[name].weight.detach() for name in layers}
