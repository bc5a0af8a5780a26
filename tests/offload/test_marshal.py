"""Saved-tensor offload hooks: exact gradients, one host copy per storage, views, nesting, stats."""

from __future__ import annotations

import gc
from typing import ClassVar

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from edkm.offload import OffloadStats, SavedTensorOffload


class _SaveViews(torch.autograd.Function):
    """Saves the given views; backward records what autograd hands back for them."""

    seen: ClassVar[list[torch.Tensor]] = []

    @staticmethod
    def forward(ctx, x, *views):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*views)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        _SaveViews.seen = list(ctx.saved_tensors)  # each access unpacks: read them once
        return (grad,) + (None,) * len(_SaveViews.seen)


def _check_invariants(s: OffloadStats) -> None:
    assert s.tensors_packed == s.tensors_kept + s.tensors_offloaded
    assert s.tensors_offloaded == s.host_copies + s.copies_avoided
    assert s.bytes_packed == s.bytes_kept + s.bytes_offloaded
    assert s.bytes_moved == s.bytes_to_host + s.bytes_to_device
    assert 0 <= s.host_bytes <= s.peak_host_bytes <= s.bytes_to_host
    assert 0 <= s.device_bytes <= s.peak_device_bytes <= s.bytes_to_device


def _llama_grads(model, ids, offload: SavedTensorOffload | None):
    model.zero_grad(set_to_none=True)
    if offload is None:
        loss = model(ids, labels=ids).loss
    else:
        with offload:
            loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("offload_parameters", [False, True])
def test_tiny_llama_gradients_bit_identical(tiny_llama, offload_parameters):
    model = tiny_llama.train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_ref, ref = _llama_grads(model, ids, None)
    off = SavedTensorOffload(min_bytes=0, offload_parameters=offload_parameters)
    loss, got = _llama_grads(model, ids, off)
    assert torch.equal(loss, loss_ref)
    for name, g in ref.items():
        assert torch.equal(got[name], g), name
    s = off.stats
    _check_invariants(s)
    assert s.host_copies > 10 and s.copies_avoided > 0
    # every host copy came back exactly once, and nothing is left behind
    assert s.restores == s.host_copies and s.bytes_to_device == s.bytes_to_host
    assert s.host_bytes == 0 and s.device_bytes == 0
    kept_params = s.tensors_kept > 0
    assert kept_params != offload_parameters


def test_attach_offloads_decoder_layers_with_identical_gradients(tiny_llama):
    model = tiny_llama.train()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    _, ref = _llama_grads(model, ids, None)
    off = SavedTensorOffload(min_bytes=0)
    handles = [off.attach(layer) for layer in model.model.layers]
    _, got = _llama_grads(model, ids, None)
    for h in handles:
        h.remove()
    assert all(torch.equal(got[n], g) for n, g in ref.items())
    assert off.stats.tensors_offloaded > 0 and off._stack == []


def test_attach_keeps_the_inputs_when_asked():
    """keep_inputs: a shared input (q/k/v read one) stays; without it, it makes one copy."""
    lins = [torch.nn.Linear(32, 32) for _ in range(3)]
    x = torch.randn(8, 32) * 1.0
    counts = {}
    for keep in (True, False):
        off = SavedTensorOffload(min_bytes=0)
        handles = [off.attach(lin, keep_inputs=keep) for lin in lins]
        sum(lin(x).exp().sum() for lin in lins).backward()  # each saves x and exp's output
        for h in handles:
            h.remove()
        counts[keep] = (off.stats.host_copies, off.stats.copies_avoided)
    assert counts[True] == (0, 0)  # exp runs outside the layers; x and the weights stay
    assert counts[False] == (1, 2)  # x: one host copy for three saves


def test_views_of_one_storage_make_one_host_copy():
    base = torch.randn(64, 48, requires_grad=True) * 1.0  # non-leaf, 12 KiB storage
    views = [base, base.t(), base[3:10, 5:], base[:, ::3], base.view(-1)[7:]]
    off = SavedTensorOffload(min_bytes=0)
    with off:
        out = _SaveViews.apply(torch.ones(3, requires_grad=True), *views)
    s = off.stats
    assert (s.host_copies, s.copies_avoided, s.tensors_offloaded) == (1, len(views) - 1, len(views))
    assert s.bytes_to_host == base.untyped_storage().nbytes()
    assert s.bytes_offloaded == sum(v.numel() * v.element_size() for v in views)
    out.sum().backward()
    # brought back once, shared by all the views, in a storage distinct from the original
    assert s.restores == 1 and s.bytes_to_device == s.bytes_to_host
    ptrs = {t.untyped_storage().data_ptr() for t in _SaveViews.seen}
    assert len(ptrs) == 1 and base.untyped_storage().data_ptr() not in ptrs
    _check_invariants(s)


def test_views_and_non_contiguous_tensors_come_back_exactly():
    x = torch.randn(40, 30, dtype=torch.float64) + 0.0
    views = [
        x[5:, 2:17].t(),  # transposed slice with an offset
        x[::2, 1::3],  # strided
        x.view(torch.int64)[1:3],  # another dtype over the same bytes
        x.unsqueeze(0).expand(4, 40, 30),  # zero stride
        torch.arange(100, dtype=torch.int16)[10:].view(9, 10).t(),  # other storage, other dtype
    ]
    with SavedTensorOffload(min_bytes=0) as off:
        out = _SaveViews.apply(torch.ones(2, requires_grad=True), *views)
    out.sum().backward()
    assert off.stats.host_copies == 2 and off.stats.copies_avoided == 3
    for want, got in zip(views, _SaveViews.seen, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.stride() == want.stride()
        assert got.storage_offset() == want.storage_offset()
        assert torch.equal(got, want)


def test_threshold_parameters_and_keep_stay_on_device():
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(16, 32, requires_grad=True)
    small = torch.randn(4, requires_grad=True)
    off = SavedTensorOffload(min_bytes=1024, keep=[x])
    with off:
        y = lin(x) * small.sum()  # saves x (kept), weight (parameter), small tensors
    s = off.stats
    assert s.tensors_offloaded >= 1  # lin(x) output saved by the multiply: 2 KiB
    assert s.tensors_kept >= 2
    y.sum().backward()
    _check_invariants(s)


def test_modified_in_place_or_freed_storage_is_copied_again():
    x = torch.randn(256, requires_grad=True)
    with SavedTensorOffload(min_bytes=0) as off:
        a = x * 2
        b = a.sin()  # saves a
        a.mul_(3)  # a's version changes: the next save must not reuse the first copy
        c = a.cos()  # saves a again
        losses = []
        for i in range(4):  # intermediates freed after being saved: addresses may be reused
            t = x * (i + 1)
            losses.append(t.exp().sum())  # saves exp's output (t itself is not saved)
            del t
    loss = b.sum() + c.sum() + sum(losses)
    loss.backward()
    assert x.grad is not None
    got = x.grad.clone()
    x.grad = None
    a = x * 2
    b = a.sin()
    a2 = a * 3
    ref = b.sum() + a2.cos().sum() + sum((x * (i + 1)).exp().sum() for i in range(4))
    ref.backward()
    assert x.grad is not None and torch.equal(got, x.grad)
    assert off.stats.host_copies == 6 and off.stats.copies_avoided == 0


def test_hooks_nest_and_reenter():
    x = torch.randn(128, requires_grad=True)
    outer, inner = SavedTensorOffload(min_bytes=0), SavedTensorOffload(min_bytes=0)
    with outer:
        a = x.exp()  # outer
        with inner:
            b = a.sin()  # inner: saves a
            with outer:  # the same object re-entered
                c = b.tanh()  # outer: saves tanh's output
            d = c.sigmoid()  # inner: saves sigmoid's output
        e = (d * 2).exp()  # outer
    assert inner.stats.tensors_packed == 2 and outer.stats.tensors_packed == 3
    assert outer._stack == [] and inner._stack == []
    e.sum().backward()
    assert x.grad is not None
    got = x.grad.clone()
    x.grad = None
    ((x.exp().sin().tanh().sigmoid() * 2).exp()).sum().backward()
    assert x.grad is not None and torch.equal(got, x.grad)


def test_exception_inside_context_leaves_no_hooks_or_host_memory():
    x = torch.randn(1000, requires_grad=True)
    off = SavedTensorOffload(min_bytes=0)

    def boom() -> None:
        with off:
            y = x.exp().sin()
            assert off.stats.host_bytes > 0
            raise RuntimeError(f"fail {y.shape}")

    with pytest.raises(RuntimeError, match="fail"):
        boom()
    gc.collect()
    assert off.stats.host_bytes == 0 and off.stats.peak_host_bytes > 0
    packed = off.stats.tensors_packed
    (x.exp() * x).sum().backward()  # outside: the hooks are gone
    assert off.stats.tensors_packed == packed

    layer = torch.nn.Linear(8, 8)
    handle = off.attach(layer)
    with pytest.raises(RuntimeError):
        layer(torch.randn(3, 9))  # shape error inside the attached forward
    handle.remove()
    assert off._stack == []


def test_stats_add_up_over_repeated_backward():
    w = torch.randn(64, 64, requires_grad=True)
    with SavedTensorOffload(min_bytes=0) as off:
        h = torch.tanh(w @ w)
        loss = (h * h.t()).sum() + (h @ w).sum()
    s = off.stats
    moved = s.bytes_to_host
    loss.backward(retain_graph=True)
    assert s.bytes_to_device == moved and s.device_bytes == 0
    loss.backward()  # once more per backward
    assert s.bytes_to_device == 2 * moved and s.restores == 2 * s.host_copies
    _check_invariants(s)
    # a saved tensor read by hand, outside backward, still comes back right
    with SavedTensorOffload(min_bytes=0) as off2:
        y = w.exp()
    assert y.grad_fn is not None
    assert torch.equal(y.grad_fn._saved_result, y)  # type: ignore[attr-defined]
    assert off2.stats.restores == 1
    text = str(s)
    assert "copies avoided" in text and s.to_dict()["bytes_moved"] == s.bytes_moved


def test_fake_tensors_run_through_the_hooks_with_the_same_stats():
    def run() -> OffloadStats:
        torch.manual_seed(0)
        w = torch.randn(128, 128, requires_grad=True)
        with SavedTensorOffload(min_bytes=0) as off:
            h = torch.tanh(w @ w)
            loss = (h * h.t()).sum()
        loss.backward()
        assert w.grad is not None and w.grad.shape == w.shape
        return off.stats

    real = run()
    with FakeTensorMode():
        fake = run()
    assert fake.to_dict() == real.to_dict()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        SavedTensorOffload(min_bytes=-1)
