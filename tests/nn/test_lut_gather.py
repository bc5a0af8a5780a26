"""Tests for edkm.nn.lut_gather: the fast LUT gather against its reference and an fp64 oracle,
and what it keeps alive for backward."""

from __future__ import annotations

import pytest
import torch

from edkm.nn.lut_gather import lut_gather, lut_gather_reference


@pytest.mark.parametrize("group_size", [None, 1, 4])
@pytest.mark.parametrize("shape", [(8, 5), (12, 31)])
def test_gather_matches_the_reference(group_size, shape):
    g = torch.Generator().manual_seed(0)
    groups = 1 if group_size is None else shape[0] // group_size
    lut = torch.randn(groups, 8, generator=g)
    idx = torch.randint(0, 8, shape, generator=g, dtype=torch.uint8)
    up = torch.randn(shape, generator=g)
    for out_dtype in (torch.float32, torch.bfloat16):
        a = lut.clone().requires_grad_(True)
        b = lut.clone().requires_grad_(True)
        wa = lut_gather(a, idx, group_size, out_dtype)
        wb = lut_gather_reference(b, idx, group_size, out_dtype)
        assert wa.dtype == out_dtype and torch.equal(wa, wb)
        (wa.float() * up).sum().backward()
        (wb.float() * up).sum().backward()
        # the LUT gradient: the sum of the upstream gradients of the weights using each entry
        oracle = torch.zeros(groups, 8, dtype=torch.float64)
        rows = torch.arange(shape[0]) // (shape[0] if group_size is None else group_size)
        grad_up = up.to(out_dtype).double()
        oracle.index_put_((rows.unsqueeze(1).expand(shape), idx.long()), grad_up, accumulate=True)
        torch.testing.assert_close(a.grad.double(), oracle, rtol=1e-5, atol=1e-5)
        if out_dtype == torch.float32:  # the reference accumulates in bf16 otherwise
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_gather_saves_only_the_uint8_index_buffer_for_backward():
    # the int64 flat indices (8 bytes per weight) must not stay alive until backward
    lut = torch.randn(2, 8, requires_grad=True)
    idx = torch.randint(0, 8, (6, 10), dtype=torch.uint8)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        w = lut_gather(lut, idx, group_size=3)
    assert len(saved) == 1 and saved[0].dtype == torch.uint8
    assert saved[0].data_ptr() == idx.data_ptr()  # the buffer itself, no copy
    w.sum().backward()
    counts = torch.stack(
        [torch.bincount(idx[r * 3 : r * 3 + 3].long().reshape(-1), minlength=8) for r in range(2)]
    )
    torch.testing.assert_close(lut.grad, counts.float())
