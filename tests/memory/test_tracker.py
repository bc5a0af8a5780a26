"""The memory-measurement helper: known allocations, categories, FakeTensors, the host pool."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from edkm.memory.tracker import measure_peak
from edkm.offload import SavedTensorOffload
from edkm.offload.host import host_allocation, in_host_allocation


def test_peak_of_known_allocations():
    n = 1 << 16

    def fn() -> None:
        a = torch.empty(n)  # 256 KiB
        b = torch.empty(2 * n, dtype=torch.float64)  # 1 MiB, alive together with a
        del a, b
        torch.empty(n // 2)  # after both were freed: not part of the peak

    rep = measure_peak(fn)
    assert rep.method == "memtracker" and rep.baseline_bytes == 0
    assert rep.peak_bytes == 4 * n + 16 * n
    assert sum(rep.by_category.values()) == rep.peak_bytes


def test_existing_tensors_are_the_baseline_and_count_once():
    w = torch.randn(300, 200)
    lin = torch.nn.Linear(200, 100, bias=False)
    rep = measure_peak(lambda: lin(w @ w.t() @ w), existing=[w, w.t(), lin])
    assert rep.baseline_bytes == 4 * (300 * 200 + 100 * 200)
    assert rep.delta_bytes >= 4 * 300 * 300  # the 300 x 300 product
    assert rep.to_dict()["delta_bytes"] == rep.delta_bytes


def _mlp_step(
    offload: SavedTensorOffload | None,
) -> tuple[torch.nn.Module, torch.Tensor, Callable[[], None]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)
    )
    x = torch.randn(256, 128)

    def step() -> None:
        if offload is None:
            loss = model(x).square().mean()
        else:
            with offload:
                loss = model(x).square().mean()
        loss.backward()

    return model, x, step


@pytest.mark.parametrize("with_offload", [False, True])
def test_fake_and_real_measurements_agree(with_offload):
    reports = []
    for fake in (False, True):
        off = SavedTensorOffload(min_bytes=0) if with_offload else None
        ctx = (
            FakeTensorMode()
            if fake
            else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        )
        with ctx:
            model, x, step = _mlp_step(off)
            rep = measure_peak(step, existing=[model, x])  # type: ignore[arg-type]
        reports.append((rep, off))
    (real, off_real), (fake_rep, off_fake) = reports
    assert fake_rep.method == "memtracker-fake"
    assert fake_rep.peak_bytes == real.peak_bytes
    assert fake_rep.by_category == real.by_category
    assert fake_rep.peak_host_bytes == real.peak_host_bytes
    if with_offload:
        assert off_real is not None and off_fake is not None
        assert real.peak_host_bytes == off_real.stats.peak_host_bytes > 0
    else:
        assert real.peak_host_bytes == 0


def test_host_copies_are_not_device_memory():
    model, x, step = _mlp_step(None)
    plain = measure_peak(step, existing=[model, x])
    off = SavedTensorOffload(min_bytes=0, keep=[x])
    model, x, step = _mlp_step(off)
    off.add_keep(x)
    offloaded = measure_peak(step, existing=[model, x])
    # the hidden activations (256 x 512 fp32 pre- and post-GELU) went to the host pool
    assert offloaded.peak_host_bytes == off.stats.peak_host_bytes >= 2 * 4 * 256 * 512
    assert offloaded.peak_bytes < plain.peak_bytes


def test_host_allocation_flag_and_views_of_host_buffers():
    assert not in_host_allocation()

    def fn() -> None:
        with host_allocation():
            assert in_host_allocation()
            host = torch.empty(1 << 18, dtype=torch.uint8)  # 256 KiB of host pool
        view = host.view(torch.float32)[10:]  # still the host buffer: not device memory
        dev = torch.empty(1 << 10, dtype=torch.uint8)
        del view, dev, host

    rep = measure_peak(fn)
    assert not in_host_allocation()
    assert rep.peak_host_bytes == 1 << 18
    assert rep.peak_bytes == 1 << 10


def test_rejects_other_devices():
    with pytest.raises(ValueError):
        measure_peak(lambda: None, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak():
    rep = measure_peak(lambda: torch.empty(1 << 20, device="cuda"), device="cuda")
    assert rep.method == "cuda" and rep.delta_bytes >= 4 << 20
