"""What a laplace-bayesopt user runs into with PushforwardModel: observation noise in every
posterior, hyperparameters tuned with gradients, a LaplaceBoTorch given to from_laplace,
minimizing Thompson sampling, float32 networks with float64 inputs, 2-d inputs, and clear
errors for misshaped noise."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.utils.data as du
from conftest import rel_err
from torch import nn

import pushforward as pf

pytest.importorskip("botorch")
laplace = pytest.importorskip("laplace")
pytest.importorskip("laplace_bayesopt")

from botorch.acquisition import ExpectedImprovement, qLogExpectedImprovement  # noqa: E402
from botorch.models.transforms.outcome import Standardize  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace_bayesopt.botorch import LaplaceBoTorch  # noqa: E402

from pushforward.botorch import PushforwardModel, thompson_candidates  # noqa: E402
from pushforward.covariance import Diagonal  # noqa: E402

D = torch.float64
TOL = 1e-8


@pytest.fixture(autouse=True)
def _float64_quiet():
    """LaplaceBoTorch adds its noise with ``torch.eye`` of the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Small products: one thread is fastest."""


def net_and_data(seed: int = 0, dtype: torch.dtype = D):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.rand(16, 3, generator=g, dtype=D).to(dtype)
    return net, X, X.sin().sum(-1, keepdim=True)


def tuned_laplace():
    """A Kronecker Laplace whose prior precision and noise were tuned with Adam through
    ``la.log_marginal_likelihood(prior, sigma)``, as LaplaceBoTorch does: laplace-torch keeps
    them with their autograd graph."""
    net, X, Y = net_and_data()
    la = Laplace(net, "regression", hessian_structure="kron", enable_backprop=True)
    la.fit(du.DataLoader(du.TensorDataset(X, Y), batch_size=8))
    log_prior = torch.zeros(1, requires_grad=True)
    log_sigma = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        opt.step()
    assert la.prior_precision.requires_grad  # the graph is really there
    return net, la, X, Y


# -- noise in every posterior -------------------------------------------------------------------
def test_observation_noise_option_reproduces_laplace_botorch_without_a_subclass():
    net, la, X, Y = tuned_laplace()
    reference = LaplaceBoTorch(lambda: net, X, Y, bnn=la)
    model = PushforwardModel.from_laplace(la, observation_noise=True)
    Xt = torch.rand(5, 2, 3)
    for acqf in (ExpectedImprovement, qLogExpectedImprovement):
        a = acqf(model, best_f=Y.max())(Xt[:, :1] if acqf is ExpectedImprovement else Xt)
        b = acqf(reference, best_f=Y.max())(Xt[:, :1] if acqf is ExpectedImprovement else Xt)
        if acqf is ExpectedImprovement:  # analytic: exact
            assert rel_err(a, b) < TOL
    post, ref = model.posterior(Xt), reference.posterior(Xt)
    assert rel_err(post.distribution.covariance_matrix, ref.distribution.covariance_matrix) < TOL
    # the default is BoTorch's: the latent function unless asked
    plain = PushforwardModel.from_laplace(la)
    sigma2 = la.sigma_noise.detach() ** 2
    assert rel_err(plain.posterior(Xt).variance + sigma2, ref.variance) < TOL
    assert rel_err(plain.posterior(Xt, observation_noise=True).variance, ref.variance) < TOL
    with pytest.raises(ValueError, match="observation_noise=True needs the noise variance"):
        PushforwardModel(net, Diagonal(torch.ones(41)), observation_noise=True)


# -- from_laplace ------------------------------------------------------------------------------
def test_from_laplace_detaches_tuned_hyperparameters():
    _net, la, _X, Y = tuned_laplace()
    model = PushforwardModel.from_laplace(la)
    assert not any(t.requires_grad for t in model.covariance.tensors())
    copy.deepcopy(model)  # a graph in the covariance makes deepcopy raise
    for _ in range(2):  # a second backward through a kept graph raises
        X = torch.rand(4, 1, 3, requires_grad=True)
        ExpectedImprovement(model, best_f=Y.max())(X).sum().backward()
        assert X.grad is not None and bool(torch.isfinite(X.grad).all())


def test_from_laplace_accepts_a_laplace_botorch():
    net, X, Y = net_and_data(3)
    reference = LaplaceBoTorch(
        lambda: net, X, Y, outcome_transform=Standardize(m=1), n_epochs=20,
        posthoc_marglik_iters=5,
    )  # fmt: skip
    model = PushforwardModel.from_laplace(reference)
    assert model.observation_noise and hasattr(model, "outcome_transform")
    Xt = torch.rand(4, 2, 3)
    post, ref = model.posterior(Xt), reference.posterior(Xt)
    assert rel_err(post.mean, ref.mean) < TOL
    assert rel_err(post.distribution.covariance_matrix, ref.distribution.covariance_matrix) < TOL
    fm, cov = pf.from_laplace(reference)  # the functional API takes it too
    assert fm.num_params == model.functional_model.num_params
    assert torch.equal(cov.to_dense(), model.covariance.to_dense())
    latent = PushforwardModel.from_laplace(reference, observation_noise=False)
    assert bool((latent.posterior(Xt).variance < ref.variance).all())
    with pytest.raises(ValueError, match="bnn is None"):
        reference.bnn = None
        PushforwardModel.from_laplace(reference)


# -- Thompson sampling -------------------------------------------------------------------------
def test_thompson_candidates_minimize():
    net, _X, _Y = net_and_data(4)
    fm = pf.FunctionalModel(net)
    model = PushforwardModel(net, Diagonal(torch.full((fm.num_params,), 0.1)), noise=0.01)
    bounds = torch.tensor([[0.0] * 3, [1.0] * 3])
    candidates, values = thompson_candidates(
        model, bounds, 2, maximize=False, generator=torch.Generator().manual_seed(5),
        num_restarts=4, raw_samples=64,
    )  # fmt: skip
    assert candidates.shape == (2, 3) and values.shape == (2,)
    paths = model.function_samples(2, generator=torch.Generator().manual_seed(5))
    grid = torch.rand(512, 1, 3, generator=torch.Generator().manual_seed(6))
    on_grid = paths(grid)[..., 0, 0]  # (2, 512)
    at = paths(candidates.unsqueeze(0)).reshape(2, 2).diagonal()
    assert rel_err(values, at) < TOL  # the values are the sample functions' own (not negated)
    assert bool((values <= on_grid.min(-1).values + 1e-6).all())


# -- dtypes and shapes of X ---------------------------------------------------------------------
def test_float32_network_with_float64_inputs_is_a_clear_error():
    net, _X, _Y = net_and_data(dtype=torch.float32)
    fm = pf.FunctionalModel(net)
    model = PushforwardModel(net, Diagonal(torch.ones(fm.num_params)), noise=0.1)
    X = torch.rand(3, 1, 3, dtype=D)
    message = "X has dtype torch.float64 but the network's parameters are torch.float32"
    with pytest.raises(ValueError, match=message):
        model.posterior(X)
    with pytest.raises(ValueError, match=message):
        model.condition_on_observations(X[:, 0], torch.zeros(3, 1, dtype=D))
    with pytest.raises(ValueError, match=message):
        model.function_samples(2)(X)
    assert model.posterior(X.float()).mean.dtype == torch.float32


def test_two_dimensional_inputs_are_one_t_batch():
    """A ``q x d`` X is one t-batch (the joint covariance of its q points, BoTorch's convention);
    LaplaceBoTorch reads it as q t-batches of one point: the same means and variances, a
    different joint covariance. ``X.unsqueeze(-2)`` gives LaplaceBoTorch's reading."""
    net, la, X, Y = tuned_laplace()
    reference = LaplaceBoTorch(lambda: net, X, Y, bnn=la)
    model = PushforwardModel.from_laplace(la, observation_noise=True)
    Xt = torch.rand(4, 3)
    joint, separate = model.posterior(Xt), model.posterior(Xt.unsqueeze(-2))
    ref = reference.posterior(Xt)
    assert joint.mean.shape == (4, 1) and ref.mean.shape == separate.mean.shape == (4, 1, 1)
    assert joint.distribution.covariance_matrix.shape == (4, 4)
    assert rel_err(joint.variance.reshape(-1), ref.variance.reshape(-1)) < TOL
    assert (
        rel_err(separate.distribution.covariance_matrix, ref.distribution.covariance_matrix) < TOL
    )
    off = joint.distribution.covariance_matrix - torch.diag(joint.variance.reshape(-1))
    assert off.abs().max() > 1e-6  # the joint reading really is joint
    with pytest.raises(ValueError, match="a 1-d X is ambiguous"):
        model.posterior(torch.rand(3))


def test_observation_noise_of_the_wrong_shape_is_a_clear_error():
    _net, la, _X, _Y = tuned_laplace()
    model = PushforwardModel.from_laplace(la)
    with pytest.raises(ValueError, match=r"observation_noise must broadcast to .* \(2, 3, 1\)"):
        model.posterior(torch.rand(2, 3, 3), observation_noise=torch.ones(2, 2, 1))
    with pytest.raises(ValueError, match="observation_noise variances must be finite and >= 0"):
        model.posterior(torch.rand(2, 3, 3), observation_noise=torch.full((2, 3, 1), -1.0))
