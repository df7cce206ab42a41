"""predictive: probit / bridge / bridge_norm against laplace-torch, streamed mc against stored
samples, regression, sequence outputs, gradients and errors (float64, fixed generators)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import rel_err, zoo_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pushforward as pf
from pushforward import FunctionalModel, functional_covariance, functional_variance
from pushforward.api.predictive import RegressionPredictive, predictive
from pushforward.api.sampling import functional_samples
from pushforward.covariance import Dense, Diagonal, LowRank
from pushforward.laplace_interop import from_laplace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

D = torch.float64
TOL = 1e-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lowrank_diag(fm: FunctionalModel, seed: int = 0) -> LowRank:
    g = gen(seed)
    P = fm.num_params
    return LowRank(
        torch.randn(P, 3, generator=g, dtype=D),
        torch.rand(3, generator=g, dtype=D),
        0.1 * torch.rand(P, generator=g, dtype=D),
    )


def laplace_torch(module: str = "laplace"):
    """A laplace-torch module; the calling test is skipped where laplace-torch is missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


def fitted(cls_name: str, likelihood: str):
    cls = getattr(laplace_torch(), cls_name)
    torch.manual_seed(0)
    K = 4 if likelihood == "classification" else 2
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, K)).to(D)
    X = torch.randn(32, 3, dtype=D)
    y = (
        torch.randint(0, K, (32,))
        if likelihood == "classification"
        else torch.randn(32, K, dtype=D)
    )
    kwargs = {"sigma_noise": 0.7} if likelihood == "regression" else {}
    la = cls(model, likelihood, prior_precision=0.5, **kwargs)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
    return la, torch.randn(5, 3, dtype=D)


@pytest.mark.parametrize("cls", ["FullLaplace", "KronLaplace"])
@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm"])
def test_links_equal_laplace_torch(cls, link):
    la, x = fitted(cls, "classification")
    fm, cov = from_laplace(la)
    ours = predictive(fm, x, cov, link=link)
    theirs = la(x, pred_type="glm", link_approx=link)
    assert ours.shape == theirs.shape == (5, 4)
    assert rel_err(ours, theirs) < TOL


def test_regression_equals_laplace_torch_plus_noise():
    la, x = fitted("FullLaplace", "regression")
    fm, cov = from_laplace(la)
    f_mu, f_var = la(x, pred_type="glm")
    out = predictive(fm, x, cov, likelihood="regression")
    assert isinstance(out, RegressionPredictive)
    mean, variance = out
    assert rel_err(mean, f_mu) < TOL
    assert rel_err(variance, f_var.diagonal(dim1=-2, dim2=-1)) < TOL
    noisy = predictive(fm, x, cov, likelihood="regression", noise_variance=la.sigma_noise**2)
    assert rel_err(noisy.variance, variance + la.sigma_noise**2) < TOL
    per_output = torch.tensor([0.1, 0.2], dtype=D)
    noisy = predictive(fm, x, cov, likelihood="regression", noise_variance=per_output)
    assert rel_err(noisy.variance, variance + per_output) < TOL


def laplace_formula(f: torch.Tensor, C: torch.Tensor, link: str) -> torch.Tensor:
    """laplace-torch's own link code run on our f (N, K) and per-example covariance (N, K, K)."""
    BaseLaplace = laplace_torch("laplace.baselaplace").BaseLaplace
    fake = SimpleNamespace(
        _glm_predictive_distribution=lambda x, joint=False: (f.clone(), C.clone()),
        _device=f.device,
        _dtype=f.dtype,
    )
    return BaseLaplace._glm_forward_call(fake, None, "classification", link_approx=link)


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("name", ["gpt2_tiny", "tied_embedding_lm", "multi_output_regression"])
def test_sequence_and_multi_dim_outputs_follow_laplace_torch_formulas(name):
    case, f_ref, _ = zoo_reference(name)
    cov = lowrank_diag(case.fm)
    f, C = functional_covariance(case.fm, case.x, cov)
    K = C.shape[-1]
    flat_f, flat_C = f.reshape(-1, K), C.reshape(-1, K, K)
    for link in ("probit", "bridge", "bridge_norm"):
        ours = predictive(case.fm, case.x, cov, link=link)
        assert ours.shape == f_ref.shape
        theirs = laplace_formula(flat_f, flat_C, link).reshape(f_ref.shape)
        assert rel_err(ours, theirs) < TOL, link
        sums = ours.reshape(-1, K).sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-12)


def test_bridge_is_stable_at_large_logits():
    """At logits of ±800 laplace-torch's exp(f) overflows (its NaN guard then returns 1 for every
    class); the log-space evaluation agrees with it where it does not overflow and stays a
    distribution where it does."""
    from pushforward.api.predictive import _bridge

    C = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=D)).unsqueeze(0)
    f = torch.tensor([[300.0, 0.0, -300.0]], dtype=D)
    assert rel_err(_bridge(f, C, normalize=False), laplace_formula(f, C, "bridge")) < TOL
    f = torch.tensor([[800.0, 0.0, -800.0]], dtype=D)
    probs = _bridge(f, C, normalize=False)
    assert torch.isfinite(probs).all() and probs[0, 0] > 0.999
    assert abs(probs.sum().item() - 1) < 1e-12
    assert laplace_formula(f, C, "bridge").sum() > 2


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("name", ["mlp", "gpt2_tiny", "tied_embedding_lm"])
def test_mc_equals_average_of_stored_sample_softmaxes(name):
    case, f_ref, _ = zoo_reference(name)
    cov = lowrank_diag(case.fm, seed=1)
    samples = functional_samples(case.fm, case.x, cov, 30, generator=gen(7))
    explicit = samples.softmax(-1).mean(0)
    ours = predictive(case.fm, case.x, cov, link="mc", n_samples=30, generator=gen(7))
    assert ours.shape == f_ref.shape
    assert rel_err(ours, explicit) < 1e-12
    # a budget that forces chunks of a few samples streams the same average
    full = pf.plan(case.fm, case.x, cov, strategy="monte_carlo", n_samples=30)
    tiny = full.estimate.memory // 3
    chunks = pf.plan(
        case.fm, case.x, cov, strategy="monte_carlo", n_samples=30, memory_budget=tiny
    ).chunk_size
    assert chunks < 30
    chunked = predictive(
        case.fm, case.x, cov, link="mc", n_samples=30, generator=gen(7), memory_budget=tiny
    )
    assert rel_err(chunked, explicit) < 1e-12


def test_mc_converges_to_the_gaussian_expectation():
    """With a diagonal output covariance the expectation factorizes per example; compare the
    streamed average with an independent large-sample estimate from f and the exact variance."""
    case, f_ref, _ = zoo_reference("mlp")
    cov = lowrank_diag(case.fm)
    _, C = functional_covariance(case.fm, case.x, cov)
    z = torch.randn(20000, *f_ref.shape, generator=gen(3), dtype=D)
    direct = (f_ref + torch.einsum("bkl,nbl->nbk", torch.linalg.cholesky(C), z)).softmax(-1)
    ours = predictive(case.fm, case.x, cov, link="mc", n_samples=4000, generator=gen(4))
    se = direct.std(0) / 4000**0.5  # ours has the larger standard error of the two
    assert ((ours - direct.mean(0)).abs() <= 5 * se + 1e-12).all()


def test_regression_options_and_strategies():
    case, f_ref, _ = zoo_reference("multi_output_regression")
    cov = lowrank_diag(case.fm)
    _, var = functional_variance(case.fm, case.x, cov)
    mean, variance = predictive(case.fm, case.x, cov, likelihood="regression", noise_variance=0.3)
    assert mean.shape == variance.shape == f_ref.shape
    assert rel_err(mean, f_ref) < TOL and rel_err(variance, var + 0.3) < TOL
    mc = predictive(
        case.fm,
        case.x,
        cov,
        likelihood="regression",
        strategy="monte_carlo",
        n_samples=50,
        generator=gen(2),
    )
    _, mc_var = functional_variance(
        case.fm, case.x, cov, strategy="monte_carlo", n_samples=50, generator=gen(2)
    )
    assert torch.equal(mc.variance, mc_var)


def test_probit_with_monte_carlo_variance():
    case, _, _ = zoo_reference("gpt2_tiny")
    cov = lowrank_diag(case.fm)
    f, var = functional_variance(
        case.fm, case.x, cov, strategy="monte_carlo", n_samples=40, generator=gen(5)
    )
    probs = predictive(case.fm, case.x, cov, strategy="monte_carlo", n_samples=40, generator=gen(5))
    expected = (f / torch.sqrt(1 + torch.pi / 8 * var)).softmax(-1)
    assert rel_err(probs, expected) < TOL


@pytest.mark.parametrize("link", ["probit", "bridge", "mc"])
def test_gradcheck_wrt_inputs_and_covariance(link):
    from torch.autograd import gradcheck

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    fm = FunctionalModel(model)
    x = torch.randn(2, 2, dtype=D, requires_grad=True)
    variances = (torch.rand(fm.num_params, dtype=D) + 0.1).requires_grad_(True)

    def run(x_, v_):
        return predictive(
            fm, x_, Diagonal(v_), link=link, n_samples=8, generator=gen(1), differentiable=True
        )

    assert gradcheck(run, (x, variances))
    assert not predictive(fm, x, Diagonal(variances), link=link, n_samples=8).requires_grad


def test_errors():
    case, _, _ = zoo_reference("mlp")
    fm, x = case.fm, case.x
    cov = Dense(torch.eye(fm.num_params, dtype=D))
    with pytest.raises(ValueError, match="unknown likelihood"):
        predictive(fm, x, cov, likelihood="poisson")
    with pytest.raises(ValueError, match="unknown link"):
        predictive(fm, x, cov, link="logit")
    with pytest.raises(ValueError, match="applies to classification"):
        predictive(fm, x, cov, likelihood="regression", link="mc")
    with pytest.raises(ValueError, match="likelihood='regression' only"):
        predictive(fm, x, cov, noise_variance=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        predictive(fm, x, cov, likelihood="regression", noise_variance=-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        predictive(fm, x, cov, likelihood="regression", noise_variance=torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="takes strategy='auto'"):
        predictive(fm, x, cov, link="mc", strategy="reverse")
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        predictive(fm, x, cov, link="mc", n_samples=0)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        predictive(fm, x, cov, link="mc", generator=123)
    with pytest.raises(TypeError, match="covariance operator"):
        predictive(fm, x, torch.eye(fm.num_params, dtype=D))
    one = FunctionalModel(nn.Linear(3, 1).to(D))
    cov1 = Diagonal(torch.ones(one.num_params, dtype=D))
    for link in ("probit", "bridge", "mc"):
        with pytest.raises(ValueError, match="at least 2 outputs"):
            predictive(one, torch.randn(2, 3, dtype=D), cov1, link=link)
