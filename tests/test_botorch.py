"""pushforward.botorch: PushforwardModel against laplace-bayesopt's LaplaceBoTorch on the same
fitted laplace-torch objects, against brute-force Jacobians, gradchecks, pathwise samples and
conditioning (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.data as du
from conftest import rel_err
from torch import nn

import pushforward as pf

botorch = pytest.importorskip("botorch")
laplace = pytest.importorskip("laplace")
pytest.importorskip("laplace_bayesopt")

from botorch.acquisition import (  # noqa: E402
    ExpectedImprovement,
    LogExpectedImprovement,
    UpperConfidenceBound,
    qExpectedImprovement,
    qLogExpectedImprovement,
)
from botorch.acquisition.objective import ScalarizedPosteriorTransform  # noqa: E402
from botorch.models.transforms.input import Normalize  # noqa: E402
from botorch.models.transforms.outcome import Standardize  # noqa: E402
from botorch.sampling.normal import SobolQMCNormalSampler  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace_bayesopt.botorch import LaplaceBoTorch  # noqa: E402

from pushforward.botorch import (  # noqa: E402
    PathwiseSampler,
    PathwiseThompsonSampling,
    PushforwardModel,
    thompson_candidates,
)
from pushforward.covariance import Diagonal, Kronecker, PrecisionUpdate  # noqa: E402

D = torch.float64
TOL = 1e-8
STRUCTURES = {
    "full": ("all", "full"),
    "diag": ("all", "diag"),
    "kron": ("all", "kron"),
    "last_layer": ("last_layer", "kron"),
}


@pytest.fixture(autouse=True)
def float64_default():
    """LaplaceBoTorch adds its noise with ``torch.eye`` of the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Small products: one thread is fastest (and immune to oversubscribed cores)."""


def make_net(d: int = 3, m: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, m)
    ).to(D)


def data(n: int = 16, d: int = 3, m: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=D)
    Y = torch.stack([(X * (k + 1)).sin().sum(-1) for k in range(m)], -1)
    return X, Y + 0.05 * torch.randn(n, m, generator=g, dtype=D)


def fitted(structure: str, m: int = 1, X=None, Y=None):
    """A trained net and a laplace-torch Laplace fitted on it."""
    X, Y = data(m=m) if X is None else (X, Y)
    net = make_net(X.shape[1], m)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        ((net(X) - Y) ** 2).mean().backward()
        opt.step()
    subset, hessian = STRUCTURES[structure]
    la = Laplace(
        net,
        "regression",
        subset_of_weights=subset,
        hessian_structure=hessian,
        sigma_noise=0.3,
        prior_precision=1.5,
        enable_backprop=True,
    )
    la.fit(du.DataLoader(du.TensorDataset(X, Y), batch_size=8))
    return net, la, X, Y


class NoisyPushforward(PushforwardModel):
    """LaplaceBoTorch always adds σ²: the same posterior for the acquisition comparisons."""

    def posterior(self, X, output_indices=None, observation_noise=False, **kwargs):
        return super().posterior(X, output_indices, observation_noise=True, **kwargs)


def brute_force_blocks(model: PushforwardModel, X: torch.Tensor) -> tuple:
    """Mean and per-t-batch J S J^T from the explicit Jacobian and the dense covariance."""
    fm = model.functional_model
    q, d = X.shape[-2:]
    f, J = pf.jacobian(fm, X.reshape(-1, d))  # (N, m, P)
    S = model.covariance.to_dense()
    J = J.reshape(-1, q * J.shape[1], fm.num_params)
    return f.reshape(*X.shape[:-1], -1), J @ S @ J.transpose(-1, -2)


# -- equality with LaplaceBoTorch -------------------------------------------------------------
@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_posterior_equals_laplace_botorch(structure):
    net, la, X, Y = fitted(structure)
    theirs = LaplaceBoTorch(lambda: net, X, Y, bnn=la)
    ours = PushforwardModel.from_laplace(la)
    Xt = torch.rand(5, 3, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    ref = theirs.posterior(Xt)
    post = ours.posterior(Xt, observation_noise=True)
    cov = post.distribution.covariance_matrix
    assert cov.shape == (5, 3, 3)
    assert rel_err(post.mean, ref.mean) < TOL
    assert rel_err(cov, ref.distribution.covariance_matrix) < TOL
    latent = ours.posterior(Xt).distribution.covariance_matrix
    sigma2 = la.sigma_noise.item() ** 2
    assert rel_err(latent + sigma2 * torch.eye(3), ref.distribution.covariance_matrix) < TOL


def test_multi_output_posterior_equals_laplace_botorch():
    net, la, X, Y = fitted("kron", m=2)
    theirs = LaplaceBoTorch(lambda: net, X, Y, bnn=la)
    ours = PushforwardModel.from_laplace(la)
    Xt = torch.rand(4, 3, 3, dtype=D, generator=torch.Generator().manual_seed(3))
    ref, post = theirs.posterior(Xt), ours.posterior(Xt, observation_noise=True)
    assert type(post.distribution).__name__ == "MultitaskMultivariateNormal"
    assert post.mean.shape == (4, 3, 2)
    assert rel_err(post.mean, ref.mean) < TOL
    assert rel_err(post.distribution.covariance_matrix, ref.distribution.covariance_matrix) < TOL
    one = ours.posterior(Xt, output_indices=[1], observation_noise=True)
    full = ref.distribution.covariance_matrix
    assert one.mean.shape == (4, 3, 1)
    assert rel_err(one.distribution.covariance_matrix, full[:, 1::2, 1::2]) < TOL
    weights = torch.tensor([0.3, -1.2], dtype=D)
    scal = ScalarizedPosteriorTransform(weights)
    mine, their = ours.posterior(Xt, observation_noise=True, posterior_transform=scal), scal(ref)
    assert rel_err(mine.mean, their.mean) < TOL
    assert rel_err(mine.variance, their.variance) < TOL


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_acquisition_values_and_gradients_equal_laplace_botorch(structure):
    net, la, X, Y = fitted(structure)
    theirs = LaplaceBoTorch(lambda: net, X, Y, bnn=la)
    ours = NoisyPushforward.from_laplace(la)
    best = Y.max()
    g = torch.Generator().manual_seed(4)
    analytic = {
        "EI": lambda m: ExpectedImprovement(m, best_f=best),
        "LogEI": lambda m: LogExpectedImprovement(m, best_f=best),
        "UCB": lambda m: UpperConfidenceBound(m, beta=2.0),
    }
    mc = {
        "qEI": lambda m: qExpectedImprovement(
            m, best_f=best, sampler=SobolQMCNormalSampler(torch.Size([64]), seed=5)
        ),
        "qLogEI": lambda m: qLogExpectedImprovement(
            m, best_f=best, sampler=SobolQMCNormalSampler(torch.Size([64]), seed=5)
        ),
    }
    for acqs, shape in ((analytic, (6, 1, 3)), (mc, (4, 3, 3))):
        X0 = torch.rand(*shape, dtype=D, generator=g)
        for name, make in acqs.items():
            values, grads = [], []
            for model in (theirs, ours):
                Xg = X0.clone().requires_grad_(True)
                v = make(model)(Xg)
                (grad,) = torch.autograd.grad(v.sum(), Xg)
                values.append(v.detach())
                grads.append(grad)
            assert rel_err(values[1], values[0]) < TOL, name
            assert rel_err(grads[1], grads[0]) < TOL, name


# -- against brute force, shapes, transforms ------------------------------------------------------
def test_posterior_against_brute_force_batches_and_noise():
    net = make_net(m=2)
    fm = pf.FunctionalModel(net)
    cov = Diagonal(torch.rand(fm.num_params, dtype=D, generator=torch.Generator().manual_seed(6)))
    model = PushforwardModel(fm, cov, noise=torch.tensor([0.1, 0.2], dtype=D))
    assert model.num_outputs == 2 and model.batch_shape == torch.Size()
    Xt = torch.rand(2, 3, 4, 3, dtype=D)
    post = model.posterior(Xt)
    f, ref = brute_force_blocks(model, Xt)
    assert post.mean.shape == (2, 3, 4, 2)
    assert rel_err(post.mean, f) < 1e-12
    assert rel_err(post.distribution.covariance_matrix, ref.reshape(2, 3, 8, 8)) < 1e-12
    noisy = model.posterior(Xt, observation_noise=True).distribution.covariance_matrix
    assert (
        rel_err(
            noisy - post.distribution.covariance_matrix, torch.diag(torch.tensor([0.1, 0.2] * 4))
        )
        < 1e-12
    )
    given = torch.rand(2, 3, 4, 2, dtype=D)
    noisy = model.posterior(Xt, observation_noise=given).distribution.covariance_matrix
    expected = post.distribution.covariance_matrix + torch.diag_embed(given.reshape(2, 3, 8))
    assert rel_err(noisy, expected) < 1e-12
    single = model.posterior(Xt[0, 0])  # q x d: one t-batch
    assert single.mean.shape == (4, 2)
    assert rel_err(single.distribution.covariance_matrix, ref[0]) < 1e-12


def test_transforms():
    net = make_net()
    _X, Y = data(m=1)
    fm = pf.FunctionalModel(net)
    cov = Diagonal(torch.full((fm.num_params,), 0.01, dtype=D))
    bounds = torch.tensor([[0.0, -1.0, 2.0], [2.0, 1.0, 4.0]], dtype=D)
    standardize = Standardize(m=1)
    standardize(Y)
    model = PushforwardModel(
        fm,
        cov,
        noise=0.01,
        input_transform=Normalize(d=3, bounds=bounds),
        outcome_transform=standardize,
    )
    Xt = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(5, 2, 3, dtype=D)
    plain = PushforwardModel(fm, cov).posterior((Xt - bounds[0]) / (bounds[1] - bounds[0]))
    post = model.posterior(Xt)
    mu, sd = standardize.means.squeeze(), standardize.stdvs.squeeze()
    assert rel_err(post.mean, mu + sd * plain.mean) < 1e-12
    assert rel_err(post.variance, sd**2 * plain.variance) < 1e-12


def test_gradcheck_posterior_wrt_inputs():
    net = make_net(m=2)
    fm = pf.FunctionalModel(net)
    g = torch.Generator().manual_seed(7)
    factors = {}
    for name, shape in fm.layout.shapes.items():
        sides = [shape[0], shape[1:].numel()] if len(shape) == 2 else [shape[0]]
        factors[name] = tuple(
            (lambda A: A @ A.T / n + 0.1 * torch.eye(n))(torch.randn(n, n, generator=g))
            for n in sides
        )
    for cov in (Kronecker(factors), Diagonal(torch.rand(fm.num_params, generator=g, dtype=D))):
        model = PushforwardModel(fm, cov, noise=0.05)
        conditioned = model.condition_on_observations(*data(n=3, m=2))
        for m in (model, conditioned):

            def moments(X, m=m):
                post = m.posterior(X)
                return post.mean, post.distribution.covariance_matrix

            X = torch.rand(2, 3, 3, dtype=D, generator=g, requires_grad=True)
            assert torch.autograd.gradcheck(moments, (X,), fast_mode=True)


def test_subset_output():
    net = make_net(m=3)
    fm = pf.FunctionalModel(net)
    cov = Diagonal(torch.rand(fm.num_params, dtype=D))
    model = PushforwardModel(fm, cov, noise=torch.tensor([0.1, 0.2, 0.3], dtype=D))
    sub = model.subset_output([2, 0])
    assert sub.num_outputs == 2 and model.num_outputs == 3
    Xt = torch.rand(3, 2, 3, dtype=D)
    full = model.posterior(Xt, observation_noise=True)
    part = sub.posterior(Xt, observation_noise=True)
    index = torch.tensor([2, 0, 5, 3])
    C = full.distribution.covariance_matrix
    assert rel_err(part.distribution.covariance_matrix, C[:, index][:, :, index]) < 1e-12
    assert rel_err(part.mean, full.mean[..., [2, 0]]) < 1e-12
    assert rel_err(sub.subset_output([1]).posterior(Xt).mean, full.mean[..., :1]) < 1e-12


# -- pathwise samples ---------------------------------------------------------------------------
def test_pathwise_samples_covariance_and_consistency():
    _net, la, _, _ = fitted("kron")
    model = PushforwardModel.from_laplace(la)
    n = 2000
    paths = model.function_samples(n, generator=torch.Generator().manual_seed(8))
    Xt = torch.rand(2, 3, 3, dtype=D, generator=torch.Generator().manual_seed(9))
    S = paths(Xt)  # (n, 2, 3, 1)
    assert S.shape == (n, 2, 3, 1)
    again = paths(Xt[1:, 1:])  # another batch: the same functions
    assert (S[:, 1:, 1:] - again).abs().max().item() < 1e-12
    # joint covariance across all 6 points (across t-batches too)
    f, ref = pf.functional_covariance(
        model.functional_model, Xt.reshape(-1, 3), model.covariance, joint=True
    )
    centered = S.reshape(n, -1) - f.reshape(1, -1)
    emp = centered.T @ centered / n
    d = ref.diagonal()
    se = ((torch.outer(d, d) + ref.square()) / n).sqrt()
    z = (emp - ref) / se
    assert z.abs().max().item() < 5.0
    assert 0.5 < z.square().mean().item() < 1.5


def test_pathwise_sampler_and_thompson_sampling():
    _net, la, _X, Y = fitted("kron")
    model = PushforwardModel.from_laplace(la)
    sampler = PathwiseSampler(torch.Size([32]), seed=10)
    acqf = qLogExpectedImprovement(model, best_f=Y.max(), sampler=sampler)
    Xt = torch.rand(4, 2, 3, dtype=D, requires_grad=True)
    v1 = acqf(Xt)
    (grad,) = torch.autograd.grad(v1.sum(), Xt)
    assert v1.shape == (4,) and torch.isfinite(grad).all()
    v2 = acqf(Xt[2:])  # the same sample functions for a sub-batch
    assert (v1[2:] - v2).abs().max().item() < 1e-12
    samples = sampler(model.posterior(Xt.detach()))
    assert samples.shape == (32, 4, 2, 1)
    expected = model.function_samples(32, generator=torch.Generator().manual_seed(10))(Xt.detach())
    assert (samples - expected).abs().max().item() < 1e-12
    bounds = torch.stack([torch.zeros(3, dtype=D), torch.ones(3, dtype=D)])
    cand, values = thompson_candidates(
        model,
        bounds,
        3,
        generator=torch.Generator().manual_seed(11),
        num_restarts=2,
        raw_samples=16,
    )
    assert cand.shape == (3, 3) and values.shape == (3,)
    paths = PathwiseThompsonSampling(model, 3, generator=torch.Generator().manual_seed(11)).paths
    grid = torch.rand(256, 1, 3, dtype=D)
    for i in range(3):  # each candidate beats random points of its own sample function
        assert values[i] >= paths(grid)[i].max() - 1e-6


# -- conditioning -------------------------------------------------------------------------------
def test_condition_on_observations_equals_refit():
    net, la, X, Y = fitted("full")
    Xn, Yn = data(n=4, seed=12)
    refit = Laplace(  # same θ*, same prior and noise, curvature of old and new points
        net, "regression", "all", "full", sigma_noise=0.3, prior_precision=1.5
    )
    both = du.TensorDataset(torch.cat([X, Xn]), torch.cat([Y, Yn]))
    refit.fit(du.DataLoader(both, batch_size=5))
    model = PushforwardModel.from_laplace(la)
    conditioned = model.condition_on_observations(Xn, Yn)
    Xt = torch.rand(3, 2, 3, dtype=D, generator=torch.Generator().manual_seed(13))
    ref = PushforwardModel.from_laplace(refit).posterior(Xt)
    post = conditioned.posterior(Xt)
    # the covariance is the refit's at the same θ*; the mean moves (tests/test_bo_conditioning.py)
    assert rel_err(post.distribution.covariance_matrix, ref.distribution.covariance_matrix) < TOL
    S_ref = refit.posterior_covariance
    assert isinstance(conditioned.covariance, PrecisionUpdate)
    assert rel_err(conditioned.covariance.to_dense(), S_ref) < TOL
    # twice, in two steps, is once with all the points
    two = model.condition_on_observations(Xn[:2], Yn[:2]).condition_on_observations(Xn[2:], Yn[2:])
    assert rel_err(two.posterior(Xt).variance, post.variance) < TOL


def test_condition_kronecker_and_fantasize():
    _net, la, _X, _Y = fitted("kron")
    model = PushforwardModel.from_laplace(la)
    Xn, Yn = data(n=3, seed=14)
    conditioned = model.condition_on_observations(Xn, Yn)
    Xt = torch.rand(2, 2, 3, dtype=D, generator=torch.Generator().manual_seed(15))
    _, Jn = pf.jacobian(model.functional_model, Xn)
    S = model.covariance.to_dense()
    S_new = torch.linalg.inv(
        torch.linalg.inv(S) + Jn[:, 0].T @ Jn[:, 0] / la.sigma_noise.item() ** 2
    )
    _f, J = pf.jacobian(model.functional_model, Xt.reshape(-1, 3))
    J = J.reshape(2, 2, -1)
    assert (
        rel_err(
            conditioned.posterior(Xt).distribution.covariance_matrix,
            J @ S_new @ J.transpose(-1, -2),
        )
        < TOL
    )
    # fantasies: batch of conditioning sets, fantasy dimension in front
    Xf = torch.rand(5, 2, 3, dtype=D)
    fantasy = model.fantasize(Xf, SobolQMCNormalSampler(torch.Size([4]), seed=16))
    assert fantasy.batch_shape == (4, 5)
    post = fantasy.posterior(torch.rand(4, 5, 1, 3, dtype=D))
    assert post.mean.shape == (4, 5, 1, 1)
    for b in (0, 3):  # each batch element is conditioned on its own points
        one = model.condition_on_observations(Xf[b], torch.zeros(2, 1, dtype=D))
        Xe = torch.rand(1, 3, dtype=D)
        expected = one.posterior(Xe).variance
        got = fantasy.posterior(Xe.expand(4, 5, 1, 3)).variance[:, b]
        assert rel_err(got, expected.expand_as(got)) < TOL


def test_errors():
    net = make_net()
    fm = pf.FunctionalModel(net)
    cov = Diagonal(torch.ones(fm.num_params, dtype=D))
    with pytest.raises(ValueError, match="likelihood must be one of"):
        PushforwardModel(fm, cov, likelihood="classification")
    model = PushforwardModel(fm, cov)
    with pytest.raises(ValueError, match="observation_noise=True needs the model's noise"):
        model.posterior(torch.rand(2, 3, dtype=D), observation_noise=True)
    with pytest.raises(ValueError, match="conditioning needs the observation noise"):
        model.condition_on_observations(torch.rand(2, 3, dtype=D), torch.rand(2, 1, dtype=D))
    with pytest.raises(ValueError, match=r"output indices must lie in \[0, 1\)"):
        model.posterior(torch.rand(2, 3, dtype=D), output_indices=[1])
    with pytest.raises(ValueError, match=r"num_outputs=2\)"):
        PushforwardModel(fm, cov, num_outputs=2).posterior(torch.rand(2, 3, dtype=D))
    with pytest.raises(TypeError, match="covariance operator"):
        PushforwardModel(fm, torch.eye(fm.num_params))
    with pytest.raises(ValueError, match="PathwiseSampler samples posteriors"):
        PathwiseSampler(torch.Size([2]))(
            LaplaceBoTorch(lambda: net, *data(), bnn=fitted("diag")[1]).posterior(torch.rand(1, 3))
        )
