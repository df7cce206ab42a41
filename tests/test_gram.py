"""``pushforward.core.gram``: ``X^T X`` by blocks on and above the diagonal equals the plain
product for widths that split into 1-4 blocks and uneven edges; the blocks below mirror those
above."""

from __future__ import annotations

import pytest
import torch

from pushforward.core.gram import gram


@pytest.mark.parametrize("d", [1, 63, 64, 128, 130, 257, 784])
def test_gram_equals_the_plain_product(d):
    torch.manual_seed(d)
    X = torch.randn(37, d, dtype=torch.float64)
    G = gram(X)
    torch.testing.assert_close(G, X.T @ X, rtol=1e-13, atol=1e-12)
    k = min(4, d // 64)
    cut = round(d / k) if k >= 2 else d  # the first column block, mirrored below
    assert torch.equal(G[cut:, :cut], G[:cut, cut:].T)


def test_gram_keeps_the_gradient():
    X = torch.randn(5, 200, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: gram(t).sum(), (X,))
