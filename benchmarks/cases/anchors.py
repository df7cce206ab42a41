"""Anchor cases built on other libraries' Jacobian routes: the diagonal functional variance
``diag(J S Jᵀ)`` (B, K) for a seeded random diagonal S, and the explicit Jacobian by
``torch.func.jacrev`` over the whole batch output (what laplace-torch does).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from cases import workloads

Params = dict[str, Tensor]


def _per_example(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``f(params, x_b) -> (K,)``: the model on one example."""

    def f(params: Params, xb: Tensor) -> Tensor:
        return functional_call(model, params, (xb.unsqueeze(0),)).squeeze(0)

    return f


def variance_vmap_jacrev(model: nn.Module, params: Params, x: Tensor, s: Params) -> Tensor:
    """Per-example Jacobians ``vmap(jacrev)`` (B, K, P) in full, then ``Σ_p J² s``."""
    J = vmap(jacrev(_per_example(model)), in_dims=(None, 0))(params, x)
    return sum((J[n].square() * s[n]).flatten(2).sum(-1) for n in params)


def variance_vjp_loop(
    model: nn.Module, params: Params, x: Tensor, s: Params, classes: int
) -> Tensor:
    """For each class k, the rows ``J(x_b)ᵀ e_k`` of every example (``vmap`` of a VJP), squared
    and contracted with ``s``: exact, never more than (B, P) rows alive."""
    f = _per_example(model)

    def contracted(xb: Tensor, u: Tensor) -> Tensor:
        _, pull = vjp(lambda p: f(p, xb), params)
        (g,) = pull(u)
        return sum((g[n].square() * s[n]).sum() for n in g)

    per_class = vmap(contracted, in_dims=(0, None))
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    return torch.stack([per_class(x, eye[k]) for k in range(classes)], dim=1)


def jacobian_jacrev_batch(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """``torch.func.jacrev`` of the whole batch output (B·K cotangents, each back-propagated
    through all B examples), flattened to (B, K, P) as laplace-torch does."""
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    return torch.cat([j.flatten(2) for j in J.values()], dim=2)


def _vmap_jacrev(ctx: Context, key: str, batch: int | None = None) -> Callable[[], object]:
    w = workloads.build(ctx, key, batch)
    params, s = w.params(), workloads.random_diagonal(ctx, w)
    return partial(variance_vmap_jacrev, w.model, params, w.x, s)


def _vjp_loop(ctx: Context, key: str, batch: int | None = None) -> Callable[[], object]:
    w = workloads.build(ctx, key, batch)
    params, s = w.params(), workloads.random_diagonal(ctx, w)
    return partial(variance_vjp_loop, w.model, params, w.x, s, w.classes)


def _curvlinops(ctx: Context, key: str) -> Callable[[], object]:
    from curvlinops import TransposedJacobianLinearOperator

    w = workloads.build(ctx, key)
    b = len(w.x)
    s = workloads.random_diagonal(ctx, w)
    s_flat = torch.cat([v.flatten() for v in s.values()])
    data = [(w.x, torch.zeros(b, device=w.x.device))]
    jt = TransposedJacobianLinearOperator(
        w.model, list(w.model.parameters()), data, check_deterministic=False, num_data=b
    )

    def run() -> Tensor:
        # Jᵀ of the whole batch, (P, B·K): B·K cotangents through all B examples
        jt_dense = jt @ torch.eye(b * w.classes, dtype=w.x.dtype, device=w.x.device)
        return (s_flat[:, None] * jt_dense.square()).sum(0).reshape(b, w.classes)

    return run


def _jacrev_batch(ctx: Context, batch: int) -> Callable[[], object]:
    w = workloads.build(ctx, "jacobian-cnn", batch)
    return partial(jacobian_jacrev_batch, w.model, w.params(), w.x)


_VARIANCE = "diag(J S Jᵀ), random diagonal S:"
_METHODS = {
    "vmap-jacrev": f"{_VARIANCE} torch.func vmap(jacrev) per example, full (B, K, P)",
    "curvlinops-jt": f"{_VARIANCE} curvlinops TransposedJacobianLinearOperator @ I",
    "vjp-loop": f"{_VARIANCE} per-example VJPs (vmap of vjp), loop over classes",
}
_LIBRARIES = {"vmap-jacrev": "torch.func", "curvlinops-jt": "curvlinops", "vjp-loop": "torch.func"}

for _key in ("w1-diag", "w3-diag", "w4-diag"):
    for _name, _setup in (
        ("vmap-jacrev", _vmap_jacrev),
        ("curvlinops-jt", _curvlinops),
        ("vjp-loop", _vjp_loop),
    ):
        register(
            f"{_key}/{_name}",
            workload=_key,
            method=_METHODS[_name],
            library=_LIBRARIES[_name],
            tags=("anchor",),
        )(partial(_setup, key=_key))

for _b in workloads.SCALING_BATCHES:
    for _name, _setup in (("vmap-jacrev", _vmap_jacrev), ("vjp-loop", _vjp_loop)):
        register(
            f"scaling-mlp/{_name}/B={_b}",
            workload="scaling-mlp",
            method=_METHODS[_name],
            library=_LIBRARIES[_name],
            batch=_b,
            tags=("anchor",),
        )(partial(_setup, key="scaling-mlp", batch=_b))

for _b in workloads.JACOBIAN_BATCHES:
    register(
        f"jacobian-cnn/jacrev-batch/B={_b}",
        workload="jacobian-cnn",
        method="(B, K, P) by torch.func.jacrev over the whole batch output (laplace-torch's route)",
        library="torch.func",
        batch=_b,
        tags=("anchor",),
    )(partial(_jacrev_batch, batch=_b))
