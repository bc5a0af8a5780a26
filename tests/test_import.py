"""``import edkm`` stays light: no transformers, no triton, no CUDA query."""

import subprocess
import sys

_PROBE = """
import sys
import torch

calls = []
torch.cuda.is_available = lambda: calls.append("is_available") or False
torch.cuda.device_count = lambda: calls.append("device_count") or 0
torch.cuda.init = lambda: calls.append("init")

import edkm
import edkm.config.dkm, edkm.dkm.soft, edkm.nn.palettize, edkm.export.palettized  # the public API's modules
import edkm.nn.palettized_linear, edkm.nn.dense, edkm.export.format, edkm.export.hf  # the layer lifecycle and export
import edkm.kernels, edkm.offload

heavy = sorted(m for m in ("transformers", "triton") if m in sys.modules)
print("HEAVY", heavy)
print("CUDA", calls)
print("CUDA_INIT", torch.cuda.is_initialized())
"""


def test_import_edkm_is_light():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY []" in out, out
    assert "CUDA []" in out, out
    assert "CUDA_INIT False" in out, out


def test_public_api_names():
    import edkm

    for name in edkm.__all__:
        assert getattr(edkm, name) is not None
