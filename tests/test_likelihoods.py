"""The softmax kernel choice and the cross-entropy's rows and targets, against their definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jvp, vmap

from pushforward.core.softmax import FEW_CLASSES, softmax
from pushforward.curvature.likelihoods import CrossEntropy

DT = torch.float64


@pytest.mark.parametrize("K", [1, 2, 3, 10, FEW_CLASSES - 1, FEW_CLASSES, FEW_CLASSES + 1, 100])
@pytest.mark.parametrize("lead", [(), (5,), (4, 3), (0,), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_is_torch_softmax(K, lead, dtype):
    """Either kernel: torch's softmax over the last dimension, contiguous, of the input's shape."""
    g = torch.Generator().manual_seed(K)
    f = (torch.randn(*lead, K, generator=g) * 10).to(dtype)
    p = softmax(f)
    assert p.shape == f.shape and p.dtype == dtype and p.is_contiguous()
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(p, torch.softmax(f, -1), rtol=tol, atol=tol)


def test_softmax_extreme_logits_stay_finite():
    """The maximum is subtracted on both kernels: logits of 1e4 give probabilities, not NaN."""
    f = torch.tensor([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4]], dtype=torch.float32)
    p = softmax(f)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.softmax(f, -1))


def test_softmax_transforms():
    """Autograd (gradcheck), forward mode and vmap go through the kernel for few classes."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 10, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(softmax, (f,))
    assert torch.autograd.gradgradcheck(softmax, (f,))
    v = torch.randn(6, 10, generator=g, dtype=DT)
    expected = jvp(lambda t: torch.softmax(t, -1), (f.detach(),), (v,))
    found = jvp(softmax, (f.detach(),), (v,))
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(vmap(softmax)(f.detach()), torch.softmax(f.detach(), -1))


def _hessian(f: torch.Tensor) -> torch.Tensor:
    """``diag(p) - p p^T`` per position ``(..., K, K)``: the cross-entropy's Hessian."""
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4),
    n=st.integers(1, 3),
    K=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    ignore_index=st.sampled_from([-100, 0]),
)
def test_cross_entropy_factor_rows_give_the_hessian(B, n, K, seed, ignore_index):
    """``K - 1`` rows per position whose outer products sum to ``diag(p) - p p^T``; zero rows at
    positions whose target is the ignore index (and one zero row for ``K = 1``)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, n, K, generator=g, dtype=DT) * 3
    y = torch.randint(0, K, (B, n), generator=g)
    y[0, 0] = ignore_index
    lik = CrossEntropy(ignore_index=ignore_index)
    C = lik.factor(f, y)
    assert C.shape == (B, n, max(K - 1, 1), K)
    counted = (y != ignore_index).to(DT)[..., None, None]
    expected = _hessian(f) * counted
    torch.testing.assert_close(C.transpose(-1, -2) @ C, expected, rtol=1e-12, atol=1e-14)
    assert not C[0, 0].any()  # the ignored position: zero rows


def test_cross_entropy_factor_soft_targets_and_gradients():
    """Soft targets mask nothing; the rows are differentiable in the logits (gradcheck)."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 2, 10, generator=g, dtype=DT, requires_grad=True)
    soft = torch.softmax(torch.randn(3, 2, 10, generator=g, dtype=DT), -1)
    lik = CrossEntropy()
    C = lik.factor(f, soft)
    torch.testing.assert_close(C.transpose(-1, -2) @ C, _hessian(f), rtol=1e-12, atol=1e-14)
    y = torch.randint(0, 10, (3, 2), generator=g)
    y[1, 1] = -100
    assert torch.autograd.gradcheck(lambda t: lik.factor(t, y), (f,))
    assert torch.autograd.gradcheck(lambda t: lik.factor(t, soft), (f,))


def test_cross_entropy_gradient_and_hessian_product():
    """``softmax(f) - onehot(y)`` and ``(diag(p) - p p^T) v``, zero at ignored positions."""
    g = torch.Generator().manual_seed(2)
    f = torch.randn(5, 7, generator=g, dtype=DT)
    y = torch.tensor([0, 6, -100, 3, 1])
    lik = CrossEntropy()
    mask = (y != -100).to(DT)[:, None]
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), 7).to(DT)
    torch.testing.assert_close(lik.gradient(f, y), (torch.softmax(f, -1) - onehot) * mask)
    v = torch.randn(2, 5, 7, generator=g, dtype=DT)
    expected = torch.einsum("tkl,mtl->mtk", _hessian(f), v) * mask
    torch.testing.assert_close(lik.hessian_product(f, y, v), expected)


@pytest.mark.parametrize(
    ("ignore_index", "y"),
    [
        (-100, [0, 9, 4]),
        (-100, [0, -100, 9]),
        (0, [0, 9, 4]),  # an ignore index among the classes
        (-100, []),
    ],
)
def test_class_targets_accepted(ignore_index, y):
    """Indices in ``[0, K)`` and the ignore index come back as ``(B, n)`` int64."""
    y = torch.tensor(y, dtype=torch.int32)
    out = CrossEntropy(ignore_index).prepare_targets(y, torch.Size((len(y), 1, 10)))
    assert out.dtype == torch.int64 and out.shape == (len(y), 1)
    assert out.flatten().tolist() == y.tolist()


@pytest.mark.parametrize("y", [[0, 10, 4], [0, -1, 4], [-100, 10, 3], [11, -5, 2]])
def test_class_targets_out_of_range_are_refused(y):
    """An index outside ``[0, K)`` that is not the ignore index: a clear error naming it."""
    bad = [v for v in y if (v < 0 or v >= 10) and v != -100]
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)") as err:
        CrossEntropy().prepare_targets(torch.tensor(y), torch.Size((3, 1, 10)))
    assert str(sorted(bad)) in str(err.value)
