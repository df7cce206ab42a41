"""Covariance operators against dense references built independently (float64, ≤ 1e-12)."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance import (
    BlockDiagonal,
    CovarianceOperator,
    Dense,
    Diagonal,
    Isotropic,
    Kronecker,
    KroneckerEigen,
    KroneckerFactors,
    LowRank,
    LowRankPrecision,
    Marginal,
    Subset,
)

DT = torch.float64
TOL = 1e-12
# a non-square conv weight (out, in, kh, kw) = (3, 2, 2, 1): in_flat = 4
SHAPES = {"conv.weight": (3, 2, 2, 1), "conv.bias": (3,), "lin.weight": (2, 5), "lin.bias": (2,)}
LAYOUT = ParamLayout(tuple(SHAPES), SHAPES)
P = LAYOUT.num_params  # 27


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def spd(n: int, g: torch.Generator, rank: int | None = None, jitter: float = 0.5) -> Tensor:
    """A symmetric PSD matrix of moderate scale (rank ``rank`` and no jitter if given)."""
    A = randn(n, rank or n, g=g) / math.sqrt(rank or n)
    return A @ A.T + (0.0 if rank else jitter) * torch.eye(n, dtype=DT)


def orthogonal(n: int, g: torch.Generator) -> Tensor:
    return torch.linalg.qr(randn(n, n, g=g))[0]


def embed(blocks: dict[tuple[str, ...], Tensor]) -> Tensor:
    """A P x P matrix with ``blocks[names]`` on the flat indices of ``names`` (zeros elsewhere)."""
    out = torch.zeros(P, P, dtype=DT)
    for names, M in blocks.items():
        idx = LAYOUT.index(names)
        out[idx[:, None], idx[None, :]] = M
    return out


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# -- cases: (bound operator, dense reference) ------------------------------------------------------
def case_dense():
    S = spd(P, gen(1))
    return Dense(S), S


def case_dense_cholesky():
    S = spd(P, gen(2))
    return Dense.from_cholesky(torch.linalg.cholesky(S)), S


def case_dense_singular():
    S = spd(P, gen(3), rank=5)
    return Dense(S), S


def case_diagonal_flat():
    v = torch.rand(P, generator=gen(4), dtype=DT)
    return Diagonal(v), torch.diag(v)


def case_diagonal_dict():
    g = gen(5)
    per = {n: torch.rand(SHAPES[n], generator=g, dtype=DT) for n in reversed(SHAPES)}
    flat = torch.cat([per[n].reshape(-1) for n in SHAPES])
    return Diagonal(per), torch.diag(flat)


def case_lowrank():
    g = gen(6)
    U, lam = randn(P, 4, g=g), torch.rand(4, generator=g, dtype=DT)
    return LowRank(U, lam), U @ torch.diag(lam) @ U.T


def case_lowrank_diag():
    g = gen(7)
    U, lam, d = (
        randn(P, 3, g=g),
        torch.rand(3, generator=g, dtype=DT),
        torch.rand(P, generator=g, dtype=DT),
    )
    return LowRank(U, lam, d), U @ torch.diag(lam) @ U.T + torch.diag(d)


def case_lowrank_precision():
    g = gen(8)
    U, lam = randn(P, 4, g=g), 3 * torch.rand(4, generator=g, dtype=DT)
    d = torch.rand(P, generator=g, dtype=DT) + 0.5
    return LowRankPrecision(U, lam, d), torch.linalg.inv(U @ torch.diag(lam) @ U.T + torch.diag(d))


def kron_factors(g: torch.Generator, singular: bool = False) -> dict[str, tuple[Tensor, ...]]:
    return {
        "lin.bias": (spd(2, g),),
        "conv.weight": (spd(3, g), spd(4, g, rank=2) if singular else spd(4, g)),
        "lin.weight": (spd(2, g), spd(5, g)),
        "conv.bias": (spd(3, g),),
    }


def kron_reference(factors: dict[str, tuple[Tensor, ...]]) -> Tensor:
    return embed({(n,): torch.kron(*f) if len(f) == 2 else f[0] for n, f in factors.items()})


def case_kronecker_factors():
    f = kron_factors(gen(9))
    return Kronecker(f), kron_reference(f)


def case_kronecker_singular_factor():
    f = kron_factors(gen(10), singular=True)
    return Kronecker(f), kron_reference(f)


def case_kronecker_eigen():
    g = gen(11)
    spec, blocks = [], {}
    for n, shape in SHAPES.items():
        if len(shape) == 1:
            C = spd(shape[0], g)
            spec.append(C)
            blocks[(n,)] = C
        else:
            out, inn = shape[0], math.prod(shape[1:])
            Qo, Qi, E = (
                orthogonal(out, g),
                orthogonal(inn, g),
                torch.rand(out, inn, generator=g, dtype=DT),
            )
            spec.append(KroneckerEigen(Qo, Qi, E))
            Q = torch.kron(Qo, Qi)
            blocks[(n,)] = Q @ torch.diag(E.reshape(-1)) @ Q.T
    return Kronecker(spec), embed(blocks)


def precision_eigen(g: torch.Generator):
    """laplace-torch-style KronDecomposed pieces over the layout, in its order."""
    vecs, vals = [], []
    for shape in SHAPES.values():
        sides = [shape[0]] if len(shape) == 1 else [shape[0], math.prod(shape[1:])]
        vecs.append([orthogonal(s, g) for s in sides])
        vals.append([2 * torch.rand(s, generator=g, dtype=DT) for s in sides])
    return vecs, vals


def precision_reference(vecs, vals, deltas: Tensor, damping: bool, scale: float) -> Tensor:
    blocks = {}
    for n, Qs, ls, delta in zip(SHAPES, vecs, vals, deltas, strict=True):
        ls = [scale ** (1 / len(ls)) * lam for lam in ls]
        if len(ls) == 1:
            Q, prec = Qs[0], ls[0] + delta
        elif damping:
            Q, prec = torch.kron(*Qs), torch.kron(ls[0] + delta.sqrt(), ls[1] + delta.sqrt())
        else:
            Q, prec = torch.kron(*Qs), torch.kron(ls[0], ls[1]) + delta
        blocks[(n,)] = torch.linalg.inv(Q @ torch.diag(prec) @ Q.T)
    return embed(blocks)


def case_kron_decomposed():
    vecs, vals = precision_eigen(gen(12))
    deltas = torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=DT)  # per-parameter prior precision
    kd = SimpleNamespace(eigenvectors=vecs, eigenvalues=vals, deltas=deltas, damping=False)
    op = Kronecker.from_kron_decomposed(kd, scale=0.7)
    return op, precision_reference(vecs, vals, deltas, damping=False, scale=0.7)


def case_kron_decomposed_damped():
    vecs, vals = precision_eigen(gen(13))
    kd = SimpleNamespace(
        eigenvectors=vecs, eigenvalues=vals, deltas=torch.zeros(4, dtype=DT), damping=True
    )
    op = Kronecker.from_kron_decomposed(kd, prior_precision=0.8, scale=2.0)
    return op, precision_reference(
        vecs, vals, torch.full((4,), 0.8, dtype=DT), damping=True, scale=2.0
    )


def case_isotropic():
    return Isotropic(torch.tensor(0.3, dtype=DT)), 0.3 * torch.eye(P, dtype=DT)


def case_block_diagonal_mix():
    g = gen(14)
    B, A, S = spd(3, g), spd(4, g), spd(5, g)
    op = BlockDiagonal(
        {"conv.weight": Kronecker({"conv.weight": (B, A)}), ("lin.bias", "conv.bias"): Dense(S)},
        default=Isotropic(0.4),
    )
    ref = embed(
        {
            ("conv.weight",): torch.kron(B, A),
            ("conv.bias", "lin.bias"): S,
            ("lin.weight",): 0.4 * torch.eye(10, dtype=DT),
        }
    )
    return op, ref


def case_block_diagonal_prefix():
    g = gen(15)
    U, lam, d = (
        randn(12, 2, g=g),
        torch.rand(2, generator=g, dtype=DT),
        torch.rand(12, generator=g, dtype=DT) + 1,
    )
    per = {
        "conv.weight": torch.rand(3, 2, 2, 1, generator=g, dtype=DT),
        "conv.bias": torch.rand(3, generator=g, dtype=DT),
    }
    op = BlockDiagonal({"lin": LowRankPrecision(U, lam, d), "conv": Diagonal(per)})
    ref = embed(
        {
            ("lin.weight", "lin.bias"): torch.linalg.inv(U @ torch.diag(lam) @ U.T + torch.diag(d)),
            ("conv.weight", "conv.bias"): torch.diag(
                torch.cat([t.reshape(-1) for t in per.values()])
            ),
        }
    )
    return op, ref


def subset_indices() -> Tensor:
    return torch.randperm(P, generator=gen(16))[:9]


def case_subset_dense():
    S, idx = spd(9, gen(17)), subset_indices()
    ref = torch.zeros(P, P, dtype=DT)
    ref[idx[:, None], idx[None, :]] = S
    return Subset(Dense(S), idx, P), ref


def case_subset_diagonal():
    v, idx = torch.rand(9, generator=gen(18), dtype=DT), subset_indices()
    ref = torch.zeros(P, P, dtype=DT)
    ref[idx, idx] = v
    return Subset(Diagonal(v), idx, P), ref


CASES: dict[str, Callable[[], tuple[CovarianceOperator, Tensor]]] = {
    name[len("case_") :]: fn for name, fn in dict(globals()).items() if name.startswith("case_")
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> tuple[CovarianceOperator, Tensor]:
    op, ref = CASES[request.param]()
    return op.bind(LAYOUT), ref


# -- every operator against its reference ---------------------------------------------------------
def test_dense_and_diagonal(case):
    op, ref = case
    assert op.num_params == P and op.dtype == DT and op.layout == LAYOUT
    assert max_err(op.to_dense(), ref) <= TOL
    assert max_err(op.diagonal(), ref.diagonal()) <= TOL


def test_matmul_shapes(case):
    op, ref = case
    g = gen(20)
    v, V, W = randn(P, g=g), randn(P, 3, g=g), randn(2, 4, P, g=g)
    assert max_err(op.matmul(v), ref @ v) <= TOL
    assert max_err(op.matmul(V), ref @ V) <= TOL
    assert max_err(op @ V, ref @ V) <= TOL
    # rows (the one deliberate change of the covariance protocol: matmul is columns only)
    assert (W @ op).shape == (2, 4, P)
    assert max_err(W @ op, W @ ref) <= TOL
    assert max_err(op.matmul_rows(W[0]), W[0] @ ref) <= TOL
    with pytest.raises(ValueError, match="for rows use matmul_rows"):
        op.matmul(W)
    # n rows with n == P are rows, never read as columns
    square = randn(P, P, g=g)
    assert max_err(square @ op, square @ ref) <= TOL


def test_sqrt_factor(case):
    op, ref = case
    L = op.sqrt_dense()
    r = op.sqrt_cols
    assert L.shape == (P, r)
    assert max_err(L @ L.T, ref) <= TOL
    g = gen(21)
    z, Z, Zb = randn(r, g=g), randn(r, 3, g=g), randn(2, 5, r, g=g)
    assert max_err(op.sqrt_matmul(z), L @ z) <= TOL
    assert max_err(op.sqrt_matmul(Z), L @ Z) <= TOL
    assert max_err(op.sqrt_rows(Zb.reshape(-1, r)), Zb.reshape(-1, r) @ L.T) <= TOL
    v, V, Vb = randn(P, g=g), randn(P, 3, g=g), randn(2, 5, P, g=g)
    assert max_err(op.sqrt_t_matmul(v), L.T @ v) <= TOL
    assert max_err(op.sqrt_t_matmul(V), L.T @ V) <= TOL
    assert max_err(op.sqrt_t_rows(Vb.reshape(-1, P)), Vb.reshape(-1, P) @ L) <= TOL


def test_quadratic_rows(case):
    op, ref = case
    V = randn(6, P, g=gen(22))
    assert max_err(op.quadratic_rows(V), torch.einsum("np,pq,nq->n", V, ref, V)) <= TOL


def test_block(case):
    op, ref = case
    for name in LAYOUT.names:
        blk = op.block(name)
        sl = LAYOUT.slices[name]
        assert blk.layout == LAYOUT.sub([name])
        assert max_err(blk.to_dense(), ref[sl, sl]) <= TOL
        L = blk.sqrt_dense()
        assert max_err(L @ L.T, ref[sl, sl]) <= TOL


def test_param_groups(case):
    op, ref = case
    groups = op.param_groups()
    covered = [n for grp in groups for n in grp.names]
    assert sorted(covered) == sorted(LAYOUT.names)  # a partition: every parameter exactly once
    label = torch.empty(P, dtype=torch.long)
    for i, grp in enumerate(groups):
        idx = LAYOUT.index(grp.names)
        label[idx] = i
        assert grp.operator.layout == LAYOUT.sub(grp.names)
        assert max_err(grp.operator.to_dense(), ref[idx[:, None], idx[None, :]]) <= TOL
        L = grp.operator.sqrt_dense()
        assert max_err(L @ L.T, ref[idx[:, None], idx[None, :]]) <= TOL
    across = label[:, None] != label[None, :]
    assert (ref[across] == 0).all()  # groups are uncorrelated


def test_marginal(case):
    op, ref = case
    idx = torch.tensor([20, 3, 14, 0, 26, 7])
    m = op.marginal(idx)
    sub = ref[idx[:, None], idx[None, :]]
    assert max_err(m.to_dense(), sub) <= TOL
    assert max_err(m.diagonal(), sub.diagonal()) <= TOL
    L = m.sqrt_dense()
    assert max_err(L @ L.T, sub) <= TOL


def test_to_dtype(case):
    op, ref = case
    low = op.to(torch.float32)
    assert low.dtype == torch.float32 and low.layout == LAYOUT
    assert max_err(low.to_dense().double(), ref) <= 1e-5 * max(1.0, ref.abs().max().item())


# -- structure-specific access ----------------------------------------------------------------------
def test_kronecker_factors_access():
    f = kron_factors(gen(30))
    op = Kronecker(f).bind(LAYOUT)
    fw = op.factors("conv.weight")
    assert isinstance(fw, KroneckerFactors)
    assert fw.out_factor is f["conv.weight"][0] and fw.in_factor is f["conv.weight"][1]
    assert fw.out_factor.shape == (3, 3) and fw.in_factor.shape == (4, 4)
    assert torch.equal(op.factors("conv.bias"), f["conv.bias"][0])
    assert isinstance(op.block("lin.weight"), Kronecker)
    assert op.block("lin.weight").factors("lin.weight").in_factor is f["lin.weight"][1]


def test_kronecker_eigen_access_from_precision():
    vecs, vals = precision_eigen(gen(31))
    op = Kronecker.from_precision_eigen(vecs, vals, deltas=0.5, damping=True).bind(LAYOUT)
    fw = op.factors("lin.weight")
    assert isinstance(fw, KroneckerEigen) and fw.eigvals.shape == (2, 5)
    root = torch.tensor(0.5, dtype=DT).sqrt()
    expected = 1 / torch.outer(vals[2][0] + root, vals[2][1] + root)
    assert max_err(fw.eigvals, expected) <= TOL
    Q = torch.kron(fw.out_eigvecs, fw.in_eigvecs)
    sl = LAYOUT.slices["lin.weight"]
    assert max_err(Q @ torch.diag(fw.eigvals.reshape(-1)) @ Q.T, op.to_dense()[sl, sl]) <= TOL
    bias = op.factors("lin.bias")
    assert bias.shape == (2, 2)
    assert max_err(bias, vecs[3][0] @ torch.diag(1 / (vals[3][0] + 0.5)) @ vecs[3][0].T) <= TOL


def test_diagonal_variances_access():
    g = gen(33)
    per = {n: torch.rand(SHAPES[n], generator=g, dtype=DT) for n in reversed(SHAPES)}
    op = Diagonal(per).bind(LAYOUT)
    assert op.layout.names == LAYOUT.names
    for n in SHAPES:
        assert torch.equal(op.variances(n), per[n])


def test_block_diagonal_blocks_and_default_cast():
    op = BlockDiagonal({"lin": Diagonal(torch.ones(12, dtype=DT))}, default=Isotropic(2.0)).bind(
        LAYOUT
    )
    assert [b.names for b in op.blocks] == [
        ("lin.weight", "lin.bias"),
        ("conv.weight", "conv.bias"),
    ]
    assert op.dtype == DT and all(b.operator.dtype == DT for b in op.blocks)
    assert op.sqrt_cols == P


def test_isotropic_sizes():
    iso = Isotropic(2.0, num_params=5)
    assert iso.num_params == 5 and iso.sqrt_cols == 5
    assert torch.equal(iso.diagonal(), torch.full((5,), 2.0))
    bound = Isotropic(torch.tensor(0.5, dtype=DT)).bind(LAYOUT)
    assert bound.num_params == P
    number = Isotropic(0.4)  # a Python number: default dtype, cast exactly
    assert number.dtype == torch.get_default_dtype()
    assert number.to(DT).variance.item() == 0.4


def test_lowrank_sqrt_cols():
    g = gen(34)
    U, lam = randn(P, 3, g=g), torch.rand(3, generator=g, dtype=DT)
    assert LowRank(U, lam).sqrt_cols == 3
    assert LowRank(U, lam, torch.ones(P, dtype=DT)).sqrt_cols == 3 + P
    assert LowRankPrecision(U, lam, torch.ones(P, dtype=DT)).sqrt_cols == P


def test_lowrank_precision_block_is_exact_marginal():
    op, ref = case_lowrank_precision()
    blk = op.bind(LAYOUT).block("lin.weight")
    assert isinstance(blk, Marginal) and blk.sqrt_cols == P
    sl = LAYOUT.slices["lin.weight"]
    assert max_err(blk.to_dense(), ref[sl, sl]) <= TOL


# -- sampling ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "kron_decomposed_damped",
        "lowrank_precision",
        "block_diagonal_mix",
        "lowrank_diag",
        "subset_dense",
    ],
)
def test_sample_covariance_within_standard_error(name):
    op, ref = CASES[name]()
    op = op.bind(LAYOUT)
    n = 20000
    Z = torch.randn(n, op.sqrt_cols, generator=gen(40), dtype=DT)
    X = op.sqrt_rows(Z)  # (n, P) rows: zero-mean samples with covariance Σ
    emp = X.T @ X / n
    d = ref.diagonal()
    # standard error of the mean of x_i x_j for x ~ N(0, Σ): sqrt((Σ_ii Σ_jj + Σ_ij²) / n)
    se = ((torch.outer(d, d) + ref.square()) / n).sqrt()
    nonzero = se > 0
    z = (emp - ref)[nonzero] / se[nonzero]
    assert z.abs().max().item() < 5.0
    assert 0.7 < z.square().mean().item() < 1.3
    assert (emp[~nonzero] == 0).all()


# -- gradients ---------------------------------------------------------------------------------------
def _sym(M: Tensor) -> Tensor:
    return M @ M.T + torch.eye(M.shape[0], dtype=DT)


def test_gradcheck_diagonal_and_isotropic():
    g = gen(50)
    V = randn(3, 6, g=g)
    v = (torch.rand(6, generator=g, dtype=DT) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: Diagonal(v).quadratic_rows(V), (v,))
    assert torch.autograd.gradcheck(lambda v: Diagonal(v).sqrt_rows(V), (v,))
    s = torch.tensor(0.7, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: Isotropic(s, num_params=6).sqrt_rows(V), (s,))


def test_gradcheck_dense():
    g = gen(51)
    M = randn(5, 5, g=g).requires_grad_()
    Z = randn(5, 2, g=g)
    assert torch.autograd.gradcheck(lambda M: Dense(_sym(M)).sqrt_matmul(Z), (M,))
    assert torch.autograd.gradcheck(lambda M: Dense(_sym(M)).quadratic_rows(Z.T), (M,))


def test_gradcheck_kronecker_factors():
    g = gen(52)
    layout = ParamLayout(("w",), {"w": (2, 3)})
    B, A = randn(2, 2, g=g).requires_grad_(), randn(3, 3, g=g).requires_grad_()
    V = randn(4, 6, g=g)

    def op(B, A):
        return Kronecker({"w": (_sym(B), _sym(A))}).bind(layout)

    assert torch.autograd.gradcheck(lambda B, A: op(B, A).sqrt_rows(V), (B, A))
    assert torch.autograd.gradcheck(lambda B, A: op(B, A).quadratic_rows(V), (B, A))


def test_gradcheck_kronecker_precision_eigen():
    g = gen(53)
    Q1, Q2 = orthogonal(2, g), orthogonal(3, g)
    l1 = (torch.rand(2, generator=g, dtype=DT) + 0.5).requires_grad_()
    l2 = (torch.rand(3, generator=g, dtype=DT) + 0.5).requires_grad_()
    delta = torch.tensor(0.6, dtype=DT, requires_grad=True)
    V = randn(4, 6, g=g)

    def f(l1, l2, delta):
        return Kronecker.from_precision_eigen(
            [[Q1, Q2]], [[l1, l2]], delta, damping=True
        ).quadratic_rows(V)

    assert torch.autograd.gradcheck(f, (l1, l2, delta))


def test_gradcheck_lowrank_forms():
    g = gen(54)
    U = randn(6, 2, g=g).requires_grad_()
    lam = torch.tensor([0.7, 1.9], dtype=DT, requires_grad=True)
    d = (torch.rand(6, generator=g, dtype=DT) + 0.5).requires_grad_()
    V = randn(3, 6, g=g)
    Z = randn(3, 8, g=g)
    assert torch.autograd.gradcheck(lambda U, lam, d: LowRank(U, lam, d).sqrt_rows(Z), (U, lam, d))
    assert torch.autograd.gradcheck(
        lambda U, lam, d: LowRankPrecision(U, lam, d).matmul_rows(V), (U, lam, d)
    )
    assert torch.autograd.gradcheck(
        lambda U, lam, d: LowRankPrecision(U, lam, d).sqrt_rows(V), (U, lam, d)
    )


def test_gradient_through_block_diagonal():
    v = torch.rand(12, generator=gen(55), dtype=DT).add(0.5).requires_grad_()
    V = randn(3, P, g=gen(56))

    def f(v):
        return (
            BlockDiagonal({"lin": Diagonal(v)}, default=Isotropic(1.0))
            .bind(LAYOUT)
            .quadratic_rows(V)
        )

    assert torch.autograd.gradcheck(f, (v,))


def test_square_root_not_cached_while_differentiable():
    S = spd(4, gen(57)).requires_grad_()
    op = Dense(S)
    Z = randn(4, g=gen(58))
    grads = [torch.autograd.grad(op.sqrt_matmul(Z).sum(), S)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


# -- errors --------------------------------------------------------------------------------------------
def test_error_size_mismatch():
    with pytest.raises(
        ValueError, match=r"has size P=5, but the model's selected parameters have P=27"
    ):
        Dense(torch.eye(5, dtype=DT)).bind(LAYOUT)
    with pytest.raises(ValueError, match="has size P=3"):
        Isotropic(1.0, num_params=3).bind(LAYOUT)


def test_error_names():
    good = {n: torch.ones(s, dtype=DT) for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match=r"does not select: \['extra'\]"):
        Diagonal({**good, "extra": torch.ones(2, dtype=DT)}).bind(LAYOUT)
    with pytest.raises(ValueError, match=r"no entries for the selected parameters \['lin.bias'\]"):
        Diagonal({n: t for n, t in good.items() if n != "lin.bias"}).bind(LAYOUT)
    with pytest.raises(ValueError, match=r"'lin.weight' have shape \(5, 2\)"):
        Diagonal({**good, "lin.weight": torch.ones(5, 2, dtype=DT)}).bind(LAYOUT)
    f = kron_factors(gen(60))
    with pytest.raises(ValueError, match=r"no entries for the selected parameters \['conv.bias'\]"):
        Kronecker({n: v for n, v in f.items() if n != "conv.bias"}).bind(LAYOUT)


def test_error_kronecker_factor_shapes():
    g = gen(61)
    f = kron_factors(g)
    with pytest.raises(
        ValueError, match=r"'conv.weight' have sides \(3, 3\).*\(out, in_flat\) = \(3, 4\)"
    ):
        Kronecker({**f, "conv.weight": (spd(3, g), spd(3, g))}).bind(LAYOUT)
    with pytest.raises(ValueError, match=r"pair given for 'lin.bias' of shape \(2,\)"):
        Kronecker({**f, "lin.bias": (spd(1, g), spd(2, g))}).bind(LAYOUT)
    with pytest.raises(ValueError, match=r"Kronecker covariance for 'conv.bias' is 4x4"):
        Kronecker({**f, "conv.bias": (spd(4, g),)}).bind(LAYOUT)
    with pytest.raises(
        ValueError, match="Kronecker has 2 parameter blocks, but the model selects 4"
    ):
        Kronecker([f["conv.weight"], f["conv.bias"]]).bind(LAYOUT)
    with pytest.raises(ValueError, match=r"eigvals must have shape \(out, in_flat\) = \(3, 4\)"):
        Kronecker(
            [
                KroneckerEigen(
                    torch.eye(3, dtype=DT), torch.eye(4, dtype=DT), torch.ones(4, 3, dtype=DT)
                )
            ]
        )
    with pytest.raises(ValueError, match="given its factors by position"):
        Kronecker(list(f.values())).factors("lin.bias")


def test_error_non_finite_and_negative():
    with pytest.raises(ValueError, match="Diagonal variances has 1 non-finite"):
        Diagonal(torch.tensor([1.0, float("nan")], dtype=DT))
    with pytest.raises(ValueError, match="Dense matrix has 1 non-finite"):
        Dense(torch.tensor([[1.0, 0.0], [0.0, float("inf")]], dtype=DT))
    with pytest.raises(
        ValueError, match=r"Diagonal variances has 1 negative entries \(smallest -2"
    ):
        Diagonal(torch.tensor([1.0, -2.0], dtype=DT))
    with pytest.raises(ValueError, match="LowRank eigvals has 1 negative"):
        LowRank(torch.ones(3, 2, dtype=DT), torch.tensor([1.0, -1.0], dtype=DT))
    with pytest.raises(ValueError, match="eigvals has 1 negative eigenvalues"):
        Kronecker(
            [
                KroneckerEigen(
                    torch.eye(1, dtype=DT),
                    torch.eye(2, dtype=DT),
                    torch.tensor([[1.0, -1.0]], dtype=DT),
                )
            ]
        )
    with pytest.raises(ValueError, match="Isotropic variance has 1 negative"):
        Isotropic(-1.0)
    with pytest.raises(ValueError, match=r"diagonal precision.*must be positive"):
        LowRankPrecision(
            torch.ones(3, 1, dtype=DT),
            torch.ones(1, dtype=DT),
            torch.tensor([1.0, 0.0, 1.0], dtype=DT),
        )
    with pytest.raises(
        ValueError, match=r"precision eigenvalues <= 0.*add a positive prior precision"
    ):
        Kronecker.from_precision_eigen(
            [[torch.eye(2, dtype=DT)]], [[torch.tensor([0.0, 1.0], dtype=DT)]]
        )
    with pytest.raises(ValueError, match="deltas \\(prior precision\\) has 1 negative"):
        Kronecker.from_precision_eigen(
            [[torch.eye(2, dtype=DT)]], [[torch.ones(2, dtype=DT)]], deltas=-1.0
        )


def test_error_dense_matrix_form():
    with pytest.raises(
        ValueError, match=r"Dense matrix must be a square matrix, got shape \(2, 3\)"
    ):
        Dense(torch.ones(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="Dense matrix is not symmetric"):
        Dense(torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DT))
    with pytest.raises(ValueError, match="must be lower triangular"):
        Dense.from_cholesky(torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DT))
    with pytest.raises(ValueError, match="not positive semi-definite: smallest eigenvalue -1"):
        Dense(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT))
    with pytest.raises(ValueError, match="different dtypes"):
        LowRank(torch.ones(3, 1, dtype=DT), torch.ones(1, dtype=torch.float32))


def test_error_block_diagonal_cover():
    d12 = Diagonal(torch.ones(12, dtype=DT))
    with pytest.raises(
        ValueError, match=r"'lin.weight' is covered by both 'lin' and \('lin.weight',\)"
    ):
        BlockDiagonal({"lin": d12, ("lin.weight",): Isotropic(1.0)}, default=Isotropic(1.0)).bind(
            LAYOUT
        )
    with pytest.raises(
        ValueError, match=r"no block for the selected parameters \['conv.weight', 'conv.bias'\]"
    ):
        BlockDiagonal({"lin": d12}).bind(LAYOUT)
    with pytest.raises(ValueError, match="no selected parameter is named or prefixed 'head'"):
        BlockDiagonal({"head": d12}, default=Isotropic(1.0)).bind(LAYOUT)
    with pytest.raises(
        ValueError, match=r"block 'lin' \(\['lin.weight', 'lin.bias'\]\): Diagonal has size P=11"
    ):
        BlockDiagonal({"lin": Diagonal(torch.ones(11, dtype=DT))}, default=Isotropic(1.0)).bind(
            LAYOUT
        )
    with pytest.raises(ValueError, match=r"call \.bind\(functional_model\.layout\) first"):
        BlockDiagonal({"lin": d12}).num_params  # noqa: B018


def test_error_subset_indices():
    with pytest.raises(ValueError, match="Subset indices has duplicate entries"):
        Subset(Diagonal(torch.ones(2, dtype=DT)), torch.tensor([1, 1]), 5)
    with pytest.raises(ValueError, match=r"Subset indices must lie in \[0, 5\)"):
        Subset(Diagonal(torch.ones(2, dtype=DT)), torch.tensor([1, 5]), 5)
    with pytest.raises(ValueError, match="Subset has 3 indices but its inner operator has size 2"):
        Subset(Diagonal(torch.ones(2, dtype=DT)), torch.tensor([0, 1, 2]), 5)


def test_error_unbound_structure():
    with pytest.raises(ValueError, match="not bound to a model's parameter layout"):
        Dense(torch.eye(2, dtype=DT)).param_groups()
    with pytest.raises(ValueError, match="Isotropic has no size yet"):
        Isotropic(1.0).to_dense()


@pytest.mark.parametrize("sides", [(3, 7), (600, 3)])  # left factor broadcast / side by side
def test_kronecker_blocks_rows_equal_the_dense_product(sides):
    """A Kronecker block's products with many rows equal the dense ``B ⊗ A`` (row-major vec),
    whether the rows take the left factor one by one or side by side in one product."""
    out, inn = sides
    g = torch.Generator().manual_seed(out)

    def spd(n):
        M = torch.randn(n, n, generator=g, dtype=torch.float64)
        return M @ M.T + n * torch.eye(n, dtype=torch.float64)

    B, A = spd(out), spd(inn)
    dense = torch.kron(B, A)
    V = torch.randn(9, out * inn, generator=g, dtype=torch.float64)
    Lb, La = torch.linalg.cholesky(B), torch.linalg.cholesky(A)
    Qo, Qi = torch.linalg.qr(spd(out))[0], torch.linalg.qr(spd(inn))[0]
    E = torch.rand(out, inn, generator=g, dtype=torch.float64) + 0.1
    eig_dense = torch.kron(Qo, Qi) @ torch.diag(E.reshape(-1)) @ torch.kron(Qo, Qi).T
    for op, want in ((KroneckerFactors(B, A), dense), (KroneckerEigen(Qo, Qi, E), eig_dense)):
        torch.testing.assert_close(op.matmul_rows(V), V @ want)
        torch.testing.assert_close(op.quadratic_rows(V), ((V @ want) * V).sum(1))
        sqrt = op.sqrt_rows(torch.eye(out * inn, dtype=torch.float64))
        torch.testing.assert_close(sqrt.T @ sqrt, want)
    torch.testing.assert_close(
        KroneckerFactors(B, A).sqrt_t_rows(V), V @ torch.kron(Lb, La), rtol=1e-10, atol=1e-10
    )
