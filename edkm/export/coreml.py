"""Core ML export: one ``constexpr_lut_to_dense`` per palettized weight, holding our LUT and indices.

coremltools (``pip install edkm[coreml]``) does the conversion; edkm only tells it what each
weight is, through coremltools' compression-info protocol: the model carries the buffer
``_COREML_/metadata_version`` and each palettized Linear the buffers
``_COREML_/weight/compression_type = [2]`` (palettization) and ``_COREML_/weight/lut`` (our fp16
LUT, shaped ``(G, 1, 2**b, 1)``: G groups of output channels, scalar entries). The traced weight
is the dense ``LUT[indices]`` (exact in fp32), so ``ct.convert`` recovers, for each weight, the
index of its value in that LUT and emits ``constexpr_lut_to_dense(indices, lut)``: our LUT
bit for bit, and our indices (the nearest LUT entry of each weight; only a LUT holding the same
value twice leaves a choice, and then coremltools takes the first, as ``finalize`` does).

What converts (coremltools 9.0, torch 2.13, checked on Linux): causal LMs of the Hugging Face
LLaMA family, for a fixed sequence length, without KV cache, with eager attention and an
explicit additive causal mask, captured by ``torch.export`` and ``run_decompositions()``.
The exported model maps ``input_ids`` (1, seq_len) int32 to ``logits`` (1, seq_len, vocab).
Targets: ``iOS18`` (any bits 1..8, per tensor or grouped LUTs) and ``iOS16`` (per-tensor LUTs of
1, 2, 4, 6 or 8 bits). Running the model (``MLModel.predict``) needs macOS; on Linux the package
is written and read back (:func:`read_palettes`) but not run. The Triton/CUDA path is never
needed: export runs on CPU.

Why by hand: coremltools converts and palettizes, but it does not know a model that is already
palettized; the protocol above is its documented way to be told, and the model wrapper is what
its torch.export frontend needs from a Hugging Face LLaMA (above).

Example:
    >>> path = export_coreml(edkm.load_palettized("out/model"), "model.mlpackage")  # doctest: +SKIP
    >>> check_export(path, edkm.load_palettized("out/model"))  # doctest: +SKIP
    210
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edkm.errors import InputError, first_line
from edkm.nn.palettized_linear import PalettizedLinear

__all__ = ["TARGETS", "check_export", "coreml_ready", "export_coreml", "op_name", "read_palettes"]

TARGETS = ("iOS18", "iOS16")
_IOS16_BITS = (1, 2, 4, 6, 8)  # constexpr_lut_to_dense before iOS18: these widths, per tensor
_PREFIX = "_COREML_"
_PALETTIZATION = 2  # coremltools' CompressionType.PALETTIZATION


def _coremltools() -> Any:
    try:
        import coremltools as ct
    except ImportError:
        raise InputError("Core ML export needs coremltools: pip install 'edkm[coreml]'") from None
    return ct


def _palettized(model: nn.Module) -> dict[str, PalettizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PalettizedLinear)}


def check_target(model: nn.Module, target: str) -> None:
    """``InputError`` when ``target`` cannot hold the model's LUTs (module docstring).

    Example:
        >>> check_target(nn.Linear(2, 2), "iOS15")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: --target must be one of iOS18, iOS16, got 'iOS15'
    """
    if target not in TARGETS:
        raise InputError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "iOS18":
        return
    for name, layer in _palettized(model).items():
        if layer.group_size is not None or layer.bits not in _IOS16_BITS:
            what = "grouped LUTs" if layer.group_size is not None else f"{layer.bits}-bit LUTs"
            raise InputError(
                f"layer '{name}': {what} need --target iOS18 (iOS16 holds per-tensor LUTs of "
                f"{', '.join(map(str, _IOS16_BITS))} bits)"
            )


def coreml_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in fp32 whose palettized layers are ``nn.Linear`` layers holding
    ``LUT[indices]`` and coremltools' compression info (module docstring).

    Example:
        >>> from edkm.nn.palette import Palette
        >>> p = Palette(torch.tensor([[-1.0, 2.0]], dtype=torch.float16),
        ...             torch.tensor([0b101], dtype=torch.uint8), 1, None, (1, 3))
        >>> ready = coreml_ready(nn.Sequential(PalettizedLinear.from_palette(p)))
        >>> ready[0].weight.tolist(), sorted(k for k in ready.state_dict() if "COREML" in k)
        ([[2.0, -1.0, 2.0]], ['0._COREML_/weight/compression_type', '0._COREML_/weight/lut', '_COREML_/metadata_version'])
    """
    layers = _palettized(model)
    if not layers:
        raise InputError("the model has no palettized layers (load it with edkm.load_palettized)")
    # nn.Module's float: transformers forbids .float() on a model loaded through a quantizer
    ready = nn.Module.float(copy.deepcopy(model))
    for name, layer in layers.items():
        src = ready.get_submodule(name)
        assert isinstance(src, PalettizedLinear)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=src.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(src.dense_weight(torch.float32))  # fp16 values: exact in fp32
            if src.bias is not None and linear.bias is not None:
                linear.bias.copy_(src.bias.float())
        lut = src.lut.detach().to(torch.float16).reshape(src.num_groups, 1, 1 << src.bits, 1)
        linear.register_buffer(f"{_PREFIX}/weight/compression_type", torch.tensor([_PALETTIZATION]))
        linear.register_buffer(f"{_PREFIX}/weight/lut", lut.clone())
        ready.set_submodule(name, linear)
    ready.register_buffer(f"{_PREFIX}/metadata_version", torch.tensor(1))
    return ready.eval()


class _CausalLMLogits(nn.Module):
    """``input_ids`` (1, seq_len) -> logits, no cache, with a fixed additive causal mask."""

    mask: torch.Tensor

    def __init__(self, model: nn.Module, seq_len: int) -> None:
        super().__init__()
        self.model: Any = model
        mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the base model and the head apart: the full model slices its hidden states
        # (logits_to_keep), an alias node coremltools cannot convert
        base: Any = self.model.get_decoder()
        hidden = base(input_ids=input_ids, attention_mask=self.mask, use_cache=False)[0]
        head: Any = self.model.get_output_embeddings()
        logits: torch.Tensor = head(hidden)
        return logits


def op_name(layer: str) -> str:
    """The name coremltools gives the weight of palettized layer ``layer`` in the package.

    Example:
        >>> op_name("model.layers.0.mlp.up_proj")
        'p_model_model_layers_0_mlp_up_proj_weight'
    """
    return "p_model_" + layer.replace(".", "_") + "_weight"


def export_coreml(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    target: str = "iOS18",
    seq_len: int = 64,
) -> Path:
    """Convert a palettized causal LM to the Core ML package ``out`` (``.mlpackage``).

    The package maps ``input_ids`` (1, ``seq_len``) int32 to ``logits``; every palettized
    weight is one ``constexpr_lut_to_dense`` holding its LUT and indices (module docstring).
    Errors (``InputError``): coremltools missing, a target that cannot hold the LUTs, a model
    the converter rejects (its first line). Written atomically.

    Example:
        >>> export_coreml(model, "model.mlpackage", target="iOS18", seq_len=128)  # doctest: +SKIP
        PosixPath('model.mlpackage')
    """
    ct = _coremltools()
    from edkm.io import atomic

    check_target(model, target)
    target_path = Path(out)
    if target_path.suffix != ".mlpackage":
        raise InputError(f"--out must end in .mlpackage, got '{target_path}'")
    if target_path.exists() and not (target_path / "Manifest.json").is_file():
        raise InputError(
            f"'{target_path}' exists and is not a Core ML package; refusing to replace it"
        )
    if seq_len < 1:
        raise InputError(f"--seq-len must be at least 1, got {seq_len}")
    ready = coreml_ready(model)
    set_attn: Any = getattr(ready, "set_attn_implementation", None)
    if set_attn is not None:
        set_attn("eager")  # sdpa's mask handling does not convert
    wrapper = _CausalLMLogits(ready, seq_len).eval()
    example = torch.zeros(1, seq_len, dtype=torch.long)
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,)).run_decompositions({})
        mlmodel = ct.convert(
            program,
            minimum_deployment_target=getattr(ct.target, target),
            skip_model_load=True,  # loading needs macOS
        )
    except Exception as err:
        raise InputError(f"Core ML conversion failed: {first_line(err)}") from err
    atomic.write_dir(target_path, lambda tmp: _save_package(mlmodel, tmp))
    return target_path


def _save_package(mlmodel: Any, tmp: Path) -> None:
    # MLModel.save writes a package folder at the given path; write it inside the temporary
    # folder under its final name, then move its contents up
    inner = tmp / "model.mlpackage"
    mlmodel.save(str(inner))
    for item in inner.iterdir():
        item.rename(tmp / item.name)
    inner.rmdir()


def read_palettes(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``op name -> (LUT, indices)`` of every ``constexpr_lut_to_dense`` in a package, on Linux.

    The package is read without loading it (``MLModel(..., skip_model_load=True)``) and its
    program parsed by coremltools' milproto loader. LUTs are (G, 1, 2**b, 1) (iOS18) or
    (2**b,) (iOS16); indices are the (out, in) integer indices, unpacked.

    Example:
        >>> luts = read_palettes("model.mlpackage")  # doctest: +SKIP
    """
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    folder = Path(path)
    if not (folder / "Manifest.json").is_file():
        raise InputError(f"'{folder}' is not a Core ML package (no Manifest.json)")
    try:
        mlmodel = ct.models.MLModel(str(folder), skip_model_load=True)
        spec = mlmodel.get_spec()
        program = load_milproto(spec, spec.specificationVersion, mlmodel.weights_dir)
    except Exception as err:
        raise InputError(
            f"'{folder}': cannot read the Core ML package ({first_line(err)})"
        ) from err
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type != "constexpr_lut_to_dense":
                continue
            lut = np.asarray(op.inputs["lut"].val)
            indices = np.asarray(op.inputs["indices"].val)
            if "shape" in op.inputs:  # iOS16: packed bytes plus the dense shape
                from coremltools.optimize import _utils as cto_utils

                shape = tuple(int(n) for n in op.inputs["shape"].val)
                nbits = int(np.log2(lut.size))
                unpacked = cto_utils.restore_elements_from_packed_bits(
                    indices, nbits, int(np.prod(shape))
                )
                indices = unpacked.reshape(shape)
            found[op.name] = (lut, indices.astype(np.int64))
    return found


def check_export(path: str | os.PathLike[str], model: nn.Module) -> int:
    """Check that the package holds each palettized layer of ``model`` as one
    ``constexpr_lut_to_dense`` whose LUT and indices equal the layer's bit for bit.

    Returns the number of layers checked; a difference is an ``InputError`` naming the layer.

    Example:
        >>> check_export("model.mlpackage", edkm.load_palettized("out/model"))  # doctest: +SKIP
        14
    """
    found = read_palettes(path)
    layers = _palettized(model)
    if len(found) != len(layers):
        raise InputError(
            f"'{path}' holds {len(found)} constexpr_lut_to_dense ops for {len(layers)} "
            "palettized layers"
        )
    for name, layer in layers.items():
        entry = found.get(op_name(name))
        if entry is None:
            raise InputError(f"'{path}': no constexpr_lut_to_dense for layer '{name}'")
        lut, indices = entry
        ours = layer.lut.detach().cpu().to(torch.float16).numpy()
        if lut.dtype != np.float16 or lut.size != ours.size:
            raise InputError(f"'{path}': layer '{name}' LUT is {lut.dtype} {lut.shape}")
        if not np.array_equal(lut.reshape(ours.shape).view(np.uint16), ours.view(np.uint16)):
            raise InputError(f"'{path}': layer '{name}' LUT differs from the checkpoint's")
        if not np.array_equal(indices, layer.indices().cpu().numpy().astype(np.int64)):
            raise InputError(f"'{path}': layer '{name}' indices differ from the checkpoint's")
    return len(layers)


def timed_export(
    model: nn.Module, out: str | os.PathLike[str], **kwargs: Any
) -> tuple[Path, float]:
    """:func:`export_coreml` and its wall time in seconds.

    Example:
        >>> path, seconds = timed_export(model, "model.mlpackage")  # doctest: +SKIP
    """
    start = time.perf_counter()
    path = export_coreml(model, out, **kwargs)
    return path, time.perf_counter() - start
