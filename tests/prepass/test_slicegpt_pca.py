"""The PCA of SliceGPT against a plain reference."""

from __future__ import annotations

import torch

from edkm.prepass.slicegpt_pca import DAMPING, PCAAccumulator, random_orthogonal, rms_normalize


def test_pca_matches_a_plain_eigendecomposition_with_padding_masked():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    acc = PCAAccumulator(6)
    acc.add(x[:2], mask[:2])
    acc.add(x[2:], mask[2:])
    values, q = acc.finish()
    rows = x.reshape(-1, 6)[mask.reshape(-1) == 1].double()
    assert acc.tokens == rows.shape[0] == 13
    gram = rows.T @ rows
    gram += DAMPING * gram.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    ref_values = torch.linalg.eigvalsh(gram).flip(0)
    assert torch.allclose(values, ref_values)
    assert bool((values[:-1] >= values[1:]).all())  # descending
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(gram @ q, q * values, atol=1e-9)  # eigenpairs, in that order
    # padding left out: a huge padded row changes nothing
    x2 = x.clone()
    x2[1, 4] = 1e6
    acc2 = PCAAccumulator(6)
    acc2.add(x2, mask)
    assert torch.allclose(acc2.finish()[0], values)


def test_rms_normalize_and_random_orthogonal():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(
        rms_normalize(x), torch.tensor([[1.0, -1, 1, -1], [2.0, 0, 0, 0]]).double()
    )
    q = random_orthogonal(8, torch.Generator().manual_seed(3))
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, random_orthogonal(8, torch.Generator().manual_seed(4)))
