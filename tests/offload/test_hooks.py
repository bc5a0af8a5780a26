"""OffloadHooks: exact gradients, one host copy per storage, views rebuilt, nothing left behind."""

from __future__ import annotations

import gc

import pytest
import torch

from edkm.offload.hooks import HookStats, OffloadHooks, offload_saved_tensors
from tests.conftest import make_tiny_llama


def _grads(model, ids, hooks=None):
    model.zero_grad(set_to_none=True)
    if hooks is None:
        loss = model(ids, labels=ids).loss
    else:
        with hooks:
            loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_identities(s: HookStats) -> None:
    assert s.tensors_packed == s.tensors_kept + s.tensors_offloaded
    assert s.tensors_offloaded == s.host_copies + s.copies_avoided
    assert s.bytes_packed == s.bytes_kept + s.bytes_offloaded
    assert s.bytes_moved == s.bytes_to_host + s.bytes_to_device


def test_tiny_llama_gradients_bit_identical():
    model = make_tiny_llama().train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loss0, g0 = _grads(model, ids)
    hooks = OffloadHooks(min_bytes=0, device="cpu", offload_parameters=True)
    loss1, g1 = _grads(model, ids, hooks)
    assert torch.equal(loss0, loss1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    s = hooks.stats
    _check_identities(s)
    assert s.host_copies > 0 and s.copies_avoided > 0
    assert s.bytes_to_host == s.bytes_to_device  # each storage restored once
    assert s.restores == s.host_copies
    assert s.host_bytes == 0 and s.device_bytes == 0


def test_attach_to_decoder_layers_gradients_identical():
    model = make_tiny_llama().train()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    _, g0 = _grads(model, ids)
    hooks, handles = offload_saved_tensors(model.model.layers, min_bytes=0, device="cpu")
    _, g1 = _grads(model, ids)
    for h in handles:
        h.remove()
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert hooks.stats.host_copies > 0 and hooks.stats.host_bytes == 0


def test_two_views_of_one_storage_one_host_copy():
    x = torch.randn(64, 64, requires_grad=True)
    hooks = OffloadHooks(min_bytes=0, device="cpu")
    with hooks:
        y = x.exp()  # saves its output y
        z = y.t()
        out = (z * y).sum()  # mul saves z and y: same storage as exp's output
    s = hooks.stats
    assert s.host_copies == 1 and s.copies_avoided == 2
    assert s.bytes_to_host == 64 * 64 * 4 and s.host_bytes == 64 * 64 * 4
    out.backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2.exp()
    (y2.t() * y2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert s.restores == 1 and s.bytes_to_device == 64 * 64 * 4
    _check_identities(s)


def test_views_come_back_with_strides_and_offsets():
    base = torch.arange(200, dtype=torch.float32).reshape(10, 20)
    views = [base[2:7, 3:15:2], base.t()[1:], base[5], base.view(-1)[37:], base.view(4, 50)]
    hooks = OffloadHooks(min_bytes=0, device="cpu")
    packed = [hooks._pack(v) for v in views]
    assert hooks.stats.host_copies == 1 and hooks.stats.copies_avoided == len(views) - 1
    base.zero_()  # the host copy must not alias the source
    last_ptr = None
    for v, p in zip(views, packed):
        out = hooks._unpack(p)
        assert out.stride() == v.stride() and out.storage_offset() == v.storage_offset()
        assert out.shape == v.shape
        assert out.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
        assert out.untyped_storage().data_ptr() == last_ptr or last_ptr is None
        last_ptr = out.untyped_storage().data_ptr()
    # one device copy shared by every view of this round
    assert hooks.stats.restores == 1
    rebuilt = hooks._unpack(packed[-1])  # a second round: a second restore
    assert hooks.stats.restores == 2
    assert torch.equal(rebuilt.reshape(-1), torch.arange(200, dtype=torch.float32))
    assert torch.equal(hooks._unpack(packed[0]), rebuilt.view(10, 20)[2:7, 3:15:2])
    del packed, p
    gc.collect()
    assert hooks.stats.host_bytes == 0 and hooks.stats.device_bytes == 0


def test_dtype_views_and_noncontiguous_saved_in_graph():
    a = torch.randn(32, 48, requires_grad=True)
    with OffloadHooks(min_bytes=0, device="cpu") as hooks:
        y = a.sigmoid()  # saves the output
        loss = (y[:, ::3] * y.t()[::3].t()).pow(2).sum()
    loss.backward()
    a2 = a.detach().clone().requires_grad_(True)
    y2 = a2.sigmoid()
    (y2[:, ::3] * y2.t()[::3].t()).pow(2).sum().backward()
    assert torch.equal(a.grad, a2.grad)
    assert hooks.stats.copies_avoided >= 1


def test_threshold_and_parameters_are_kept():
    lin = torch.nn.Linear(16, 16)
    x0 = torch.randn(4, 16, requires_grad=True)
    x = x0 * 1  # a non-leaf input: offloadable
    with OffloadHooks(min_bytes=1 << 30, device="cpu") as big:
        lin(x).sum().backward()
    assert big.stats.tensors_offloaded == 0 and big.stats.tensors_kept > 0
    x = x0 * 1
    with OffloadHooks(min_bytes=0, device="cpu") as small:
        lin(x).sum().backward()
    assert small.stats.tensors_kept >= 1  # the weight (a Parameter)
    assert small.stats.tensors_offloaded >= 1  # the input
    x = x0 * 1
    with OffloadHooks(min_bytes=0, device="cpu") as kept:
        kept.keep(x)
        lin(x).sum().backward()
    assert kept.stats.tensors_offloaded == 0


def test_inplace_write_after_pack_makes_new_copy():
    x = torch.randn(100, requires_grad=True)
    hooks = OffloadHooks(min_bytes=0, device="cpu")
    buf = torch.randn(100)
    p1 = hooks._pack(buf)
    buf.mul_(2)
    p2 = hooks._pack(buf)
    assert hooks.stats.host_copies == 2
    assert torch.equal(hooks._unpack(p2), buf) and not torch.equal(hooks._unpack(p1), buf)
    del p1, p2, x


def test_nested_hooks():
    x = torch.randn(128, 128, requires_grad=True)
    outer = OffloadHooks(min_bytes=0, device="cpu")
    inner = OffloadHooks(min_bytes=0, device="cpu")
    with outer:
        y = x.exp()
        with inner:
            z = y.sin()
        with outer:  # re-entering the same object nests too
            w = z.cos()
        loss = (w * y).sum()
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2.exp()
    (y2.sin().cos() * y2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert inner.stats.tensors_packed == 1 and outer.stats.tensors_packed >= 3
    assert outer.stats.host_bytes == 0 and inner.stats.host_bytes == 0


def test_exception_inside_context_leaves_nothing_behind():
    x = torch.randn(256, 256, requires_grad=True)
    hooks = OffloadHooks(min_bytes=0, device="cpu")
    with pytest.raises(RuntimeError, match="boom"), hooks:
        y = x.exp().sin()
        raise RuntimeError("boom")
    assert hooks.stats.host_bytes > 0
    del y
    gc.collect()
    assert hooks.stats.host_bytes == 0 and not hooks._entries
    # saving outside the context is untouched
    z = x.exp()
    z.sum().backward()
    assert hooks.stats.tensors_packed == 2


def test_retain_graph_restores_once_per_backward():
    x = torch.randn(64, 64, requires_grad=True)
    with OffloadHooks(min_bytes=0, device="cpu") as hooks:
        y = x.exp()
        loss = (y * y).sum()
    loss.backward(retain_graph=True)
    first = hooks.stats.restores
    loss.backward()
    assert hooks.stats.restores == 2 * first
    del loss, y
    gc.collect()
    assert hooks.stats.host_bytes == 0 and hooks.stats.device_bytes == 0


def test_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4096, 4096, requires_grad=True)
        with OffloadHooks(min_bytes=0, device="cpu") as hooks:
            y = x.exp()
            loss = (y * y.t()).sum()
        loss.backward()
    s = hooks.stats
    assert s.host_copies == 1 and s.copies_avoided == 2 and s.bytes_to_host == 4096 * 4096 * 4
    _check_identities(s)


def test_stats_str_and_dict():
    s = HookStats(bytes_to_host=3, bytes_to_device=4)
    assert s.to_dict()["bytes_moved"] == 7 and "copies avoided" in str(s)
