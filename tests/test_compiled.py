"""Replayed calls (``pushforward.compile``) equal the eager call, and notice what changes."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_variance import COVS, make_cov
from torch import nn
from zoo import make_case

import pushforward as pf

D = torch.float64
TOL = 1e-12
#: Covariances with a group per parameter tensor: the layer-structured strategy, whose plain
#: chains replay as the hand-differentiated chain.
PER_LAYER = ("diag", "isotropic", "kron", "eig_kron")


def _again(x):
    """Other inputs of the same signature."""
    if isinstance(x, dict):
        return {k: (v.flip(0) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    return x.flip(0) + 0.1 if x.is_floating_point() else x.flip(0)


def _eig_kron(fm: pf.FunctionalModel) -> pf.Kronecker:
    """A Kronecker covariance in eigen form per weight and a dense block per bias (the form
    ``from_laplace`` gives for a fitted KronLaplace)."""
    g = torch.Generator().manual_seed(3)
    blocks = {}
    for name, shape in fm.param_shapes.items():
        if len(shape) >= 2:
            out, inn = shape[0], shape[1:].numel()
            Qo, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=D))
            Qi, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=D))
            blocks[name] = pf.KroneckerEigen(Qo, Qi, torch.rand(out, inn, generator=g, dtype=D))
        else:
            A = torch.randn(shape.numel(), shape.numel(), generator=g, dtype=D)
            blocks[name] = pf.Dense(A @ A.T + torch.eye(shape.numel(), dtype=D))
    return pf.Kronecker(blocks)


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("model", ["mlp", "cnn_batchnorm_eval", "gpt2_tiny", "inplace_relu"])
@pytest.mark.parametrize("cov_kind", [*COVS, "eig_kron"])
@pytest.mark.parametrize("what", ["variance", "covariance", "joint"])
def test_replay_equals_eager(model, cov_kind, what):
    case = make_case(model)
    cov = _eig_kron(case.fm) if cov_kind == "eig_kron" else make_cov(cov_kind, case.fm)
    compiled = pf.compile(case.fm, cov, case.x, what=what)
    x = _again(case.x)
    for inputs in (case.x, x, case.x):
        got = compiled(inputs)
        if what == "variance":
            want = pf.functional_variance(case.fm, inputs, cov)
        else:
            want = pf.functional_covariance(case.fm, inputs, cov, joint=what == "joint")
        assert rel_err(got[0], want[0]) <= TOL
        assert rel_err(got[1], want[1]) <= TOL, (compiled.program, rel_err(got[1], want[1]))
    if model in ("mlp", "inplace_relu") and what == "variance" and cov_kind in PER_LAYER:
        assert compiled.program == "chain"


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2))
    fm = pf.FunctionalModel(model.to(D))
    return fm, torch.randn(5, 6, dtype=D)


def test_replay_follows_changes():
    fm, x = _mlp()
    cov = _eig_kron(fm)
    compiled = pf.compile(fm, cov, x)
    first = compiled(x)[1]
    # in-place updates of the parameters are read at each call
    with torch.no_grad():
        for p in fm.module.parameters():
            p.mul_(1.1)
    moved = compiled(x)[1]
    assert rel_err(moved, pf.functional_variance(fm, x, cov)[1]) <= TOL
    assert rel_err(moved, first) > 1e-3
    # a covariance changed in place, a parameter replaced, another batch size: a new program
    with torch.no_grad():
        cov.blocks["0.weight"].eigvals.mul_(3)
    assert rel_err(compiled(x)[1], pf.functional_variance(fm, x, cov)[1]) <= TOL
    fm.module[0].weight = nn.Parameter(fm.module[0].weight.detach() * 0.5)
    assert rel_err(compiled(x)[1], pf.functional_variance(fm, x, cov)[1]) <= TOL
    bigger = torch.randn(9, 6, dtype=D)
    assert rel_err(compiled(bigger)[1], pf.functional_variance(fm, bigger, cov)[1]) <= TOL


def test_replay_refuses_training_mode_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2)).to(D).eval()
    fm = pf.FunctionalModel(model)
    x = torch.randn(5, 6, dtype=D)
    compiled = pf.compile(fm, pf.Diagonal(torch.rand(fm.num_params, dtype=D)), x)
    compiled(x)
    model.train()
    with pytest.raises(pf.BatchCouplingError, match="Dropout"):
        compiled(x)
    with pytest.raises(ValueError, match="what must be"):
        pf.compile(fm, pf.Diagonal(torch.rand(fm.num_params, dtype=D)), x, what="samples")
