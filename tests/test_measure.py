"""edkm.measure.peak_memory: categories, FakeTensor agreement, host copies filed apart."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from edkm.measure import peak_memory
from edkm.offload.hooks import OffloadHooks


def _step(offload: bool, backward: bool = True):
    lin = nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256)

    def fn() -> None:
        hooks = OffloadHooks(min_bytes=0, device="cpu") if offload else None
        with hooks if hooks is not None else torch.enable_grad():
            h = lin(x).exp().exp()
        if backward:
            h.sum().backward()

    return peak_memory(fn, track=[lin, x])


def test_parameters_and_activations_counted():
    rep = _step(False)
    assert rep.method == "memtracker"
    assert rep.start_bytes == 256 * 256 * 4 + 64 * 256 * 4
    assert rep.by_category["Parameter"] == 256 * 256 * 4
    # two exp outputs saved (64x256 fp32 each) plus the linear output, at least
    assert rep.peak_bytes >= rep.start_bytes + 2 * 64 * 256 * 4
    assert rep.peak_host_bytes == 0


def test_fake_agrees_with_real():
    real = _step(False)
    with FakeTensorMode():
        fake = _step(False)
    assert fake.method == "memtracker-fake"
    assert fake.peak_bytes == real.peak_bytes
    assert fake.by_category == real.by_category


def test_host_copies_filed_apart():
    plain, off = _step(False, backward=False), _step(True, backward=False)
    assert off.peak_host_bytes == 3 * 64 * 256 * 4  # x and both exp outputs
    assert "Host" not in off.by_category
    assert off.peak_bytes <= plain.peak_bytes
    with FakeTensorMode():
        fake = _step(True, backward=False)
    assert fake.peak_bytes == off.peak_bytes and fake.peak_host_bytes == off.peak_host_bytes


def test_returns_result():
    rep = peak_memory(lambda: 7)
    assert rep.result == 7 and rep.peak_bytes == 0 and "result" not in rep.to_dict()
