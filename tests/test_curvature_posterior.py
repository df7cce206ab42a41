"""Standalone Laplace posteriors against laplace-torch (0.3, default backend), float64.

The same model and data go to laplace-torch's ``DiagLaplace``/``KronLaplace`` (default backend)
and ``FullLaplace`` (its exact ``torch.func`` GGN; the default's dense GGN is float32-accurate),
with σ, a temperature, a per-tensor prior precision and a prior mean, and to
``GGN(...).diagonal()/dense()/kfac()`` with :func:`laplace_posterior`,
:func:`log_marginal_likelihood` and :func:`optimize_prior_precision`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("laplace")
    from laplace import DiagLaplace, FullLaplace, KronLaplace
    from laplace.curvature import GGNInterface

from pushforward.curvature import (
    GGN,
    laplace_posterior,
    log_marginal_likelihood,
    optimize_prior_precision,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DT = torch.float64
TOL = 1e-8


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def problem(likelihood: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 5, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, 3, (20,), generator=g)
    else:
        y = torch.randn(20, 3, generator=g, dtype=DT)
    return model, DataLoader(TensorDataset(X, y), batch_size=7)


STRUCTURES = {"diag": DiagLaplace, "full": FullLaplace, "kron": KronLaplace}


def curvature(ggn: GGN, structure: str):
    return {"diag": ggn.diagonal, "full": ggn.dense, "kron": ggn.kfac}[structure]()


def dense_precision(la, structure: str) -> torch.Tensor:
    P = la.posterior_precision
    if structure == "kron":
        return P.to_matrix()
    return torch.diag(P) if structure == "diag" else P


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_posterior_and_marglik_equal_laplace_torch(likelihood, structure):
    model, loader = problem(likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    T, mu0 = 1.3, 0.05
    delta = torch.tensor([0.5, 2.0, 0.3, 1.5], dtype=DT)  # one per parameter tensor
    # the default backend's dense GGN goes through a float32 identity: its torch.func one is exact
    backend = {"backend": GGNInterface} if structure == "full" else {}
    la = STRUCTURES[structure](
        model,
        likelihood,
        sigma_noise=sigma,
        prior_precision=delta,
        prior_mean=mu0,
        temperature=T,
        **backend,
    )
    la.fit(loader)
    ggn = GGN(model, loader, likelihood)
    H = curvature(ggn, structure)
    S = laplace_posterior(H, delta, temperature=T, sigma_noise=sigma, layout=ggn)
    assert rel(torch.linalg.inv(S.to_dense()), dense_precision(la, structure)) <= TOL
    kw = {"sigma_noise": sigma, "temperature": T, "prior_mean": mu0}
    assert rel(log_marginal_likelihood(ggn, H, delta, **kw), la.log_marginal_likelihood()) <= TOL
    # gradients w.r.t. the prior precision (and σ; laplace-torch's Kron path is not
    # differentiable in σ: it splits the scale with math.pow)
    d1 = delta.clone().requires_grad_(True)
    d2 = delta.clone().requires_grad_(True)
    wrt_sigma = likelihood == "regression" and structure != "kron"
    s1 = torch.tensor(sigma, dtype=DT, requires_grad=True)
    s2 = torch.tensor(sigma, dtype=DT, requires_grad=True)
    ours = log_marginal_likelihood(ggn, H, d1, sigma_noise=s1, temperature=T, prior_mean=mu0)
    ref = la.log_marginal_likelihood(d2, s2 if likelihood == "regression" else None)
    inputs_ours, inputs_ref = ([d1, s1], [d2, s2]) if wrt_sigma else ([d1], [d2])
    for a, b in zip(
        torch.autograd.grad(ours, inputs_ours), torch.autograd.grad(ref, inputs_ref), strict=True
    ):
        assert rel(a, b) <= TOL


def test_mean_reduction_scales_by_n_data():
    model, loader = problem("classification")
    ggn_sum, ggn_mean = GGN(model, loader), GGN(model, loader, reduction="mean")
    S_sum = laplace_posterior(ggn_sum.kfac(), 0.5)
    S_mean = laplace_posterior(ggn_mean.kfac(), 0.5, n_data=ggn_mean.n_data)
    assert rel(S_mean.to_dense(), S_sum.to_dense()) <= TOL
    lml = log_marginal_likelihood(ggn_mean, ggn_mean.diagonal(), 0.5)
    assert rel(lml, log_marginal_likelihood(ggn_sum, ggn_sum.diagonal(), 0.5)) <= TOL


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise", "diag"])
def test_optimize_prior_precision_equals_laplace_torch(prior_structure):
    model, loader = problem("classification")
    la = DiagLaplace(model, "classification", temperature=1.3)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", prior_structure=prior_structure, n_steps=30)
    ggn = GGN(model, loader)
    ours = optimize_prior_precision(
        ggn, ggn.diagonal(), prior_structure=prior_structure, n_steps=30, temperature=1.3
    )
    assert rel(ours.reshape(-1), la.prior_precision.reshape(-1)) <= TOL
    if prior_structure == "diag":  # one value per parameter does not keep K-FAC's structure
        with pytest.raises(ValueError, match="K-FAC posterior"):
            optimize_prior_precision(ggn, ggn.kfac(), prior_structure="diag", n_steps=1)
