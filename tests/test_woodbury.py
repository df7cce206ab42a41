"""The one Woodbury inverse square root (``inv_sqrt_update``) behind the square-root factors of
``LowRankPrecision`` and ``PrecisionUpdate``: exact against an eigendecomposition of the
``m x m`` matrix, for wide, tall and rank-deficient ``B``, and both operators' factors are it."""

from __future__ import annotations

import pytest
import torch

import pushforward as pf
from pushforward.covariance import PrecisionUpdate
from pushforward.covariance.checks import inv_sqrt_update, inv_sqrt_update_rows

D = torch.float64


def _reference(B: torch.Tensor) -> torch.Tensor:
    """``(I + B B^T)^{-1/2}`` from the eigendecomposition of the ``m x m`` matrix."""
    s, V = torch.linalg.eigh(torch.eye(B.shape[0], dtype=D) + B @ B.T)
    return V @ torch.diag(s.rsqrt()) @ V.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (6, 6)])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_inverse_square_root_is_exact(shape, rank_deficient):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(*shape, generator=g, dtype=D)
    if rank_deficient:  # a zero column and two equal ones: eigenvalues s = 0 (no division)
        B[:, 0] = 0
        B[:, -1] = B[:, -2]
    BQ, c = inv_sqrt_update(B)
    assert BQ.shape == shape and c.shape == shape[1:]
    factor = inv_sqrt_update_rows(torch.eye(shape[0], dtype=D), BQ, c)
    assert _rel(factor, _reference(B)) <= 1e-13
    assert _rel(factor, factor.T) <= 1e-15  # symmetric
    X = torch.randn(4, shape[0], generator=g, dtype=D)
    assert _rel(inv_sqrt_update_rows(X, BQ, c), X @ _reference(B)) <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_factorized_in_single_precision(dtype):
    B = torch.randn(6, 2, generator=torch.Generator().manual_seed(1)).to(dtype)
    BQ, c = inv_sqrt_update(B)
    assert BQ.dtype == c.dtype == dtype
    factor = inv_sqrt_update_rows(torch.eye(6, dtype=dtype), BQ, c).double()
    assert _rel(factor, _reference(B.double())) <= 20 * torch.finfo(dtype).eps


def test_both_operators_use_it():
    """The square-root factor of each operator is its base factor times the symmetric
    ``(I + B B^T)^{-1/2}`` of its own ``B``: ``W`` for LowRankPrecision, ``(A L)^T`` for
    PrecisionUpdate (``A`` the weighted rows, ``L`` the base's factor)."""
    g = torch.Generator().manual_seed(2)
    P = 9
    U = torch.randn(P, 3, generator=g, dtype=D)
    eigvals, diag = (
        torch.rand(3, generator=g, dtype=D) + 0.1,
        torch.rand(P, generator=g, dtype=D) + 0.5,
    )
    lrp = pf.LowRankPrecision(U, eigvals, diag)
    W = U * eigvals.sqrt() / diag.sqrt().unsqueeze(-1)
    want = torch.diag(diag.rsqrt()) @ _reference(W)
    assert _rel(lrp.sqrt_dense(), want) <= 1e-13
    A = torch.randn(P, P, generator=g, dtype=D)
    base = pf.Dense(A @ A.T / P + torch.eye(P, dtype=D))
    rows, weights = torch.randn(4, P, generator=g, dtype=D), torch.rand(4, generator=g, dtype=D)
    update = PrecisionUpdate(base, rows, weights)
    L = base.sqrt_dense()
    N = (rows * weights.sqrt().unsqueeze(-1)) @ L
    assert _rel(update.sqrt_dense(), L @ _reference(N.T)) <= 1e-13
    for op in (lrp, update):  # and the factors are square roots of the covariances
        S = op.sqrt_dense()
        assert _rel(S @ S.T, op.to_dense()) <= 1e-12
