"""PrecisionUpdate (conditioning a covariance on new rows): the operator contract of
tests/test_covariance.py against dense references, float64."""

from __future__ import annotations

import pytest
import test_covariance as tc  # the shared operator contract, run on this module's cases
import torch
from test_covariance import (
    DT,
    LAYOUT,
    TOL,
    P,
    case_block_diagonal_mix,
    case_dense_singular,
    case_kron_decomposed,
    case_kronecker_eigen,
    case_lowrank_precision,
    gen,
    max_err,
    randn,
)

from pushforward.covariance import Diagonal, PrecisionUpdate

CONTRACT = [
    tc.test_block,
    tc.test_dense_and_diagonal,
    tc.test_marginal,
    tc.test_matmul_shapes,
    tc.test_param_groups,
    tc.test_quadratic_rows,
    tc.test_sqrt_factor,
    tc.test_to_dtype,
]

BASES = {
    "kron_decomposed": case_kron_decomposed,
    "kronecker_eigen": case_kronecker_eigen,
    "lowrank_precision": case_lowrank_precision,
    "block_diagonal_mix": case_block_diagonal_mix,
    "dense_singular": case_dense_singular,
}


def updated_case(name: str, n: int = 4, zero_weight: bool = True):
    """(PrecisionUpdate of a base, dense reference of (Σ^{-1} + R^T W R)^{-1} by Woodbury)."""
    base, S = BASES[name]()
    g = gen(70)
    R = randn(n, P, g=g)
    w = torch.rand(n, generator=g, dtype=DT) + 0.5
    if zero_weight:
        w[1] = 0.0
    A = R * w.sqrt()[:, None]
    C = torch.eye(n, dtype=DT) + A @ S @ A.T
    ref = S - S @ A.T @ torch.linalg.solve(C, A @ S)
    return PrecisionUpdate(base.bind(LAYOUT), R, w), 0.5 * (ref + ref.T)


@pytest.fixture(params=sorted(BASES))
def case(request):
    op, ref = updated_case(request.param)
    return op.bind(LAYOUT), ref


@pytest.mark.parametrize("contract", CONTRACT, ids=lambda f: f.__name__)
def test_operator_contract(case, contract):
    contract(case)


def test_equals_inverse_of_updated_precision():
    base, S = case_lowrank_precision()
    g = gen(71)
    R, w = randn(3, P, g=g), torch.rand(3, generator=g, dtype=DT) + 0.1
    op = PrecisionUpdate(base.bind(LAYOUT), R, w)
    ref = torch.linalg.inv(torch.linalg.inv(S) + R.T @ torch.diag(w) @ R)
    assert max_err(op.to_dense(), ref) <= TOL


def test_update_of_update_is_one_update():
    base, _ = case_kron_decomposed()
    base = base.bind(LAYOUT)
    g = gen(72)
    R1, R2 = randn(2, P, g=g), randn(3, P, g=g)
    w1, w2 = torch.rand(2, generator=g, dtype=DT), torch.rand(3, generator=g, dtype=DT)
    nested = PrecisionUpdate(PrecisionUpdate(base, R1, w1), R2, w2)
    once = PrecisionUpdate(base, R1, w1).updated(R2, w2)
    assert once.rows.shape == (5, P) and once.base is base
    assert max_err(nested.to_dense(), once.to_dense()) <= TOL
    L = nested.sqrt_dense()
    assert max_err(L @ L.T, once.to_dense()) <= TOL


def test_gradcheck_rows_weights_and_base():
    layout_p = 5
    g = gen(73)
    R = randn(2, layout_p, g=g).requires_grad_()
    w = (torch.rand(2, generator=g, dtype=DT) + 0.5).requires_grad_()
    v = (torch.rand(layout_p, generator=g, dtype=DT) + 0.5).requires_grad_()
    V = randn(3, layout_p, g=g)

    def quad(R, w, v):
        return PrecisionUpdate(Diagonal(v), R, w).quadratic_rows(V)

    def root(R, w, v):
        return PrecisionUpdate(Diagonal(v), R, w).sqrt_rows(V)

    assert torch.autograd.gradcheck(quad, (R, w, v))
    assert torch.autograd.gradcheck(root, (R, w, v))


def test_errors():
    base = Diagonal(torch.ones(P, dtype=DT)).bind(LAYOUT)
    with pytest.raises(ValueError, match=r"rows must have shape \(n, P=27\)"):
        PrecisionUpdate(base, torch.ones(2, 5, dtype=DT), torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        PrecisionUpdate(base, torch.ones(2, P, dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="weights has 1 negative"):
        PrecisionUpdate(base, torch.ones(2, P, dtype=DT), torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.raises(ValueError, match="rows has 1 non-finite"):
        rows = torch.ones(2, P, dtype=DT)
        rows[0, 0] = float("nan")
        PrecisionUpdate(base, rows, torch.ones(2, dtype=DT))
    with pytest.raises(TypeError, match="base must be a covariance operator"):
        PrecisionUpdate(torch.eye(P, dtype=DT), torch.ones(2, P, dtype=DT), torch.ones(2, dtype=DT))
