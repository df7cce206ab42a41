"""Anchor cases: laplace-torch 0.3's own GLM predictive on a fitted posterior.

Timed: ``la._glm_predictive_distribution(x)``, which returns the mean and the per-example K x K
functional covariance ``J S Jᵀ`` (B, K, K) — the part of ``la(x, pred_type="glm")`` that depends
on the posterior; the probit/MC link on top of it is excluded. Its Jacobian comes from
``torch.func.jacrev`` over the whole batch output with the default backend (CurvlinopsGGN) and
with AsdlGGN (whose GLM predictive falls back to it), and from BackPACK's ``BatchGrad`` once per
class with BackPackGGN. The fit happens in the setup, outside the measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from harness.registry import Context, register

from cases import workloads

_METHODS = {
    "default": "laplace-torch GLM predictive, default backend "
    "(CurvlinopsGGN; torch.func.jacrev over the batch)",
    "backpack": "laplace-torch GLM predictive, BackPackGGN backend (BatchGrad per class)",
    "asdl": "laplace-torch GLM predictive, AsdlGGN backend (falls back to torch.func.jacrev)",
}


def _glm_predictive(
    ctx: Context, key: str, backend: str, batch: int | None = None
) -> Callable[[], object]:
    w = workloads.build(ctx, key, batch)
    la = workloads.fit_laplace(ctx, w, backend)
    return partial(la._glm_predictive_distribution, w.x)


# W3 runs the default backend only: laplace-torch runs out of memory there whichever backend
# builds the (B, K, P) Jacobian.
for _key, _backends in (
    ("w1-diag", ("default", "backpack", "asdl")),
    ("w1-kron", ("default", "backpack", "asdl")),
    ("w3-diag", ("default",)),
    ("w4-diag", ("default", "backpack", "asdl")),
):
    for _backend in _backends:
        register(
            f"{_key}/laplace-{_backend}",
            workload=_key,
            method=_METHODS[_backend],
            library="laplace-torch",
            tags=("anchor",),
        )(partial(_glm_predictive, key=_key, backend=_backend))

for _b in workloads.SCALING_BATCHES:
    register(
        f"scaling-mlp/laplace-default/B={_b}",
        workload="scaling-mlp",
        method=_METHODS["default"],
        library="laplace-torch",
        batch=_b,
        tags=("anchor",),
    )(partial(_glm_predictive, key="scaling-mlp", backend="default", batch=_b))
