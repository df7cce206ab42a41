"""This library's functional (co)variance, samples and predictive on the anchor workloads.

Every W1/W3/W4 case converts the *same* fitted laplace-torch posterior as the anchor cases
(``pushforward.from_laplace(la)``), so both sides compute ``J S Jᵀ`` for identical S:

* ``pushforward-covariance``: ``functional_covariance`` (per-example K x K, what laplace-torch's
  ``_glm_predictive_distribution`` returns), strategy chosen by the planner;
* ``pushforward-variance``: ``functional_variance`` (the diagonal, what the probit link needs);
* ``pushforward-reverse``: the generic ``reverse`` strategy (per-example VJP rows), no layer
  structure used.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register
from torch import Tensor

import pushforward as pf
from cases import workloads

NUM_SAMPLES = 100


def _converted(ctx: Context, key: str, batch: int | None = None):
    w = workloads.build(ctx, key, batch)
    fm, cov = pf.from_laplace(workloads.fit_laplace(ctx, w))
    return w, fm, cov


def _covariance(ctx: Context, key: str, batch: int | None = None) -> Callable[[], object]:
    w, fm, cov = _converted(ctx, key, batch)
    ctx.info["strategy"] = pf.plan(fm, w.x, cov, kind="covariance").name
    return partial(pf.functional_covariance, fm, w.x, cov)


def _variance(ctx: Context, key: str, strategy: str = "auto") -> Callable[[], object]:
    w, fm, cov = _converted(ctx, key)
    ctx.info["strategy"] = pf.plan(fm, w.x, cov, strategy=strategy).name
    return partial(pf.functional_variance, fm, w.x, cov, strategy=strategy)


_METHODS = {
    "covariance": "pushforward.functional_covariance, per-example K x K (planner's choice)",
    "variance": "pushforward.functional_variance, diagonal (planner's choice)",
    "reverse": "pushforward.functional_variance, generic 'reverse' strategy (no layer structure)",
}

for _key in ("w1-diag", "w1-kron", "w3-diag", "w4-diag"):
    for _name, _setup in (
        ("covariance", _covariance),
        ("variance", _variance),
        ("reverse", partial(_variance, strategy="reverse")),
    ):
        register(
            f"{_key}/pushforward-{_name}",
            workload=_key,
            method=_METHODS[_name],
            library="pushforward",
        )(partial(_setup, key=_key))

for _b in workloads.SCALING_BATCHES:
    register(
        f"scaling-mlp/pushforward-covariance/B={_b}",
        workload="scaling-mlp",
        method=_METHODS["covariance"],
        library="pushforward",
        batch=_b,
    )(partial(_covariance, key="scaling-mlp", batch=_b))


def _samples(ctx: Context, structure: str) -> Callable[[], object]:
    w = workloads.build(ctx, "w5-samples")
    fm = pf.FunctionalModel(w.model)
    if structure == "diag":
        cov = pf.Diagonal(workloads.random_diagonal(ctx, w))
    else:
        la = workloads.fit_laplace(ctx, workloads.Workload(w.key, w.model, w.x, w.classes, "kron"))
        fm, cov = pf.from_laplace(la)
    generator = torch.Generator(device=w.x.device)

    def run() -> Tensor:
        generator.manual_seed(ctx.seed)
        return pf.functional_samples(fm, w.x, cov, NUM_SAMPLES, generator=generator)

    return run


for _structure in ("diag", "kron"):
    register(
        f"w5-samples/pushforward-samples-{_structure}",
        workload="w5-samples",
        method=f"pushforward.functional_samples, {NUM_SAMPLES} samples, "
        + ("random diagonal S" if _structure == "diag" else "fitted KronLaplace posterior"),
        library="pushforward",
    )(partial(_samples, structure=_structure))


@register(
    "w6-gpt2-lora/pushforward-mc-predictive",
    workload="w6-gpt2-lora",
    method=f"pushforward.api.predictive(link='mc'), {NUM_SAMPLES} samples, softmax over the full "
    "vocabulary per token, diagonal posterior over the LoRA parameters",
    library="pushforward",
)
def _gpt2_predictive(ctx: Context) -> Callable[[], object]:
    model, ids = workloads.gpt2_lora(ctx)
    fm = pf.FunctionalModel(model)
    cov = pf.Diagonal(torch.full((fm.num_params,), 1e-2, device=ids.device))
    generator = torch.Generator(device=ids.device)

    def run() -> Tensor:
        generator.manual_seed(ctx.seed)
        return pf.predictive(fm, ids, cov, link="mc", n_samples=NUM_SAMPLES, generator=generator)

    return run


def _fit_with_backprop(ctx: Context):
    """W7's posterior: a DiagLaplace fitted with ``enable_backprop=True`` (so that laplace-torch
    keeps the graph to x in its predictive)."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    w = workloads.build(ctx, "w7-grad-x")
    g = torch.Generator().manual_seed(ctx.seed + 1)
    X = torch.randn(32, *w.x.shape[1:], generator=g).to(w.x.device)
    y = torch.randint(w.classes, (32,), generator=g).to(w.x.device)
    la = Laplace(
        w.model,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
        enable_backprop=True,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
    return w, la


def _grad_x_laplace(ctx: Context) -> Callable[[], object]:
    w, la = _fit_with_backprop(ctx)

    def run() -> Tensor:
        x = w.x.clone().requires_grad_(True)
        _, f_var = la._glm_predictive_distribution(x)
        (grad,) = torch.autograd.grad(f_var.diagonal(dim1=-2, dim2=-1).sum(), x)
        return grad

    return run


def _grad_x_pushforward(ctx: Context) -> Callable[[], object]:
    w, la = _fit_with_backprop(ctx)
    fm, cov = pf.from_laplace(la)

    def run() -> Tensor:
        x = w.x.clone().requires_grad_(True)
        _, var = pf.functional_variance(fm, x, cov, differentiable=True)
        (grad,) = torch.autograd.grad(var.sum(), x)
        return grad

    return run


register(
    "w7-grad-x/laplace-enable-backprop",
    workload="w7-grad-x",
    method="laplace-torch GLM predictive with enable_backprop=True, d(sum of variances)/dx",
    library="laplace-torch",
    tags=("anchor",),
)(_grad_x_laplace)
register(
    "w7-grad-x/pushforward-differentiable",
    workload="w7-grad-x",
    method="pushforward.functional_variance(differentiable=True), d(sum of variances)/dx",
    library="pushforward",
)(_grad_x_pushforward)
