"""Laplace posteriors from a curvature, their marginal likelihood, and tuning the prior.

The posterior precision is laplace-torch's (0.3)::

    P = s H + diag(δ),      s = n_scale / (σ² T)

with ``H`` the curvature summed over the data (the GGN / Fisher of laplace-torch's likelihood:
softmax cross-entropy, or the Gaussian with unit noise), ``δ`` the prior precision, ``σ`` the
observation noise (regression), ``T`` the temperature, and ``n_scale = n_data`` when the
curvature is an average (``reduction="mean"``), else 1. Its form follows the curvature's type
(:mod:`~pushforward.curvature.results`: the diagonal, the dense matrix, the low-rank eigenpairs,
K-FAC — each computes its own covariance and log-determinant). laplace-torch's
``KronDecomposed`` posterior precision is undamped even when fitted with ``damping=True`` (its
``*`` drops the flag); ``damping=True`` here gives the damped form.

The prior precision ``δ`` is a scalar, one value per parameter tensor (``(L,)`` in the layout's
order, or a mapping by name), or one per parameter ``(P,)`` (not for K-FAC, whose blocks need one
value per tensor).

:func:`log_marginal_likelihood` is laplace-torch's ``log_marginal_likelihood``::

    log p(D) ≈ log_lik − ½ [log det P − Σ log δ + (θ − μ0)^T diag(δ) (θ − μ0)]

with ``log_lik = −loss / T`` (classification) or ``−loss / (σ² T) − n_out log(σ √(2π))``
(regression; ``loss = ½ Σ ||f − y||²``, ``n_out`` the observed output scalars), differentiable in
``δ`` and ``σ``; log det P is in closed form for each structure. :func:`optimize_prior_precision`
maximizes it (Adam on log δ, laplace-torch's loop) or grid-searches the validation
log-likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pushforward.covariance.operator import CovarianceOperator
from pushforward.curvature.results import (
    Curvature,
    PriorPrecision,
    as_curvature,
    check_n_data,
)

__all__ = [
    "PriorAndNoise",
    "laplace_posterior",
    "log_marginal_likelihood",
    "optimize_prior_precision",
]


class PriorAndNoise(NamedTuple):
    """What :func:`optimize_prior_precision` returns with ``optimize_sigma=True``.

    A named tuple: it unpacks as ``delta, sigma = ...``.

    Attributes:
        prior_precision: δ (0-d, ``(L,)`` or ``(P,)`` by the prior structure).
        sigma_noise: σ, the observation noise's standard deviation (0-d).
    """

    prior_precision: Tensor
    sigma_noise: Tensor


def _needs_noise(kind: str | None, sigma_noise: Any, what: str) -> None:
    """Refuse a regression curvature without its observation noise.

    One convention, σ the standard deviation: the curvature is for unit noise, so a silent σ = 1
    would be another posterior.
    """
    if kind == "regression" and sigma_noise is None:
        raise ValueError(
            f"{what} of a regression curvature needs the observation noise: pass "
            "sigma_noise=σ (its standard deviation; optimize_prior_precision(..., "
            "optimize_sigma=True) tunes it), or sigma_noise=1.0 for unit noise"
        )


def _noise(sigma_noise: float | Tensor | None, like: Tensor) -> Tensor:
    """σ as a tensor like ``like`` (1 for ``None``), checked finite and positive."""
    sigma_noise = 1.0 if sigma_noise is None else sigma_noise
    sigma = torch.as_tensor(sigma_noise, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        if not bool(torch.isfinite(sigma).all()) or bool((sigma <= 0).any()):
            raise ValueError(
                f"sigma_noise must be finite and positive, got {sigma.detach().tolist()}"
            )
    return sigma


def laplace_posterior(
    curvature: Curvature | Any,
    prior_precision: PriorPrecision,
    *,
    temperature: float | Tensor = 1.0,
    n_data: int | None = None,
    sigma_noise: float | Tensor | None = None,
    damping: bool = False,
    layout: Any = None,
) -> CovarianceOperator:
    """The Laplace posterior covariance Σ = (s H + diag(δ))^{-1}, s = n_data / (σ² T).

    Args:
        curvature: a curvature from ``GGN.diagonal()``, ``.dense()``, ``.lowrank(k)`` or
            ``.kfac()`` (a :class:`~pushforward.curvature.Curvature`), or the same as plain
            tensors: ``(P,)``, ``(P, P)``, ``(eigenvalues, eigenvectors)``, a bound
            :class:`~pushforward.Kronecker`.
        prior_precision: δ: a scalar, one value per parameter tensor (needs the layout) or per
            parameter (not for K-FAC).
        temperature: T.
        n_data: the curvature is an average over this many examples (``reduction="mean"``):
            it is multiplied by it. ``None`` for a summed curvature.
        sigma_noise: σ, the standard deviation of regression's observation noise (the curvature
            is for unit noise). Required for a regression curvature of
            :class:`~pushforward.curvature.GGN` (its result knows its likelihood); ``None`` is
            unit noise for a curvature given as plain tensors or of another likelihood.
        damping: laplace-torch's damped Kronecker form (K-FAC only).
        layout: the :class:`~pushforward.ParamLayout` (or anything with ``.layout``: the
            curvature operator, a FunctionalModel) for per-tensor prior precisions and to bind
            the result, where the curvature does not bring its own.

    Returns:
        A covariance operator for ``functional_variance``, ``predictive``, samples, ...

    Raises:
        ValueError: a prior precision, σ or T that is not finite and positive, ``n_data`` that
            is not a positive number, a precision that is not positive definite.
    """
    typed = as_curvature(curvature, layout)
    _needs_noise(typed.likelihood, sigma_noise, "the posterior")
    ref = typed.reference()
    scale = check_n_data(n_data) / _noise(sigma_noise, ref).square()
    return typed.covariance(prior_precision, scale=scale, temperature=temperature, damping=damping)


def log_marginal_likelihood(
    fit: Any,
    curvature: Curvature | Any,
    prior_precision: PriorPrecision,
    *,
    sigma_noise: float | Tensor | None = None,
    temperature: float | Tensor = 1.0,
    prior_mean: float | Tensor = 0.0,
    damping: bool = False,
) -> Tensor:
    """laplace-torch's Laplace approximation of the log marginal likelihood.

    With the posterior precision ``P = s H + diag(δ)``, ``s = n_scale / (σ² T)``::

        log p(D) ≈ log_lik − ½ [log det P − Σ log δ + (θ − μ0)^T diag(δ) (θ − μ0)]

    ``log_lik = −loss / T`` (classification) or ``−loss / (σ² T) − n_out log(σ √(2π))``
    (regression; ``loss = ½ Σ ||f − y||²``, ``n_out`` the observed output scalars);
    ``n_scale`` is N for a ``reduction="mean"`` curvature, else 1.

    Args:
        fit: the :class:`~pushforward.curvature.GGN` / :class:`EmpiricalFisher` the curvature
            came from: it gives the loss at the parameters (one forward pass over its data the
            first time), the number of examples and outputs, the parameters θ and the likelihood.
        curvature: its diagonal, dense matrix, low-rank pair or K-FAC.
        prior_precision: δ (scalar, per tensor or per parameter); differentiable.
        sigma_noise: σ, the standard deviation of the observation noise (regression only;
            required for a regression ``fit``); differentiable.
        temperature: T.
        prior_mean: μ0, scalar or ``(P,)``.
        damping: laplace-torch's damped Kronecker form (K-FAC only).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: a regression ``fit`` without ``sigma_noise``, ``sigma_noise`` other than 1
            for a likelihood that is not regression, or a prior precision or σ that is not
            finite and positive.
    """
    typed = as_curvature(curvature, fit)
    ref = typed.reference()
    kind = fit.likelihood.kind
    _needs_noise(kind, sigma_noise, "the marginal likelihood")
    sigma = _noise(sigma_noise, ref)
    if kind != "regression" and bool(sigma != 1):
        raise ValueError("sigma_noise applies to regression only")
    n_scale = float(fit.n_data) if fit.reduction == "mean" else 1.0
    T = torch.as_tensor(temperature, dtype=ref.dtype, device=ref.device)
    loss = fit.loss().to(ref.dtype)
    if kind == "regression":
        log_lik = -loss / (sigma.square() * T) - fit.num_outputs() * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )
    else:
        log_lik = -loss / T
    delta = typed.prior_diagonal(prior_precision)
    theta = fit.fm.flatten(fit.fm.params(False)).to(ref.dtype)
    diff = theta - torch.as_tensor(prior_mean, dtype=ref.dtype, device=ref.device)
    scatter = (diff * delta * diff).sum()
    logdet = typed.logdet(
        prior_precision, scale=n_scale / sigma.square(), temperature=T, damping=damping
    )
    return log_lik - 0.5 * (logdet - delta.log().sum() + scatter)


def optimize_prior_precision(
    fit: Any,
    curvature: Curvature,
    *,
    method: str = "marglik",
    prior_structure: str = "scalar",
    init_prior_prec: float = 1.0,
    n_steps: int = 100,
    lr: float = 0.1,
    sigma_noise: float | Tensor | None = None,
    optimize_sigma: bool = False,
    temperature: float = 1.0,
    prior_mean: float | Tensor = 0.0,
    val_data: Iterable | None = None,
    grid: Tensor | None = None,
    link: str = "probit",
) -> Tensor | PriorAndNoise:
    """Tune the prior precision δ (and for regression optionally σ).

    Args:
        fit: the curvature operator the curvature came from (see
            :func:`log_marginal_likelihood`).
        curvature: its diagonal, dense matrix, low-rank pair or K-FAC (decomposed once).
        method: ``"marglik"`` — maximize :func:`log_marginal_likelihood` with Adam on ``log δ``
            (laplace-torch's loop); ``"gridsearch"`` — the scalar δ of ``grid`` with the best
            log-likelihood of the predictive on ``val_data`` (classification: the ``link``
            predictive; regression: ``N(f, var + σ²)``).
        prior_structure: ``"scalar"``, ``"layerwise"`` (one per parameter tensor) or ``"diag"``
            (one per parameter; not for K-FAC) — marglik only.
        init_prior_prec: marglik: the starting δ (finite, positive).
        n_steps: marglik: Adam steps.
        lr: marglik: Adam's learning rate.
        sigma_noise: σ, the standard deviation of the observation noise (regression; required
            unless ``optimize_sigma``); the starting value with ``optimize_sigma`` (default 1).
        optimize_sigma: also maximize over σ (regression, marglik).
        temperature: T.
        prior_mean: μ0 (marglik), scalar or ``(P,)``.
        val_data: gridsearch: the validation batches, as the curvature's data are given.
        grid: gridsearch: the candidate δ values (default ``10^-4 ... 10^4``, 100 points on a
            log scale).
        link: gridsearch, classification: the link of :func:`pushforward.predictive`.

    Returns:
        δ — 0-d for ``"scalar"``, ``(L,)``, or ``(P,)`` — or with ``optimize_sigma`` a
        :class:`PriorAndNoise` ``(δ, σ)``.

    Raises:
        ValueError: an unknown ``method`` or ``prior_structure``, options that do not apply to
            the method or likelihood, or gridsearch without validation data.
    """
    typed = as_curvature(curvature, fit)
    ref = typed.reference()
    if not optimize_sigma:
        _needs_noise(fit.likelihood.kind, sigma_noise, "tuning the prior precision")
    if method == "gridsearch":
        if prior_structure != "scalar" or optimize_sigma:
            raise ValueError("gridsearch tunes a scalar prior precision only")
        if val_data is None:
            raise ValueError("method='gridsearch' needs val_data (batches of (x, y))")
        return _gridsearch(fit, typed, val_data, grid, sigma_noise, temperature, link)
    if method != "marglik":
        raise ValueError(f"method must be 'marglik' or 'gridsearch', got {method!r}")
    if optimize_sigma and fit.likelihood.kind != "regression":
        raise ValueError("optimize_sigma applies to regression only")
    sizes = {"scalar": 1, "diag": typed.size}
    if prior_structure == "layerwise":
        sizes["layerwise"] = len(typed._layout().names)
    if prior_structure not in sizes:
        raise ValueError(
            f"prior_structure must be 'scalar', 'layerwise' or 'diag', got {prior_structure!r}"
        )
    if prior_structure == "diag" and "diagonal" not in typed.prior_structures:
        raise ValueError(
            f"a K-FAC posterior ({type(typed).__name__}) takes a scalar or one prior precision "
            "per parameter tensor (prior_structure='scalar' or 'layerwise'), not one per "
            "parameter: per-parameter values do not keep the Kronecker structure"
        )
    init = torch.as_tensor(init_prior_prec, dtype=ref.dtype)
    if not bool(torch.isfinite(init)) or not bool(init > 0):
        raise ValueError(
            f"init_prior_prec (the initial prior precision) must be finite and positive, got "
            f"{init_prior_prec!r}"
        )
    log_delta = torch.full(
        (sizes[prior_structure],), float(init.log()), dtype=ref.dtype, device=ref.device
    ).requires_grad_(True)
    variables = [log_delta]
    log_sigma = _noise(sigma_noise, ref).log()
    if optimize_sigma:
        log_sigma = log_sigma.clone().requires_grad_(True)
        variables.append(log_sigma)
    optimizer = torch.optim.Adam(variables, lr=lr)
    with torch.enable_grad():
        for _ in range(n_steps):
            optimizer.zero_grad()
            delta = log_delta.exp()
            loss = -log_marginal_likelihood(
                fit,
                typed,
                delta if prior_structure != "scalar" else delta[0],
                sigma_noise=log_sigma.exp(),
                temperature=temperature,
                prior_mean=prior_mean,
            )
            loss.backward()
            optimizer.step()
    delta = log_delta.detach().exp()
    delta = delta[0] if prior_structure == "scalar" else delta
    return PriorAndNoise(delta, log_sigma.detach().exp()) if optimize_sigma else delta


def _gridsearch(fit, typed: Curvature, val_data, grid, sigma_noise, temperature, link) -> Tensor:
    from pushforward.api.predictive import predictive
    from pushforward.api.variance import functional_variance
    from pushforward.curvature.data import Batches

    ref = typed.reference()
    if grid is None:
        grid = torch.logspace(-4, 4, 100, dtype=ref.dtype, device=ref.device)
    fm, lik = fit.fm, fit.likelihood
    if lik.kind not in ("classification", "regression"):
        raise ValueError("gridsearch needs a classification or regression likelihood")
    val = Batches(val_data, fm.device, fit.data.target_key, group=fit.group)
    batches = list(val)
    if not batches or not sum(b.inputs.batch_size for b in batches):
        raise ValueError("method='gridsearch': val_data holds no example to validate on")
    n_scale = float(fit.n_data) if fit.reduction == "mean" else 1.0
    sigma = _noise(sigma_noise, ref)
    scale = n_scale / sigma.square()
    best, best_score = None, math.inf
    for delta in grid:
        S = typed.covariance(delta, scale=scale, temperature=temperature)
        total, count = 0.0, 0
        for batch in batches:
            f = fm(batch.inputs)
            B = f.shape[0]
            K = math.prod(f.shape[f.dim() - fm.output_dims :])
            if lik.kind == "classification":
                probs = predictive(fm, batch.inputs, S, link=link).reshape(B, -1, K)
                y = lik.prepare_targets(batch.y, torch.Size((B, probs.shape[1], K)))
                keep = y != lik.ignore_index
                picked = probs.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                total -= float(picked.clamp_min(1e-300).log()[keep].sum())
                count += int(keep.sum())
            else:
                f, var = functional_variance(fm, batch.inputs, S)
                var = var + sigma.square()
                y = batch.y.reshape(f.shape).to(f.dtype)
                nll = 0.5 * (torch.log(2 * math.pi * var) + (y - f).square() / var)
                total += float(nll.sum())
                count += y.numel()
        (sums,), _ = val.finish([torch.tensor([total, count], dtype=torch.float64)])
        total, count = sums.tolist()
        score = total / max(count, 1)
        if score < best_score:
            best, best_score = delta, score
    if best is None:
        raise ValueError("gridsearch: every prior precision gave a non-finite validation loss")
    return best.detach()
