"""Monte Carlo functional variance with its standard error, for outputs too many to pay for.

``diag(J S J^T)`` costs K reverse passes per example or ``sqrt_cols`` forward passes; at a
vocabulary-sized K with a dense-ish covariance both are out of reach. ``n`` linearized function
samples cost n forward passes for the whole batch and give an unbiased estimate whose standard
error shrinks as ``1 / sqrt(n)`` (see :mod:`pushforward.strategies.monte_carlo`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.covariance.base import CovarianceOperator
from pushforward.functional_model import FunctionalModel
from pushforward.planner import plan
from pushforward.strategies.monte_carlo import MonteCarloStrategy

__all__ = ["monte_carlo_variance"]


def monte_carlo_variance(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    outputs: Tensor | None = None,
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate ``diag(J(x_n) S J(x_n)^T)`` from ``n_samples`` linearized function samples.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        n_samples: samples to draw (at least 2, for the standard error).
        generator: ``torch.Generator`` on the inputs' device for reproducible draws (the same
            draws as :func:`pushforward.sampling.functional_samples` with this generator).
        outputs: optional integer index tensor ``(*example_dims, S)`` selecting outputs per
            example; the samples cost the same, only the statistics kept shrink.
        memory_budget: bytes or a string like ``"2GB"`` (default: half the available memory).
        differentiable: keep the graph (reparameterized): gradients flow to ``x``, the model's
            parameters and the covariance's tensors.
        progress: show a tqdm bar over chunks of samples.

    Returns:
        ``(f, var, stderr)``: ``f`` the outputs; ``var`` the estimate, of ``f``'s shape (or
        ``(*example_dims, S)`` with ``outputs``); ``stderr`` its standard error, same shape
        (the estimate is unbiased; ``|var - exact|`` exceeds ``3 * stderr`` rarely).
    """
    chosen = plan(
        model,
        x,
        cov,
        kind="variance",
        outputs=outputs,
        strategy=MonteCarloStrategy.name,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        n_samples=n_samples,
        generator=generator,
    )
    p = chosen.problem
    with torch.set_grad_enabled(differentiable):
        if not differentiable:
            p.inputs = p.inputs.detach()
        f, var, stderr = MonteCarloStrategy().run_with_stderr(p, chosen.estimate)
    return f, p.user_result(var), p.user_result(stderr)
