"""``pushforward.core.gram``: ``X^T X`` by blocks on and above the diagonal equals the plain
product for widths that split into 1-4 blocks and uneven edges; the blocks below mirror those
above. Running sums by ``add_gram`` are completed once by ``mirror_upper``. ``rows_of`` takes transposed leading dimensions as a view, with the same Gram matrix."""

from __future__ import annotations

import pytest
import torch

from pushforward.core.gram import add_gram, gram, mirror_upper, rows_of


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


def test_rows_of_transposed_rows_is_a_view_with_the_same_gram():
    torch.manual_seed(0)
    backward = torch.randn(9, 6, 1, 70, dtype=torch.float64)  # a batched backward's (r, b, ...)
    rows = backward.transpose(0, 1)  # seen as (b, r, 1, out)
    flat = rows_of(rows)
    assert flat.shape == (54, 70) and flat.data_ptr() == backward.data_ptr()
    assert flat.is_contiguous()  # no copy was made
    torch.testing.assert_close(gram(flat), gram(rows.reshape(-1, 70)), rtol=1e-13, atol=1e-12)
    plain = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.equal(rows_of(plain), plain.reshape(-1, 5))


@pytest.mark.parametrize("d", [30, 130, 784])
def test_running_gram_sums_are_completed_once(d):
    torch.manual_seed(d)
    parts = [torch.randn(n, d, dtype=torch.float64) for n in (5, 17, 3)]
    total = torch.zeros(d, d, dtype=torch.float64)
    for i, X in enumerate(parts):
        total = add_gram(total, X, alpha=0.5 if i == 1 else 1.0)
    expected = sum((0.5 if i == 1 else 1.0) * X.T @ X for i, X in enumerate(parts))
    torch.testing.assert_close(mirror_upper(total), expected, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("d", [30, 130, 784])
def test_a_new_running_sum_does_not_read_its_fresh_memory(d, monkeypatch):
    """``add_gram(None, X)`` writes into uninitialized memory: whatever lies there (NaN here,
    planted by a patched ``new_empty``) must not reach the sum."""
    torch.manual_seed(d)
    parts = [torch.randn(n, d, dtype=torch.float64) for n in (6, 11)]
    poisoned = torch.Tensor.new_empty

    def new_empty(self, *shape, **kwargs):
        return poisoned(self, *shape, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    total = None
    for X in parts:
        total = add_gram(total, X, alpha=2.0)
    expected = sum(2.0 * X.T @ X for X in parts)
    torch.testing.assert_close(mirror_upper(total), expected, rtol=1e-13, atol=1e-12)
