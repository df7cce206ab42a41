"""The linearized (GLM) predictive: ``∫ softmax(f) N(f | f(x), J S J^T) df`` and its relatives.

Classification, by ``link``:

* ``"probit"`` — ``softmax(f / sqrt(1 + π/8 · var))`` per output, with the diagonal variance
  from :func:`~pushforward.api.variance.functional_variance` (any strategy);
* ``"bridge"`` / ``"bridge_norm"`` — the Laplace bridge: the per-example Gaussian (K x K
  covariance from :func:`~pushforward.api.variance.functional_covariance`) is conditioned on the
  logits summing to zero and matched to a Dirichlet, whose mean is returned; ``bridge_norm``
  first rescales it to mean variance ``sqrt(K / 2)``. The formulas are laplace-torch 0.3's,
  evaluated in log space (no overflow at large logits). Needs K x K per example: small K only;
* ``"mc"`` — the average of ``softmax(f + J L z_i)`` over linearized function samples, streamed
  chunk by chunk: at most one chunk of samples is alive, never ``n_samples x B x K``, so a
  vocabulary-sized output is fine.

Regression: the Gaussian ``N(f, var + σ²)`` as :class:`RegressionPredictive` ``(mean, variance)``.

The softmax runs over the model's output dims (``FunctionalModel.output_dims``, flattened to K):
a language model's ``(B, T, V)`` gives one distribution over V per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from pushforward.api.variance import functional_covariance, functional_variance
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.options import Options, check_positive_int
from pushforward.core.softmax import softmax
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine import MONTE_CARLO, make_plan, monte_carlo_chunks

__all__ = ["RegressionPredictive", "predictive"]

Likelihood = Literal["classification", "regression"]
Link = Literal["probit", "bridge", "bridge_norm", "mc"]
LINKS = ("probit", "bridge", "bridge_norm", "mc")


class RegressionPredictive(NamedTuple):
    """Gaussian predictive of a regression model; unpacks as ``mean, variance = ...``.

    Attributes:
        mean: ``f(x)``, the model's output shape.
        variance: ``diag(J S J^T)`` plus the observation noise σ² when given, same shape.
    """

    mean: Tensor
    variance: Tensor


def predictive(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    *,
    likelihood: Likelihood = "classification",
    link: Link | None = None,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    noise_variance: float | Tensor | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
    chunk_size: int | None = None,
    options: Options | None = None,
) -> Tensor | RegressionPredictive:
    """The linearized model's predictive distribution at ``x``.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        likelihood: ``"classification"`` (softmax over the output dims) or ``"regression"``.
        link: classification only: ``"probit"`` (default), ``"bridge"``, ``"bridge_norm"`` or
            ``"mc"`` (see the module docstring).
        n_samples: samples for ``link="mc"`` and for ``strategy="monte_carlo"``.
        generator: ``torch.Generator`` for those samples; ``link="mc"`` with a generator
            averages exactly the samples :func:`~pushforward.functional_samples` draws with
            an identically seeded one.
        noise_variance: regression only: observation noise σ², a number or a tensor that
            broadcasts against the outputs (e.g. one per output), added to the variance.
        strategy: how the variance (``probit``, regression) or per-example covariance
            (``bridge``) is computed: ``"auto"`` or a strategy name (see
            :func:`pushforward.plan`), e.g. ``"monte_carlo"`` for a huge K. ``link="mc"``
            samples directly and accepts only ``"auto"``.
        memory_budget: bytes or a string like ``"2GB"`` (default: half the available memory).
        differentiable: keep the graph: gradients flow to ``x``, the model's parameters and the
            covariance's tensors (``mc`` is reparameterized).
        progress: show a tqdm bar over chunks.
        chunk_size: at most this many rows/tangents/samples per chunk.
        options: all of ``strategy``, ``memory_budget``, ``differentiable``, ``progress`` and
            ``chunk_size`` as one :class:`~pushforward.Options` (instead of those keywords).

    Returns:
        Classification: probabilities of ``f``'s shape, summing to one over the output dims.
        Regression: :class:`RegressionPredictive` ``(mean, variance)``, each of ``f``'s shape.
    """
    fm = as_functional_model(model)
    check_positive_int(n_samples, "n_samples")
    options = Options.resolve(
        options,
        strategy=strategy,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    sampling = dict(n_samples=n_samples, generator=generator)
    if likelihood == "regression":
        if link is not None:
            raise ValueError(
                f"link={link!r} applies to classification; a regression predictive is Gaussian "
                "(mean f, variance diag(J S J^T) + noise); for a Monte Carlo variance pass "
                "strategy='monte_carlo'"
            )
        f, var = functional_variance(fm, x, cov, options=options, **sampling)
        return RegressionPredictive(f, var + _noise(noise_variance, var))
    if likelihood != "classification":
        raise ValueError(
            f"unknown likelihood {likelihood!r}; choose 'classification' or 'regression'"
        )
    if noise_variance is not None:
        raise ValueError("noise_variance applies to likelihood='regression' only")
    link = "probit" if link is None else link
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; choose from {list(LINKS)}")
    if link == "mc":
        if options.strategy != "auto":
            raise ValueError(
                f"strategy={options.strategy!r} chooses how a variance is computed; link='mc' "
                "pushes samples directly and takes strategy='auto'"
            )
        sampled = dataclasses.replace(options, strategy=MONTE_CARLO)
        return _mc(fm, x, cov, n_samples, generator, sampled)
    if link == "probit":
        f, var = functional_variance(fm, x, cov, options=options, **sampling)
        logits = _flat(fm, f) / torch.sqrt(1 + math.pi / 8 * _flat(fm, var))
        return softmax(logits).reshape(f.shape)
    f, C = functional_covariance(fm, x, cov, options=options)
    return _bridge(_flat(fm, f), C, normalize=link == "bridge_norm").reshape(f.shape)


def _flat(fm: FunctionalModel, t: Tensor) -> Tensor:
    """``(*example_dims, *output_shape)`` -> ``(*example_dims, K)``, checking ``K >= 2``."""
    flat = t.reshape(*t.shape[: t.dim() - fm.output_dims], -1)
    _check_classes(flat.shape[-1])
    return flat


def _check_classes(K: int) -> None:
    if K < 2:
        raise ValueError(
            f"classification needs at least 2 outputs per example to take a softmax over, got "
            f"K={K}; check FunctionalModel(output_dims=...)"
        )


def _noise(noise_variance: float | Tensor | None, var: Tensor) -> Tensor | float:
    if noise_variance is None:
        return 0.0
    noise = torch.as_tensor(noise_variance, dtype=var.dtype, device=var.device)
    if not torch.isfinite(noise).all() or (noise < 0).any():
        raise ValueError("noise_variance must be finite and non-negative")
    try:
        torch.broadcast_shapes(noise.shape, var.shape)
    except RuntimeError:
        raise ValueError(
            f"noise_variance of shape {tuple(noise.shape)} does not broadcast against the "
            f"outputs of shape {tuple(var.shape)}"
        ) from None
    return noise


def _bridge(mu: Tensor, C: Tensor, normalize: bool) -> Tensor:
    """Laplace bridge: ``mu (..., K)``, ``C (..., K, K)`` -> Dirichlet mean ``(..., K)``.

    The Gaussian conditioned on ``sum(f) = 0`` has mean ``mu - s (1^T mu) / t`` and variances
    ``diag(C) - s^2 / t`` (``s = C 1``, ``t = 1^T C 1``; no conditioning when ``t = 0``); the
    Dirichlet's concentrations are ``α_k = (1 - 2/K + e^{mu_k} Σ_j e^{-mu_j} / K²) / var_k`` and
    its mean ``α / Σα``. Evaluated in log space with ``C`` scaled by its largest entry, so it
    neither overflows for huge variances nor divides by zero; an example whose conditioned
    Gaussian has a variance of zero (a zero covariance: no uncertainty) gets the softmax of its
    mean, the limit of the bridge as the variances vanish.
    """
    K = mu.shape[-1]
    tiny = torch.finfo(C.dtype).tiny
    scale = C.abs().amax((-2, -1), keepdim=True).clamp_min(tiny)  # (..., 1, 1)
    Cs = C / scale
    s = Cs.sum(-1)
    t = s.sum(-1, keepdim=True)
    conditioned = t > torch.finfo(C.dtype).eps * K
    safe_t = torch.where(conditioned, t, torch.ones_like(t))
    mu = torch.where(conditioned, mu - s * (mu.sum(-1, keepdim=True) / safe_t), mu)
    var = Cs.diagonal(dim1=-2, dim2=-1) - torch.where(conditioned, s.square() / safe_t, 0.0)
    degenerate = (var <= 0).any(-1, keepdim=True)
    log_var = var.clamp_min(tiny).log() + scale[..., 0].log()
    if normalize:
        log_scale = torch.logsumexp(log_var, -1, keepdim=True) - math.log(K) - 0.5 * math.log(K / 2)
        mu, log_var = mu * torch.exp(-0.5 * log_scale), log_var - log_scale
    spread = mu + torch.logsumexp(-mu, dim=-1, keepdim=True) - 2 * math.log(K)
    log_alpha = (
        torch.logaddexp(spread.new_tensor(math.log1p(-2 / K) if K > 2 else -math.inf), spread)
        - log_var
    )
    return torch.where(degenerate, softmax(mu), softmax(log_alpha))


def _mc(
    fm: FunctionalModel,
    x: Any,
    cov: CovarianceOperator,
    n_samples: int,
    generator: torch.Generator | None,
    options: Options,
) -> Tensor:
    """Average of ``softmax(f + J L z_i)`` over samples.

    Streamed chunk by chunk through the Monte Carlo strategy's plan (its draws and chunks).
    """
    found = make_plan(fm, x, cov, "variance", options, n_samples=n_samples, generator=generator)
    p = found.problem
    _check_classes(p.K)
    total: Tensor | None = None
    with torch.set_grad_enabled(p.differentiable):
        for f, W in monte_carlo_chunks(found):
            part = softmax(p.canonical(f) + W).sum(0)
            total = part if total is None else total + part
    return (total / n_samples).reshape(*p.example_shape, *p.output_shape)
