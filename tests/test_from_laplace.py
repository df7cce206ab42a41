"""``from_laplace`` against laplace-torch's own posterior covariance (float64, ≤ 1e-12)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("laplace")
    import laplace.baselaplace
    from laplace import (
        DiagLaplace,
        DiagLLLaplace,
        DiagSubnetLaplace,
        FullLaplace,
        FullLLLaplace,
        FullSubnetLaplace,
        KronLaplace,
        KronLLLaplace,
        LowRankLaplace,
    )
    from laplace.curvature import CurvlinopsGGN
    from laplace.utils.matrix import KronDecomposed

from laplace_models import classifier, frozen_classifier, regressor

from pushforward.core.layout import ParamLayout
from pushforward.covariance import Dense, Diagonal, Kronecker, LowRankPrecision, Subset
from pushforward.laplace_interop import from_laplace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DT = torch.float64
TOL = 1e-12


def per_layer(*values: float) -> Tensor:
    return torch.tensor(values, dtype=DT)


CASES = {
    "full": (
        FullLaplace,
        classifier,
        dict(prior_precision=per_layer(0.5, 1.0, 2.0, 3.0), temperature=0.5),
    ),
    "full_regression": (
        FullLaplace,
        regressor,
        dict(prior_precision=0.7, sigma_noise=1.3, temperature=2.0),
    ),
    "diag": (
        DiagLaplace,
        classifier,
        dict(prior_precision=per_layer(0.5, 1.0, 2.0, 3.0), temperature=0.5),
    ),
    "diag_regression": (
        DiagLaplace,
        regressor,
        dict(prior_precision=0.7, sigma_noise=1.3, temperature=2.0),
    ),
    "kron": (
        KronLaplace,
        classifier,
        dict(prior_precision=per_layer(0.5, 1.0, 2.0, 3.0), temperature=0.5),
    ),
    "kron_damping": (
        KronLaplace,
        classifier,
        dict(prior_precision=0.8, temperature=2.0, damping=True),
    ),
    "kron_regression": (
        KronLaplace,
        regressor,
        dict(prior_precision=per_layer(0.3, 0.6, 0.9, 1.2), sigma_noise=1.3, temperature=0.5),
    ),
    "full_last_layer": (FullLLLaplace, classifier, dict(prior_precision=0.7, temperature=0.5)),
    "diag_last_layer": (
        DiagLLLaplace,
        regressor,
        dict(
            prior_precision=torch.linspace(0.5, 2.0, 12, dtype=DT), sigma_noise=1.3, temperature=2.0
        ),
    ),
    "kron_last_layer": (
        KronLLLaplace,
        classifier,
        dict(prior_precision=per_layer(0.5, 2.0), temperature=0.5),
    ),
    "full_frozen": (
        FullLaplace,
        frozen_classifier,
        dict(prior_precision=per_layer(0.5, 2.0), temperature=0.5),
    ),
    "diag_frozen": (DiagLaplace, frozen_classifier, dict(prior_precision=1.5, temperature=2.0)),
    "kron_frozen": (
        KronLaplace,
        frozen_classifier,
        dict(prior_precision=per_layer(0.5, 2.0), temperature=0.5),
    ),
}


def likelihood(make) -> str:
    return "regression" if make is regressor else "classification"


def laplace_covariance(la) -> Tensor:
    """laplace-torch's own posterior covariance, in its own representation made dense."""
    if isinstance(la, FullLaplace):
        return la.posterior_covariance
    if isinstance(la, DiagLaplace):
        return torch.diag(la.posterior_variance)
    if isinstance(la, KronLaplace):
        return la.posterior_precision.to_matrix(exponent=-1)
    (U, eigvals), prior_diag = la.posterior_precision
    return torch.linalg.inv(U @ torch.diag(eigvals) @ U.T + torch.diag(prior_diag))


def laplace_parameters(la) -> list[Tensor]:
    return list(la.model.last_layer.parameters()) if "LL" in type(la).__name__ else list(la.params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_laplace_matches_posterior_covariance(name):
    cls, make, kwargs = CASES[name]
    model, loader = make()
    la = cls(model, likelihood(make), **kwargs)
    la.fit(loader)
    fm, cov = from_laplace(la)
    assert cov.layout == fm.layout
    # the same parameters in the same order as laplace-torch's parameter vector
    theirs = parameters_to_vector(laplace_parameters(la))
    assert torch.equal(fm.flatten(fm.params()), theirs)
    assert torch.equal(theirs, la.mean)
    ref = laplace_covariance(la)
    assert ref.shape == (fm.num_params, fm.num_params)
    assert (cov.to_dense() - ref).abs().max().item() <= TOL
    L = cov.sqrt_dense()
    assert (L @ L.T - ref).abs().max().item() <= TOL


def test_structures_and_modules():
    model, loader = classifier()
    la = KronLaplace(model, "classification", prior_precision=0.5)
    la.fit(loader)
    fm, cov = from_laplace(la)
    assert fm.module is model and fm.param_names == ("0.weight", "0.bias", "3.weight", "3.bias")
    assert isinstance(cov, Kronecker)
    conv = cov.factors("0.weight")
    assert conv.eigvals.shape == (3, 4)  # (out, in*kh*kw)
    assert cov.factors("0.bias").shape == (3, 3)

    la = DiagLLLaplace(model, "classification", prior_precision=0.5)
    la.fit(loader)
    fm, cov = from_laplace(la)
    assert isinstance(cov, Diagonal) and fm.param_names == ("3.weight", "3.bias")
    assert fm.module is la.model.model  # laplace-torch's deep copy, unwrapped
    assert cov.variances("3.weight").shape == (3, 18)

    fm_own, cov_own = from_laplace(la, model=model)  # wrap the user's own module instead
    assert fm_own.module is model and fm_own.param_names == ("3.weight", "3.bias")
    assert torch.equal(fm_own.flatten(fm_own.params()), la.mean)
    assert torch.equal(cov_own.to_dense(), cov.to_dense())

    la = FullLaplace(model, "classification")
    la.fit(loader)
    assert isinstance(from_laplace(la)[1], Dense)


def test_kron_damping_as_laplace_torch_applies_it():
    """laplace-torch 0.3 drops ``damping`` when it forms ``posterior_precision`` (its ``*`` and
    ``+`` build an undamped ``KronDecomposed``); its predictions use that precision, and so
    does the conversion."""
    model, loader = classifier()
    la = KronLaplace(model, "classification", prior_precision=0.8, damping=True)
    la.fit(loader)
    assert la.H.damping and not la.posterior_precision.damping
    _, cov = from_laplace(la)
    assert (cov.to_dense() - la.posterior_precision.to_matrix(exponent=-1)).abs().max() <= TOL
    # a damped KronDecomposed itself is read with its damping
    damped = Kronecker.from_kron_decomposed(
        la.H, prior_precision=la.prior_precision, scale=la._H_factor
    )
    kd = KronDecomposed(
        la.H.eigenvectors,
        [[la._H_factor.sqrt() * v for v in ls] for ls in la.H.eigenvalues],
        la.prior_precision.expand(4),
        damping=True,
    )
    assert (damped.to_dense() - kd.to_matrix(exponent=-1)).abs().max() <= TOL


@pytest.mark.parametrize("damping", [False, True])
def test_kronecker_matches_kron_decomposed(damping):
    g = torch.Generator().manual_seed(3)
    sides = [[3, 4], [3], [2, 5], [2]]
    vecs = [
        [torch.linalg.qr(torch.randn(s, s, generator=g, dtype=DT))[0] for s in ss] for ss in sides
    ]
    vals = [[2 * torch.rand(s, generator=g, dtype=DT) for s in ss] for ss in sides]
    kd = KronDecomposed(vecs, vals, deltas=per_layer(0.4, 1.0, 0.2, 2.0), damping=damping)
    cov = Kronecker.from_kron_decomposed(kd)
    assert (cov.to_dense() - kd.to_matrix(exponent=-1)).abs().max() <= TOL


@pytest.mark.parametrize("cls", [FullSubnetLaplace, DiagSubnetLaplace])
def test_subnetwork(cls):
    model, loader = classifier()
    # unsorted indices in the conv weight (0..11) and the head (15..71); none in the conv bias
    indices = torch.tensor([70, 3, 20, 71, 5, 0, 69, 15])
    la = cls(
        model, "classification", subnetwork_indices=indices, prior_precision=0.8, temperature=2.0
    )
    la.fit(loader)
    fm, cov = from_laplace(la)
    assert fm.param_names == ("0.weight", "3.weight", "3.bias")
    assert isinstance(cov, Subset) and isinstance(
        cov.inner, Dense if cls is FullSubnetLaplace else Diagonal
    )
    assert torch.equal(fm.flatten(fm.params())[cov.indices], la.mean_subnet)
    sub = la.posterior_covariance if cls is FullSubnetLaplace else torch.diag(la.posterior_variance)
    full = torch.zeros(la.n_params, la.n_params, dtype=DT)
    full[indices[:, None], indices[None, :]] = sub
    keep = ParamLayout.from_tensors(dict(model.named_parameters())).index(fm.param_names)
    assert torch.equal(cov.to_dense(), full[keep[:, None], keep[None, :]])


class LowRankGGN(CurvlinopsGGN):
    """The top eigenpairs of the exact GGN, standing in for the asdfghjkl backend that
    laplace-torch's LowRankLaplace expects (the installed distribution provides ``asdl``)."""

    def eig_lowrank(self, loader: DataLoader) -> tuple[Tensor, Tensor, Tensor]:
        H, loss = 0, 0
        for X, y in loader:
            batch_loss, batch_H = self.full(X, y, N=len(loader.dataset))
            H, loss = H + batch_H, loss + batch_loss
        eigvals, eigvecs = torch.linalg.eigh(H)
        return eigvecs[:, -5:], eigvals[-5:], loss


def test_lowrank(monkeypatch):
    monkeypatch.setattr(laplace.baselaplace, "find_spec", lambda name: SimpleNamespace(name=name))
    model, loader = classifier()
    prior = per_layer(0.5, 1.0, 2.0, 3.0)
    la = LowRankLaplace(
        model, "classification", backend=LowRankGGN, prior_precision=prior, temperature=0.5
    )
    la.fit(loader)
    fm, cov = from_laplace(la)
    assert isinstance(cov, LowRankPrecision) and cov.U.shape == (fm.num_params, 5)
    assert torch.equal(fm.flatten(fm.params()), la.mean)
    assert (cov.to_dense() - laplace_covariance(la)).abs().max().item() <= TOL


def test_errors():
    model, _ = classifier()
    with pytest.raises(ValueError, match=r"KronLaplace is not fitted; call la.fit"):
        from_laplace(KronLaplace(model, "classification"))
    with pytest.raises(ValueError, match=r"FullLLLaplace is not fitted"):
        from_laplace(FullLLLaplace(model, "classification"))
    with pytest.raises(TypeError, match=r"weight-space Laplace approximations.*got object"):
        from_laplace(object())
    model, loader = classifier()
    la = FullLLLaplace(model, "classification")
    la.fit(loader)
    other = nn.Sequential(nn.Conv2d(2, 3, (2, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4)).to(DT)
    with pytest.raises(
        ValueError, match=r"parameter '3.weight' has shape \(4, 18\), laplace-torch's has \(3, 18\)"
    ):
        from_laplace(la, model=other)
