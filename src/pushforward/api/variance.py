"""Functional variance and covariance ``J(x) S J(x)^T`` without materializing J."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.core.functional_model import FunctionalModel
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.planner import plan
from pushforward.engine.strategies.monte_carlo import MonteCarloStrategy

__all__ = ["functional_covariance", "functional_variance", "monte_carlo_variance"]


def functional_variance(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    *,
    outputs: Tensor | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example, per-output variance of the linearized model: ``diag(J(x_n) S J(x_n)^T)``.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        outputs: optional integer index tensor ``(*example_dims, S)`` selecting S outputs per
            example (e.g. answer tokens); only those are paid for.
        strategy: ``"auto"`` (planner) or one of ``explicit``, ``reverse``, ``forward``,
            ``last_layer``, ``monte_carlo`` (an estimate; never chosen by ``auto``); see
            :func:`pushforward.plan`.
        memory_budget: bytes or a string like ``"2GB"`` for the engine's working memory
            (default: half of the available memory).
        differentiable: keep the graph: gradients flow to ``x``, the model's parameters and the
            covariance's tensors.
        progress: show a tqdm bar over chunks.
        n_samples: samples for ``strategy="monte_carlo"`` (default 100); its standard error is
            returned by :func:`pushforward.api.monte_carlo.monte_carlo_variance`.
        generator: ``torch.Generator`` for ``strategy="monte_carlo"``'s draws.

    Returns:
        ``(f, var)`` with ``var.shape == f.shape``, or ``(*example_dims, S)`` with ``outputs``.
    """
    return plan(
        model,
        x,
        cov,
        kind="variance",
        outputs=outputs,
        strategy=strategy,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        n_samples=n_samples,
        generator=generator,
    ).execute()


def functional_covariance(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    *,
    joint: bool = False,
    outputs: Tensor | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Output covariance of the linearized model, ``J S J^T``.

    Args:
        joint: ``False``: one ``K x K`` covariance per example, shape ``(*example_dims, K, K)``
            (``(..., S, S)`` with ``outputs``); ``True``: the ``(N*K, N*K)`` covariance across
            all ``N`` examples (example-major), for batched Bayesian optimization.
        Other arguments as in :func:`functional_variance`.

    Returns:
        ``(f, cov)``.
    """
    return plan(
        model,
        x,
        cov,
        kind="joint" if joint else "covariance",
        outputs=outputs,
        strategy=strategy,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
    ).execute()


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
            draws as :func:`pushforward.api.sampling.functional_samples` with this generator).
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
