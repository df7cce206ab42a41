"""Exact conditioning of PushforwardModel: the linearized network with N(θ*, S) is a Gaussian
process with mean f(x; θ*) and kernel J(x) S J(x')^T, and conditioning it on observations moves
both moments. Checked against the GP formula with the kernel from brute-force Jacobians
(float64), against laplace-torch's FullLaplace refitted on the linearized network, through
fantasies and qKnowledgeGradient, and for pathwise samples."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.data as du
from conftest import rel_err
from torch import nn
from torch.func import functional_call, jvp

import pushforward as pf
from pushforward.testing import brute_force_jacobian

pytest.importorskip("botorch")

from botorch.acquisition import qKnowledgeGradient
from botorch.models.transforms.input import Normalize
from botorch.models.transforms.outcome import Standardize
from botorch.sampling.normal import SobolQMCNormalSampler

from pushforward.botorch import PathwiseSampler, PushforwardModel
from pushforward.covariance import Dense

D = torch.float64
TOL = 1e-8


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Small products: one thread is fastest."""


@pytest.fixture(autouse=True)
def _quiet_float64():
    """float64 by default: laplace-torch's default (curvlinops) GGN makes tensors of the
    default dtype, and in float32 its float64 curvature is off by ~1e-8 relative."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_default_dtype(old)


def make_model(m: int = 2, seed: int = 0, **kwargs) -> PushforwardModel:
    """A 3-6-m tanh network with a random dense S and per-output noise."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, m)).to(D)
    P = pf.FunctionalModel(net).num_params
    A = torch.randn(P, P, dtype=D)
    S = A @ A.T / P + 0.05 * torch.eye(P, dtype=D)
    kwargs.setdefault("noise", torch.linspace(0.05, 0.2, m, dtype=D))
    return PushforwardModel(net, Dense(S), **kwargs)


def gp_posterior(model: PushforwardModel, Xt: torch.Tensor, Xn, Yn, noise):
    """Mean ``(N m,)`` and covariance ``(N m, N m)`` of the GP with kernel J S J^T conditioned
    on ``(Xn, Yn)`` with noise variances ``noise`` (``n x m``), all from brute-force Jacobians."""
    fm = model.functional_model
    S = model.covariance.to_dense()
    ft, Jt = brute_force_jacobian(fm, Xt)
    fn, Jn = brute_force_jacobian(fm, Xn)
    Jt, Jn = Jt.reshape(-1, fm.num_params), Jn.reshape(-1, fm.num_params)
    C = Jn @ S @ Jn.T + torch.diag(noise.reshape(-1))
    Ktn = Jt @ S @ Jn.T
    mean = ft.reshape(-1) + Ktn @ torch.linalg.solve(C, (Yn - fn).reshape(-1))
    cov = Jt @ S @ Jt.T - Ktn @ torch.linalg.solve(C, Ktn.T)
    return mean, cov


def blocks(cov: torch.Tensor, q: int, m: int) -> torch.Tensor:
    """The per-t-batch diagonal blocks ``(B, q m, q m)`` of a joint covariance."""
    B = cov.shape[0] // (q * m)
    return torch.stack(
        [cov[b * q * m : (b + 1) * q * m, b * q * m : (b + 1) * q * m] for b in range(B)]
    )


def observations(n: int, m: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 3, generator=g, dtype=D)
    Y = torch.randn(n, m, generator=g, dtype=D)
    noise = 0.05 + torch.rand(n, m, generator=g, dtype=D)
    return X, Y, noise


# -- the GP formula ----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2])
def test_conditioning_equals_gp_formula(m):
    model = make_model(m)
    Xn, Yn, noise = observations(4, m)
    conditioned = model.condition_on_observations(Xn, Yn, noise=noise)
    Xt = torch.rand(5, 3, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    mean, cov = gp_posterior(model, Xt.reshape(-1, 3), Xn, Yn, noise)
    post = conditioned.posterior(Xt)
    assert rel_err(post.mean.reshape(-1), mean) < TOL
    assert rel_err(post.distribution.covariance_matrix, blocks(cov, 3, m)) < TOL
    # the mean moved: the unconditioned model's differs by far more than the tolerance
    assert rel_err(model.posterior(Xt).mean.reshape(-1), mean) > 1e-3
    # the model's own noise when none is given
    default = model.condition_on_observations(Xn, Yn).posterior(Xt)
    mean, _ = gp_posterior(model, Xt.reshape(-1, 3), Xn, Yn, model.noise.expand(4, m))
    assert rel_err(default.mean.reshape(-1), mean) < TOL


def test_repeated_conditioning_composes():
    model = make_model()
    Xn, Yn, noise = observations(5)
    once = model.condition_on_observations(Xn, Yn, noise=noise)
    twice = model.condition_on_observations(Xn[:2], Yn[:2], noise=noise[:2])
    twice = twice.condition_on_observations(Xn[2:], Yn[2:], noise=noise[2:])
    Xt = torch.rand(4, 2, 3, dtype=D, generator=torch.Generator().manual_seed(3))
    mean, cov = gp_posterior(model, Xt.reshape(-1, 3), Xn, Yn, noise)
    for conditioned in (once, twice):
        post = conditioned.posterior(Xt)
        assert rel_err(post.mean.reshape(-1), mean) < TOL
        assert rel_err(post.distribution.covariance_matrix, blocks(cov, 2, 2)) < TOL
    # the weight-space view: θ̄ - θ* and S' give the same moments
    fm = model.functional_model
    ft, Jt = brute_force_jacobian(fm, Xt.reshape(-1, 3))
    Jt = Jt.reshape(-1, fm.num_params)
    assert rel_err(ft.reshape(-1) + Jt @ once.weight_shift, mean) < TOL
    assert rel_err(Jt @ once.covariance.to_dense() @ Jt.T, cov) < TOL


def test_batched_conditioning_sets_and_fantasy_dimensions():
    """A batch of conditioning sets (one per t-batch) and observed values with extra leading
    (fantasy) dimensions: every batch element is the GP formula with its own points."""
    model = make_model()
    g = torch.Generator().manual_seed(4)
    Xn = torch.rand(3, 2, 3, generator=g, dtype=D)  # 3 conditioning sets of 2 points
    Yn = torch.randn(4, 3, 2, 2, generator=g, dtype=D)  # 4 fantasies of each
    conditioned = model.condition_on_observations(Xn, Yn)
    assert conditioned.batch_shape == (4, 3)
    Xt = torch.rand(4, 3, 2, 3, generator=g, dtype=D)
    post = conditioned.posterior(Xt)
    assert post.mean.shape == (4, 3, 2, 2)
    for i in (0, 3):
        for b in range(3):
            mean, cov = gp_posterior(model, Xt[i, b], Xn[b], Yn[i, b], model.noise.expand(2, 2))
            assert rel_err(post.mean[i, b].reshape(-1), mean) < TOL
            assert rel_err(post.distribution.covariance_matrix[i, b], cov) < TOL
    # one shared set with fantasies in front: the weight-space path, same formula
    shared = model.condition_on_observations(Xn[0], Yn[:, 0])
    assert shared.batch_shape == (4,)
    post = shared.posterior(Xt[:, 0])
    for i in range(4):
        mean, cov = gp_posterior(model, Xt[i, 0], Xn[0], Yn[i, 0], model.noise.expand(2, 2))
        assert rel_err(post.mean[i].reshape(-1), mean) < TOL
        assert rel_err(post.distribution.covariance_matrix[i], cov) < TOL


def test_conditioning_through_transforms_and_output_subsets():
    """Y is outcome-transformed like the training targets (noise already in that space), X
    input-transformed; subsetting the outputs afterwards gives the marginal."""
    bounds = torch.tensor([[-1.0, 0.0, 2.0], [1.0, 4.0, 3.0]], dtype=D)
    standardize = Standardize(m=2)
    standardize(torch.randn(10, 2, dtype=D, generator=torch.Generator().manual_seed(5)) * 3 + 1)
    normalize = Normalize(d=3, bounds=bounds)
    model = make_model(outcome_transform=standardize, input_transform=normalize)
    Xu, Yu, noise = observations(3)
    X = bounds[0] + (bounds[1] - bounds[0]) * Xu
    Y = Yu * standardize.stdvs + standardize.means
    conditioned = model.condition_on_observations(X, Y, noise=noise)
    Xt = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(2, 2, 3, dtype=D)
    mean, cov = gp_posterior(model, normalize(Xt).reshape(-1, 3), Xu, Yu, noise)
    post = conditioned.posterior(Xt)
    expected = mean.reshape(2, 2, 2) * standardize.stdvs + standardize.means
    assert rel_err(post.mean, expected) < TOL
    second = conditioned.subset_output([1]).posterior(Xt)
    assert rel_err(second.mean, expected[..., 1:]) < TOL
    scale = standardize.stdvs[0, 1] ** 2
    var = torch.diagonal(cov).reshape(2, 2, 2)[..., 1:] * scale
    assert rel_err(second.variance, var) < TOL


def test_gradients_of_the_conditioned_posterior():
    model = make_model(m=1)
    Xn, Yn, noise = observations(3, 1)
    conditioned = model.condition_on_observations(Xn, Yn, noise=noise)
    X = torch.rand(2, 2, 3, dtype=D, requires_grad=True)

    def moments(X):
        post = conditioned.posterior(X)
        return post.mean, post.distribution.covariance_matrix

    assert torch.autograd.gradcheck(moments, (X,))


# -- against laplace-torch: a refit of the linearized network ---------------------------------
class Linearized(nn.Module):
    """``f(x; θ*) + J(x)(θ - θ*)``: the network linearized at θ*, with θ its parameters."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.anchor = [p.detach().clone() for p in net.parameters()]
        self.theta = nn.ParameterList([nn.Parameter(p.clone()) for p in self.anchor])
        for p in net.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        at = dict(zip(self.names, self.anchor, strict=True))
        step = {n: t - a for n, t, a in zip(self.names, self.theta, self.anchor, strict=True)}
        f, Jv = jvp(lambda p: functional_call(self.net, p, (x,)), (at,), (step,))
        return f + Jv


def test_conditioning_equals_laplace_refit_of_the_linearized_network():
    """Old data the network interpolates, the prior N(θ*, δ⁻¹ I): the Laplace posterior is then
    the exact posterior of the linearized network, N(θ*, S). Adding new data and refitting the
    linearized network (its MAP by L-BFGS, laplace-torch's FullLaplace at the MAP, same prior
    and noise) must give the conditioned model."""
    from laplace import Laplace

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    g = torch.Generator().manual_seed(8)
    X_old = torch.rand(12, 2, generator=g, dtype=D)
    with torch.no_grad():
        Y_old = net(X_old)
    Xn = torch.rand(5, 2, generator=g, dtype=D)
    Yn = torch.randn(5, 1, generator=g, dtype=D)
    sigma, delta = 0.3, 2.0
    old = Laplace(
        net, "regression", "all", "full", sigma_noise=sigma, prior_precision=delta,
        prior_mean=theta,
    )  # fmt: skip
    old.fit(du.DataLoader(du.TensorDataset(X_old, Y_old), batch_size=6))
    conditioned = PushforwardModel.from_laplace(old).condition_on_observations(Xn, Yn)

    lin = Linearized(net)
    X_all, Y_all = torch.cat([X_old, Xn]), torch.cat([Y_old, Yn])
    opt = torch.optim.LBFGS(
        lin.theta, lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=0,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective():
        opt.zero_grad()
        step = torch.cat([(t - a).reshape(-1) for t, a in zip(lin.theta, lin.anchor, strict=True)])
        loss = (
            0.5 * ((lin(X_all) - Y_all) ** 2).sum() / sigma**2 + 0.5 * delta * step.square().sum()
        )
        loss.backward()
        return loss

    opt.step(objective)
    loader = du.DataLoader(du.TensorDataset(X_all, Y_all), batch_size=6)
    for _ in range(2):  # Newton steps with laplace-torch's Hessian: exact for the quadratic
        refit = Laplace(
            lin, "regression", "all", "full", sigma_noise=sigma, prior_precision=delta,
            prior_mean=theta,
        )  # fmt: skip
        refit.fit(loader)
        objective()
        grad = torch.cat([t.grad.reshape(-1) for t in lin.theta])
        step = torch.linalg.solve(refit.posterior_precision, grad)
        with torch.no_grad():
            now = torch.nn.utils.parameters_to_vector(lin.theta) - step
            torch.nn.utils.vector_to_parameters(now, lin.theta)
    refit = Laplace(
        lin, "regression", "all", "full", sigma_noise=sigma, prior_precision=delta,
        prior_mean=theta,
    )  # fmt: skip
    refit.fit(loader)
    Xt = torch.rand(6, 2, generator=g, dtype=D)
    mean, cov = refit(Xt, pred_type="glm", joint=True)
    post = conditioned.posterior(Xt)  # one t-batch of 6 points: their joint covariance
    assert rel_err(post.mean.reshape(-1), mean.reshape(-1)) < TOL
    assert rel_err(post.distribution.covariance_matrix, cov) < TOL
    assert rel_err(conditioned.covariance.to_dense(), refit.posterior_covariance) < TOL


# -- fantasies and look-ahead acquisitions ----------------------------------------------------
def test_fantasize_and_knowledge_gradient_depend_on_the_candidate():
    model = make_model(m=1)
    Xf = torch.rand(3, 2, 3, dtype=D, generator=torch.Generator().manual_seed(9))
    fantasy = model.fantasize(Xf, SobolQMCNormalSampler(torch.Size([4]), seed=10))
    assert fantasy.batch_shape == (4, 3)
    Xe = torch.rand(1, 3, dtype=D).expand(4, 3, 1, 3)
    means = fantasy.posterior(Xe).mean
    assert means.std(0).min() > 1e-3  # fantasies differ in their mean ...
    variances = fantasy.posterior(Xe).variance
    assert rel_err(variances[0], variances[3]) < TOL  # ... not in their covariance

    qkg = qKnowledgeGradient(model, num_fantasies=4)
    g = torch.Generator().manual_seed(11)
    X = torch.rand(6, 1 + 4, 3, generator=g, dtype=D)  # candidate and 4 fantasy maximizers
    values = qkg(X)
    assert values.shape == (6,) and bool(torch.isfinite(values).all())
    moved = X.clone()
    moved[:, 0] = torch.rand(6, 3, generator=g, dtype=D)  # other candidates, same solutions
    assert (qkg(moved) - values).abs().max() > 1e-4


# -- pathwise samples of a conditioned model ---------------------------------------------------
def test_pathwise_samples_follow_the_conditioned_posterior():
    model = make_model(m=1)
    Xn, Yn, noise = observations(3, 1)
    Yn = Yn + 2.0  # far from the prior mean: a large shift
    conditioned = model.condition_on_observations(Xn, Yn, noise=noise)
    Xt = torch.rand(1, 4, 3, dtype=D, generator=torch.Generator().manual_seed(12))
    n = 4000
    samples = conditioned.function_samples(n, generator=torch.Generator().manual_seed(13))(Xt)
    post = conditioned.posterior(Xt)
    sd = post.variance.sqrt()
    shift = (post.mean - model.posterior(Xt).mean).abs()
    assert bool((shift > 20 * sd / n**0.5).all())  # the check below can see a missing shift
    assert bool(((samples.mean(0) - post.mean).abs() < 5 * sd / n**0.5).all())
    empirical = torch.cov(samples.reshape(n, -1).T)
    assert rel_err(empirical, post.distribution.covariance_matrix[0]) < 0.1
    # the sampler of MC acquisitions draws the same functions
    sampler = PathwiseSampler(torch.Size([n]), seed=14)
    drawn = sampler(post)
    assert bool(((drawn.mean(0) - post.mean).abs() < 5 * sd / n**0.5).all())


def test_pathwise_samples_of_a_fantasy_model_are_refused():
    model = make_model(m=1)
    fantasy = model.fantasize(torch.rand(3, 2, 3, dtype=D), SobolQMCNormalSampler(torch.Size([2])))
    with pytest.raises(ValueError, match="fantasy model"):
        fantasy.function_samples(4)


# -- bad input ---------------------------------------------------------------------------------
def test_conditioning_refuses_non_finite_inputs_and_noise():
    model = make_model(m=1)
    X, Y, noise = observations(3, 1)
    bad = X.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite X"):
        model.condition_on_observations(bad, Y)
    with pytest.raises(ValueError, match="non-finite Y"):
        model.condition_on_observations(X, Y.clone().fill_(float("inf")))
    noisy = noise.clone()
    noisy[0, 0] = float("nan")
    with pytest.raises(ValueError, match="noise variances must be finite and positive"):
        model.condition_on_observations(X, Y, noise=noisy)
    with pytest.raises(ValueError, match="noise must broadcast"):
        model.condition_on_observations(X, Y, noise=torch.ones(4, 1, dtype=D))
