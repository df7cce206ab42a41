"""Bayesian optimization cases: pushforward.botorch's PushforwardModel against laplace-bayesopt's
LaplaceBoTorch on the same fitted laplace-torch posterior.

The surrogate (built in each case's setup, outside the measurement): Hartmann6 (negated), 20
uniform points, float64, MLP 6-200-200-1 with tanh (ReLU makes BoTorch's L-BFGS-B line searches
fail and rerun the whole optimization), trained with Adam, a Kronecker GGN Laplace
approximation (laplace-torch, CurvlinopsGGN) with its prior precision and noise tuned by
marginal likelihood (as LaplaceBoTorch's post-hoc mode does). Both models wrap the same object:
``LaplaceBoTorch(get_net, X, Y, bnn=la)`` and ``PushforwardModel.from_laplace(la)``; their
posteriors agree to 1e-8 (tests/test_botorch.py). LaplaceBoTorch always adds the observation
noise to its posterior, so for the same acquisition the pushforward model does too
(``observation_noise=True``).

* ``bo-acqf``: one ``optimize_acqf(qLogEI, q=4, num_restarts=10, raw_samples=512)`` (seeded; the
  same raw samples and MC base samples for both models). LaplaceBoTorch is run with BoTorch's
  defaults (its raw-sample evaluation is one joint posterior over all 2,048 points) and with
  ``options={"init_batch_limit": 128}`` (four joint posteriors of 512 points); the pushforward
  model with both options too (with the defaults, BoTorch's own qLogEI evaluation of the 512 x
  4 raw samples and 512 MC samples is most of its peak memory).
* ``bo-posterior``: one posterior plus the gradient of its summed mean and variance w.r.t. X for
  512 x 1 and 128 x 4 candidates (the same 512 points).
* ``bo-overhead``: MLP 6-50-50-1 (P = 2,951), Kronecker posterior, 10 candidates (10 x 1 x 6):
  100 posterior calls (mean and variance) per measured call — the per-call overhead in an
  L-BFGS run. ``pushforward-strategy`` times the planned structured strategy alone on the
  same 10 points (what the library's own machinery adds is the difference to
  ``pushforward-posterior``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from harness.registry import Context, register

DTYPE = torch.float64
OVERHEAD_CALLS = 100


@dataclass
class Surrogate:
    """A trained MLP on Hartmann6 data with a fitted KronLaplace."""

    net: Any
    la: Any
    X: torch.Tensor
    Y: torch.Tensor
    bounds: torch.Tensor


def surrogate(ctx: Context, hidden: int = 200, epochs: int = 1000) -> Surrogate:
    """The seeded surrogate of this module (see the module docstring)."""
    import torch.utils.data as du
    from botorch.test_functions import Hartmann
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN
    from torch import nn

    if ctx.quick:
        hidden, epochs = 16, 50
    torch.manual_seed(ctx.seed)
    f = Hartmann(dim=6, negate=True).to(DTYPE)
    X = torch.rand(20, 6, dtype=DTYPE)
    Y = f(X).unsqueeze(-1)
    net = nn.Sequential(
        nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    ).to(DTYPE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(X), Y).backward()
        opt.step()
    net.eval()
    la = Laplace(
        net,
        "regression",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=CurvlinopsGGN,
        enable_backprop=True,
    )
    la.fit(du.DataLoader(du.TensorDataset(X, Y), batch_size=20))
    log_prior = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    log_sigma = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    hyper = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(100):
        hyper.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        hyper.step()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()
    ctx.info.update({"arch": f"MLP 6-{hidden}-{hidden}-1 tanh", "P": la.n_params})
    return Surrogate(net, la, X, Y, f.bounds.to(DTYPE))


def _models(ctx: Context, s: Surrogate) -> dict[str, Any]:
    from laplace_bayesopt.botorch import LaplaceBoTorch

    from pushforward.botorch import PushforwardModel

    return {
        "pushforward": PushforwardModel.from_laplace(s.la, observation_noise=True),
        "laplace-bayesopt": LaplaceBoTorch(lambda: s.net, s.X, s.Y, bnn=s.la),
    }


# -- bo-acqf -----------------------------------------------------------------------------------
def _optimize(ctx: Context, library: str, options: dict[str, int]) -> Callable[[], object]:
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.optim import optimize_acqf
    from botorch.sampling.normal import SobolQMCNormalSampler

    s = surrogate(ctx)
    model = _models(ctx, s)[library]
    q, restarts, raw = (4, 2, 32) if ctx.quick else (4, 10, 512)
    ctx.info.update({"B": raw, "q": q})

    def run() -> torch.Tensor:
        torch.manual_seed(ctx.seed)
        acqf = qLogExpectedImprovement(
            model,
            best_f=s.Y.max(),
            sampler=SobolQMCNormalSampler(torch.Size([512]), seed=ctx.seed),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidates, _ = optimize_acqf(
                acqf,
                bounds=s.bounds,
                q=q,
                num_restarts=restarts,
                raw_samples=raw,
                options=dict(options),
            )
        return candidates

    return run


_OPTIMIZE = "optimize_acqf(qLogEI, q=4, num_restarts=10, raw_samples=512)"
register(
    "bo-acqf/pushforward",
    workload="bo-acqf",
    method=f"{_OPTIMIZE} on PushforwardModel.from_laplace(la)",
    library="pushforward",
)(lambda ctx: _optimize(ctx, "pushforward", {}))
register(
    "bo-acqf/pushforward-chunked",
    workload="bo-acqf",
    method=f"{_OPTIMIZE} on PushforwardModel.from_laplace(la), options={{'init_batch_limit': 128}}",
    library="pushforward",
)(lambda ctx: _optimize(ctx, "pushforward", {"init_batch_limit": 128}))
register(
    "bo-acqf/laplace-bayesopt",
    workload="bo-acqf",
    method=f"{_OPTIMIZE} on LaplaceBoTorch(bnn=la), BoTorch's default options (raw samples as "
    "one joint posterior of 2,048 points)",
    library="laplace-bayesopt",
    tags=("anchor",),
)(lambda ctx: _optimize(ctx, "laplace-bayesopt", {}))
register(
    "bo-acqf/laplace-bayesopt-chunked",
    workload="bo-acqf",
    method=f"{_OPTIMIZE} on LaplaceBoTorch(bnn=la), options={{'init_batch_limit': 128}}",
    library="laplace-bayesopt",
    tags=("anchor",),
)(lambda ctx: _optimize(ctx, "laplace-bayesopt", {"init_batch_limit": 128}))


# -- bo-posterior -------------------------------------------------------------------------------
def _posterior_grad(ctx: Context, library: str, q: int) -> Callable[[], object]:
    s = surrogate(ctx)
    model = _models(ctx, s)[library]
    n = 64 if ctx.quick else 512
    X0 = torch.rand(n // q, q, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(ctx.seed))
    ctx.info.update({"B": n // q, "q": q})

    def run() -> torch.Tensor:
        X = X0.clone().requires_grad_(True)
        post = model.posterior(X)
        (grad,) = torch.autograd.grad(post.mean.sum() + post.variance.sum(), X)
        return grad

    return run


for _library, _tags in (("pushforward", ()), ("laplace-bayesopt", ("anchor",))):
    for _q in (1, 4):
        register(
            f"bo-posterior/{_library}-{512 // _q}x{_q}",
            workload="bo-posterior",
            method=f"posterior of {512 // _q} x {_q} x 6 candidates and d(sum of mean and "
            "variance)/dX",
            library=_library,
            tags=_tags,
        )(lambda ctx, library=_library, q=_q: _posterior_grad(ctx, library, q))


# -- bo-overhead --------------------------------------------------------------------------------
def _overhead(ctx: Context, library: str) -> Callable[[], object]:
    s = surrogate(ctx, hidden=50, epochs=300)
    model = _models(ctx, s)[library]
    X = torch.rand(10, 1, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(ctx.seed))
    X.requires_grad_(True)
    ctx.info.update({"B": 10, "q": 1})

    def run() -> None:
        for _ in range(OVERHEAD_CALLS):
            post = model.posterior(X)
            post.mean, post.variance  # noqa: B018

    return run


def _strategy_only(ctx: Context) -> Callable[[], object]:
    """The structured strategy's run on the plan of the same 10 points (planned once)."""
    import pushforward as pf

    s = surrogate(ctx, hidden=50, epochs=300)
    model = _models(ctx, s)["pushforward"]
    X = torch.rand(10, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(ctx.seed))
    X.requires_grad_(True)
    plan = pf.plan(
        model.functional_model, X, model.covariance, kind="joint", group_size=1, differentiable=True
    )
    ctx.info.update({"B": 10, "q": 1, "strategy": plan.name})

    def run() -> None:
        for _ in range(OVERHEAD_CALLS):
            plan.run_canonical()

    return run


register(
    "bo-overhead/pushforward-posterior",
    workload="bo-overhead",
    method=f"{OVERHEAD_CALLS} x PushforwardModel.posterior(10 x 1 x 6), mean and variance",
    library="pushforward",
)(lambda ctx: _overhead(ctx, "pushforward"))
register(
    "bo-overhead/pushforward-strategy",
    workload="bo-overhead",
    method=f"{OVERHEAD_CALLS} x the planned strategy's run alone on the same 10 points",
    library="pushforward",
)(_strategy_only)
register(
    "bo-overhead/laplace-bayesopt-posterior",
    workload="bo-overhead",
    method=f"{OVERHEAD_CALLS} x LaplaceBoTorch.posterior(10 x 1 x 6), mean and variance",
    library="laplace-bayesopt",
    tags=("anchor",),
)(lambda ctx: _overhead(ctx, "laplace-bayesopt"))
