"""The operator contract (``pushforward.testing.check_covariance_operator``) on every operator:
the hand-built cases of test_covariance.py and random ones over random layouts (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_covariance import CASES, LAYOUT
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Isotropic,
    Kronecker,
    KroneckerEigen,
    KroneckerFactors,
    LowRank,
    LowRankPrecision,
    Subset,
)
from pushforward.testing import check_covariance_operator

DT = torch.float64


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_case_meets_the_contract(name):
    op, ref = CASES[name]()
    check_covariance_operator(op, ref, layout=LAYOUT)


def test_the_contract_catches_a_wrong_operator():
    class WrongDiagonal(Diagonal):
        def diagonal(self) -> Tensor:
            return super().diagonal() * 1.01

    v = torch.rand(LAYOUT.num_params, dtype=DT) + 0.1
    with pytest.raises(AssertionError, match="diagonal"):
        check_covariance_operator(WrongDiagonal(v), torch.diag(v), layout=LAYOUT)


# -- random operators over random layouts -------------------------------------------------------
def _spd(n: int, g: torch.Generator, rank: int | None = None) -> Tensor:
    A = torch.randn(n, rank or n, generator=g, dtype=DT) / math.sqrt(rank or n)
    return A @ A.T + (0.0 if rank else 0.3) * torch.eye(n, dtype=DT)


def _orthogonal(n: int, g: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]


shapes = st.one_of(
    st.tuples(st.integers(1, 4)),
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2)),
)


@st.composite
def layouts(draw) -> ParamLayout:
    n = draw(st.integers(1, 3))
    parts = draw(st.lists(shapes, min_size=n, max_size=n))
    names = tuple(f"p{i}" for i in range(n))
    return ParamLayout(names, dict(zip(names, parts, strict=True)))


def _block(shape, kind: str, g: torch.Generator):
    """One parameter's Kronecker block (operator) and its dense matrix."""
    n = math.prod(shape)
    if len(shape) == 1 or kind == "dense":
        C = _spd(n, g)
        return Dense(C), C
    out, inn = shape[0], n // shape[0]
    if kind == "factors":
        B, A = _spd(out, g), _spd(inn, g, rank=max(1, inn - 1))
        return KroneckerFactors(B, A), torch.kron(B, A)
    Qo, Qi = _orthogonal(out, g), _orthogonal(inn, g)
    E = torch.rand(out, inn, generator=g, dtype=DT)
    Q = torch.kron(Qo, Qi)
    return KroneckerEigen(Qo, Qi, E), Q @ torch.diag(E.reshape(-1)) @ Q.T


def _operator(kind: str, layout: ParamLayout, seed: int):
    g = torch.Generator().manual_seed(seed)
    P = layout.num_params
    if kind == "diagonal":
        v = torch.rand(P, generator=g, dtype=DT)
        return Diagonal(v), torch.diag(v)
    if kind == "isotropic":
        return Isotropic(torch.tensor(0.7, dtype=DT)), 0.7 * torch.eye(P, dtype=DT)
    if kind == "dense":
        S = _spd(P, g, rank=max(1, P // 2))
        return Dense(S), S
    if kind == "lowrank":
        k = max(1, P // 2)
        U, lam, d = (
            torch.randn(P, k, generator=g, dtype=DT),
            torch.rand(k, generator=g, dtype=DT),
            torch.rand(P, generator=g, dtype=DT),
        )
        return LowRank(U, lam, d), U @ torch.diag(lam) @ U.T + torch.diag(d)
    if kind == "lowrank_precision":
        k = max(1, P // 2)
        U, lam = torch.randn(P, k, generator=g, dtype=DT), torch.rand(k, generator=g, dtype=DT)
        d = torch.rand(P, generator=g, dtype=DT) + 0.5
        prec = U @ torch.diag(lam) @ U.T + torch.diag(d)
        return LowRankPrecision(U, lam, d), torch.linalg.inv(prec)
    if kind == "kronecker":
        blocks, dense = {}, torch.zeros(P, P, dtype=DT)
        for i, name in enumerate(layout.names):
            op, M = _block(layout.shapes[name], ("factors", "eigen", "dense")[i % 3], g)
            blocks[name] = op
            sl = layout.slices[name]
            dense[sl, sl] = M
        return Kronecker(blocks), dense
    if kind == "block_diagonal":
        first = layout.names[0]
        inner, M = _operator("lowrank_precision", layout.sub([first]), seed + 1)
        dense = 0.2 * torch.eye(P, dtype=DT)
        sl = layout.slices[first]
        dense[sl, sl] = M
        return BlockDiagonal({first: inner}, default=Isotropic(0.2)), dense
    # subset: a dense covariance over a random half of the coordinates, zero elsewhere
    index = torch.randperm(P, generator=g)[: max(1, P // 2)]
    S = _spd(index.numel(), g)
    dense = torch.zeros(P, P, dtype=DT)
    dense[index[:, None], index[None, :]] = S
    return Subset(Dense(S), index, P), dense


KINDS = [
    "diagonal",
    "isotropic",
    "dense",
    "lowrank",
    "lowrank_precision",
    "kronecker",
    "block_diagonal",
    "subset",
]


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_random_operators_meet_the_contract(layout, kind, seed):
    op, dense = _operator(kind, layout, seed)
    check_covariance_operator(op, dense, layout=layout, seed=seed)
