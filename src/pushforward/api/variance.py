"""Functional variance and covariance ``J(x) S J(x)^T`` without materializing J."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.core.functional_model import FunctionalModel
from pushforward.core.options import Options, check_positive_int
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine import MONTE_CARLO, executed, make_plan

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
    chunk_size: int | None = None,
    options: Options | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-example, per-output variance of the linearized model: ``diag(J(x_n) S J(x_n)^T)``.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        outputs: optional integer index tensor ``(*example_dims, S)`` selecting S outputs per
            example (e.g. answer tokens); only those are paid for.
        strategy: ``"auto"`` (planner) or one of ``structured`` (alias ``last_layer``),
            ``reverse``, ``forward``, ``explicit``, ``monte_carlo`` (an estimate; never chosen
            by ``auto``); see :func:`pushforward.plan`.
        memory_budget: bytes or a string like ``"2GB"`` bounding what the call allocates, its
            result included (default: half of the available memory).
        differentiable: keep the graph: gradients flow to ``x``, the model's parameters and the
            covariance's tensors.
        progress: show a tqdm bar over chunks.
        n_samples: samples for ``strategy="monte_carlo"`` (default 100); its standard error is
            returned by :func:`monte_carlo_variance`.
        generator: ``torch.Generator`` for ``strategy="monte_carlo"``'s draws.
        chunk_size: at most this many rows/tangents/samples per chunk.
        options: all of ``strategy``, ``memory_budget``, ``differentiable``, ``progress`` and
            ``chunk_size`` as one :class:`~pushforward.Options` (instead of those keywords).

    Returns:
        ``(f, var)`` with ``var.shape == f.shape``, or ``(*example_dims, S)`` with ``outputs``.
    """
    options = Options.resolve(
        options,
        strategy=strategy,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    if n_samples is not None:
        check_positive_int(n_samples, "n_samples")
    eager_only = outputs is not None or n_samples is not None or generator is not None
    return executed(
        model,
        x,
        cov,
        "variance",
        options,
        eager_only,
        lambda: make_plan(
            model,
            x,
            cov,
            "variance",
            options,
            outputs=outputs,
            n_samples=n_samples,
            generator=generator,
        ),
    )


def functional_covariance(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    *,
    joint: bool | str = False,
    group_size: int | None = None,
    outputs: Tensor | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
    chunk_size: int | None = None,
    options: Options | None = None,
) -> tuple[Tensor, Tensor]:
    """Output covariance of the linearized model, ``J S J^T``.

    Args:
        joint: ``False``: one ``K x K`` covariance per example, shape ``(*example_dims, K, K)``
            (``(..., S, S)`` with ``outputs``); ``True``: the ``(N*K, N*K)`` covariance across
            all ``N`` examples (example-major), for batched Bayesian optimization;
            ``"groups"``: the joint covariance within each group of ``group_size`` consecutive
            batch elements, ``(B / group_size, group_size*T*K, group_size*T*K)`` (the q points
            of each t-batch of a BoTorch acquisition function) — no covariance across groups
            is computed.
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        group_size: batch elements per group for ``joint="groups"``.
        outputs: optional integer index tensor ``(*example_dims, S)`` selecting S outputs per
            example, as in :func:`functional_variance`.
        strategy: ``"auto"`` or a strategy name, as in :func:`functional_variance`.
        memory_budget: bytes or a string like ``"2GB"`` bounding what the call allocates
            (default: half of the available memory).
        differentiable: keep the graph: gradients flow to ``x``, the model's parameters and the
            covariance's tensors.
        progress: show a tqdm bar over chunks.
        chunk_size: at most this many rows/tangents per chunk.
        options: ``strategy``, ``memory_budget``, ``differentiable``, ``progress`` and
            ``chunk_size`` as one :class:`~pushforward.Options` (instead of those keywords).

    Returns:
        ``(f, cov)``: the outputs ``f`` in the model's dtype and the covariance in the
        accumulation dtype (``float32`` for a half-precision model), of the shape given by
        ``joint``.

    Raises:
        ValueError: ``joint`` is not ``False``, ``True`` or ``"groups"``, or ``group_size`` is
            given without ``joint="groups"`` (or missing with it).
        pushforward.MemoryBudgetError: no strategy fits ``memory_budget``.
        pushforward.BatchCouplingError: the model's output for an example depends on the batch.
    """
    options = Options.resolve(
        options,
        strategy=strategy,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    if joint not in (False, True, "groups"):
        raise ValueError(f"joint must be False, True or 'groups', got {joint!r}")
    if (joint == "groups") != (group_size is not None):
        raise ValueError("joint='groups' needs group_size=..., and group_size needs joint='groups'")
    kind = "covariance" if joint is False else "joint"
    eager_only = outputs is not None or joint is not False
    return executed(
        model,
        x,
        cov,
        kind,
        options,
        eager_only,
        lambda: make_plan(model, x, cov, kind, options, outputs=outputs, group_size=group_size),
    )


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
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Estimate ``diag(J(x_n) S J(x_n)^T)`` from ``n_samples`` linearized function samples.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        n_samples: samples to draw (at least 2, for the standard error).
        generator: ``torch.Generator`` on the inputs' device for reproducible draws (the same
            draws as :func:`pushforward.functional_samples` with this generator).
        outputs: optional integer index tensor ``(*example_dims, S)`` selecting outputs per
            example; the samples cost the same, only the statistics kept shrink.
        memory_budget: bytes or a string like ``"2GB"`` (default: half the available memory).
        differentiable: keep the graph (reparameterized): gradients flow to ``x``, the model's
            parameters and the covariance's tensors.
        progress: show a tqdm bar over chunks of samples.
        chunk_size: at most this many samples per chunk.

    Returns:
        ``(f, var, stderr)``: ``f`` the outputs; ``var`` the estimate, of ``f``'s shape (or
        ``(*example_dims, S)`` with ``outputs``); ``stderr`` its standard error, same shape
        (the estimate is unbiased; ``|var - exact|`` exceeds ``3 * stderr`` rarely).
    """
    check_positive_int(n_samples, "n_samples")
    if n_samples < 2:
        raise ValueError(f"a standard error needs n_samples >= 2, got {n_samples}")
    options = Options(MONTE_CARLO, memory_budget, differentiable, progress, chunk_size)
    found = make_plan(
        model,
        x,
        cov,
        "variance",
        options,
        outputs=outputs,
        n_samples=n_samples,
        generator=generator,
    )
    f, var, stderr = found.execute()
    return f, var, stderr
