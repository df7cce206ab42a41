"""functional_samples and the Monte Carlo variance: exact against f + J L z with the documented
draws, moments within their standard errors, joint correlation across the batch, chunking
invariance, gradients and errors (float64, fixed generators)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, zoo_reference
from torch import nn

from pushforward import FunctionalModel, functional_covariance, functional_variance, plan
from pushforward.api.sampling import functional_samples
from pushforward.api.variance import monte_carlo_variance
from pushforward.covariance import Dense, Diagonal, Kronecker, LowRank

D = torch.float64
TOL = 1e-10
Z_MAX = 5.0  # standardized deviations allowed (fixed seeds; about 1 in 2 million per entry)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=g, dtype=D)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=D)


def make_cov(kind: str, fm: FunctionalModel, seed: int = 0):
    g = gen(seed)
    P = fm.num_params
    if kind == "diag":
        return Diagonal(torch.rand(P, generator=g, dtype=D))
    if kind == "dense":
        return Dense(spd(P, g))
    if kind == "lowrank":
        return LowRank(torch.randn(P, 3, generator=g, dtype=D), torch.rand(3, generator=g, dtype=D))
    factors = {
        name: (spd(shape[0], g), spd(shape[1:].numel(), g))
        if len(shape) >= 2
        else (spd(shape[0], g),)
        for name, shape in fm.layout.shapes.items()
    }
    return Kronecker(factors)


def documented_draws(n: int, r: int, seed: int) -> torch.Tensor:
    """Sample i uses ``randn(r)`` from a generator seeded with the i-th of ``n`` seeds drawn
    from the user's generator."""
    seeds = torch.randint(2**62, (n,), generator=gen(seed)).tolist()
    return torch.stack([torch.randn(r, generator=gen(s), dtype=D) for s in seeds])


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(
    "name",
    ["mlp", "cnn_batchnorm_eval", "gpt2_tiny", "tied_embedding_lm", "multi_output_regression"],
)
@pytest.mark.parametrize("cov_kind", ["diag", "lowrank", "kron"])
def test_samples_are_f_plus_J_L_z(name, cov_kind):
    case, f_ref, J_ref = zoo_reference(name)
    cov = make_cov(cov_kind, case.fm).bind(case.fm.layout)
    samples = functional_samples(case.fm, case.x, cov, 6, generator=gen(11))
    assert samples.shape == (6, *f_ref.shape)
    V = cov.sqrt_matmul(documented_draws(6, cov.sqrt_cols, 11).T)  # (P, 6)
    expected = f_ref + torch.einsum("...p,pn->n...", J_ref, V)
    assert rel_err(samples, expected) < TOL


def test_moments_converge_and_inputs_are_jointly_correlated():
    """Sample mean and covariance across the whole batch match f and the joint J S J^T within
    their standard errors; two nearby inputs get strongly correlated samples."""
    case, _, _ = zoo_reference("mlp")
    x = torch.cat([case.x[:1], case.x[:1] + 0.05, case.x[1:3]])
    cov = make_cov("dense", case.fm)
    n = 4000
    samples = functional_samples(case.fm, x, cov, n, generator=gen(0))
    f, joint = functional_covariance(case.fm, x, cov, joint=True)
    var = joint.diagonal()
    W = (samples - f).reshape(n, -1)
    mean_z = W.mean(0) / (var / n).sqrt()
    assert mean_z.abs().max() < Z_MAX
    C_hat = W.T @ W / n  # the mean is known: unbiased, Var = (C_ij^2 + C_ii C_jj) / n
    se = ((joint.square() + var[:, None] * var[None, :]) / n).sqrt()
    assert ((C_hat - joint).abs() / se).max() < Z_MAX
    K = f.shape[-1]
    corr = joint[0, K] / (var[0] * var[K]).sqrt()  # output 0 of inputs 0 and 1
    assert corr > 0.9
    sample_corr = C_hat[0, K] / (C_hat[0, 0] * C_hat[K, K]).sqrt()
    assert abs(sample_corr - corr) < Z_MAX * (1 - corr**2) / n**0.5


@pytest.mark.usefixtures("quiet_fallbacks")
def test_chunking_and_reproducibility():
    case, _, _ = zoo_reference("tied_embedding_lm")
    cov = make_cov("lowrank", case.fm)
    ref = functional_samples(case.fm, case.x, cov, 9, generator=gen(3))
    for chunk_size in (1, 2, 4, 9, 50):
        out = functional_samples(case.fm, case.x, cov, 9, generator=gen(3), chunk_size=chunk_size)
        assert rel_err(out, ref) < 1e-13
    tiny = functional_samples(case.fm, case.x, cov, 9, generator=gen(3), memory_budget=20_000)
    assert rel_err(tiny, ref) < 1e-13
    assert not torch.equal(functional_samples(case.fm, case.x, cov, 9, generator=gen(4)), ref)
    torch.manual_seed(5)
    a = functional_samples(case.fm, case.x, cov, 3)
    torch.manual_seed(5)
    assert torch.equal(functional_samples(case.fm, case.x, cov, 3), a)


def test_progress_bar(capsys):
    case, _, _ = zoo_reference("mlp")
    functional_samples(case.fm, case.x, make_cov("diag", case.fm), 4, chunk_size=2, progress=True)
    assert "function samples" in capsys.readouterr().err


def test_gradient_of_an_acquisition_value_matches_finite_differences():
    """q-batch upper-confidence value ``E[max_b f_b]`` with common random numbers: smooth in x
    and the covariance, checked by finite differences (``gradcheck``)."""
    from torch.autograd import gradcheck

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)
    fm = FunctionalModel(model)
    x = torch.randn(3, 2, dtype=D, requires_grad=True)
    variances = (torch.rand(fm.num_params, dtype=D) + 0.1).requires_grad_(True)

    def acquisition(x_, v_):
        s = functional_samples(fm, x_, Diagonal(v_), 64, generator=gen(1), differentiable=True)
        return s.squeeze(-1).amax(dim=1).mean()

    assert gradcheck(acquisition, (x, variances))
    value = acquisition(x, variances)
    (g_w,) = torch.autograd.grad(value, model[0].weight)  # through J(x) and f(x)
    with torch.no_grad():
        step = torch.zeros_like(model[0].weight)
        step[1, 0] = 1e-6
        model[0].weight += step
        up = acquisition(x, variances)
        model[0].weight -= 2 * step
        down = acquisition(x, variances)
        model[0].weight += step
    assert abs((up - down).item() / 2e-6 - g_w[1, 0].item()) < 1e-6
    assert not functional_samples(fm, x, Diagonal(variances), 2).requires_grad


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(
    "name", ["mlp", "gpt2_tiny", "tied_embedding_lm", "multi_output_regression"]
)
def test_monte_carlo_variance_within_its_standard_error(name):
    case, f_ref, _ = zoo_reference(name)
    cov = make_cov("kron", case.fm)
    _, exact = functional_variance(case.fm, case.x, cov)
    n = 400
    f, var, stderr = monte_carlo_variance(case.fm, case.x, cov, n, generator=gen(9))
    assert f.shape == var.shape == stderr.shape == f_ref.shape
    assert rel_err(f, f_ref) < TOL
    assert ((var - exact).abs() / stderr).max() < Z_MAX
    # Gaussian w: sd(w^2) = sqrt(2) var, so stderr ~ var sqrt(2 / n)
    ratio = (stderr / (exact * (2 / n) ** 0.5)).median()
    assert 0.85 < ratio < 1.15
    # the same draws through functional_variance and through stored samples
    _, via_plan = functional_variance(
        case.fm, case.x, cov, strategy="monte_carlo", n_samples=n, generator=gen(9)
    )
    assert torch.equal(via_plan, var)
    samples = functional_samples(case.fm, case.x, cov, n, generator=gen(9))
    assert rel_err(var, (samples - f).square().mean(0)) < 1e-12


@pytest.mark.usefixtures("quiet_fallbacks")
def test_monte_carlo_selected_outputs_and_small_budget():
    case, _, _ = zoo_reference("gpt2_tiny")
    cov = make_cov("diag", case.fm)
    outputs = torch.randint(0, 11, (2, 4, 3), generator=gen(2))
    _, var, se = monte_carlo_variance(case.fm, case.x, cov, 60, generator=gen(1))
    _, sel, sel_se = monte_carlo_variance(
        case.fm, case.x, cov, 60, generator=gen(1), outputs=outputs
    )
    assert sel.shape == sel_se.shape == outputs.shape
    assert rel_err(sel, var.gather(-1, outputs)) < 1e-13
    assert rel_err(sel_se, se.gather(-1, outputs)) < 1e-12
    small = plan(
        case.fm,
        case.x,
        cov,
        strategy="monte_carlo",
        n_samples=60,
        generator=gen(1),
        memory_budget=200_000,
    )
    assert small.chunk_size < 60
    assert rel_err(small.execute()[1], var) < 1e-12


def test_monte_carlo_is_never_auto_and_refuses_what_it_cannot_do():
    case, _, _ = zoo_reference("mlp")
    cov = make_cov("diag", case.fm)
    chosen = plan(case.fm, case.x, cov)
    assert chosen.name != "monte_carlo"
    assert "monte_carlo" in str(chosen) and "not exact" in str(chosen)
    with pytest.raises(ValueError, match="only the diagonal variance"):
        functional_covariance(case.fm, case.x, cov, strategy="monte_carlo")
    with pytest.raises(ValueError, match="n_samples >= 2"):
        monte_carlo_variance(case.fm, case.x, cov, 1)


def test_monte_carlo_variance_gradcheck():
    from torch.autograd import gradcheck

    torch.manual_seed(1)
    fm = FunctionalModel(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(D))
    x = torch.randn(2, 2, dtype=D, requires_grad=True)
    variances = (torch.rand(fm.num_params, dtype=D) + 0.1).requires_grad_(True)

    def run(x_, v_):
        _, var, se = monte_carlo_variance(
            fm, x_, Diagonal(v_), 16, generator=gen(0), differentiable=True
        )
        return var, se

    assert gradcheck(run, (x, variances))


def test_errors():
    case, _, _ = zoo_reference("mlp")
    fm, x = case.fm, case.x
    cov = make_cov("diag", fm)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n_samples must be a positive integer"):
            functional_samples(fm, x, cov, bad)
    for bad in (2.5, True, None):
        with pytest.raises(TypeError, match="n_samples must be a positive integer"):
            functional_samples(fm, x, cov, bad)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        functional_samples(fm, x, cov, 3, chunk_size=0)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        functional_samples(fm, x, cov, 3, generator=0)
    with pytest.raises(TypeError, match="covariance operator"):
        functional_samples(fm, x, torch.eye(fm.num_params, dtype=D), 3)
    with pytest.raises(ValueError, match="P="):
        functional_samples(fm, x, Diagonal(torch.ones(fm.num_params + 1, dtype=D)), 3)
    with pytest.raises(TypeError, match="n_samples must be a positive integer"):
        functional_variance(fm, x, cov, strategy="monte_carlo", n_samples=1.5)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on cuda"):
            functional_samples(fm, x, cov, 3, generator=torch.Generator(device="cuda"))
