"""Laplace posteriors from a curvature, their marginal likelihood, and tuning the prior.

The posterior precision is laplace-torch's (0.3)::

    P = s H + diag(δ),      s = n_scale / (σ² T)

with ``H`` the curvature summed over the data (the GGN / Fisher of laplace-torch's likelihood:
softmax cross-entropy, or the Gaussian with unit noise), ``δ`` the prior precision, ``σ`` the
observation noise (regression), ``T`` the temperature, and ``n_scale = n_data`` when the
curvature is an average (``reduction="mean"``), else 1. Its form follows the curvature's:

=====================================  ==================================================
curvature                              posterior covariance Σ = P⁻¹
=====================================  ==================================================
``(P,)`` diagonal                      :class:`~pushforward.Diagonal` ``1 / (s h + δ)``
``(P, P)`` dense                       :class:`~pushforward.Dense` (a triangular factor)
``(eigenvalues (k,), U (P, k))``       :class:`~pushforward.LowRankPrecision` ``(U, s λ, δ)``
:class:`~pushforward.Kronecker` (K-FAC) :class:`~pushforward.Kronecker` of eigen-form blocks
=====================================  ==================================================

For K-FAC each factor is eigendecomposed once: a weight's block ``G ⊗ A`` gets precision
eigenvalues ``s λ_G λ_A^T + δ`` (``damping=True``: ``(sqrt(s) λ_G + sqrt(δ))(sqrt(s) λ_A +
sqrt(δ))``) — laplace-torch's ``KronDecomposed``, whose posterior precision is undamped even
when fitted with ``damping=True`` (its ``*`` drops the flag); a bias's ``G``, a generic dense or
diagonal block, ``s λ + δ``.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker import Kronecker
from pushforward.covariance.kronecker_blocks import KroneckerEigen, KroneckerFactors
from pushforward.covariance.lowrank_precision import LowRankPrecision
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["laplace_posterior", "log_marginal_likelihood", "optimize_prior_precision"]

Curvature = Tensor | tuple[Tensor, Tensor] | Kronecker
PriorPrecision = float | Tensor | Sequence[float] | Mapping[str, float]


# -- the curvature's spectrum ----------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One block of a K-FAC curvature: ``pair`` (eigenpairs of out/in factors), ``dense`` (one
    eigendecomposition) or ``diagonal``."""

    name: str
    kind: str
    values: tuple[Tensor, ...]
    vectors: tuple[Tensor, ...]


class Spectrum:
    """A curvature prepared for posteriors: its form and (for K-FAC) eigendecompositions, so that
    many prior precisions and noise levels cost no new decomposition."""

    def __init__(self, curvature: Curvature, layout: ParamLayout | None) -> None:
        self.layout = layout
        self.blocks: list[_Block] = []
        if isinstance(curvature, Kronecker):
            self.kind = "kron"
            if curvature.layout is None:
                raise ValueError(
                    "a Kronecker curvature needs its layout: bind it (kron.bind(fm.layout))"
                )
            self.layout = curvature.layout
            for name, block in curvature.blocks.items():
                self.blocks.append(_decompose(name, block))
            self.size = curvature.num_params
        elif isinstance(curvature, (tuple, list)):
            if len(curvature) != 2:
                raise ValueError(
                    "a low-rank curvature is (eigenvalues (k,), eigenvectors (P, k)), got "
                    f"{len(curvature)} items"
                )
            values, vectors = curvature
            if values.dim() != 1 or vectors.dim() != 2 or vectors.shape[1] != values.shape[0]:
                raise ValueError(
                    f"a low-rank curvature is (eigenvalues (k,), eigenvectors (P, k)); got shapes "
                    f"{tuple(values.shape)} and {tuple(vectors.shape)}"
                )
            self.kind, self.values, self.vectors = "lowrank", values, vectors
            self.size = vectors.shape[0]
        elif isinstance(curvature, Tensor) and curvature.dim() == 1:
            self.kind, self.values, self.size = "diag", curvature, curvature.shape[0]
        elif isinstance(curvature, Tensor) and curvature.dim() == 2:
            if curvature.shape[0] != curvature.shape[1]:
                raise ValueError(f"a dense curvature must be square, got {tuple(curvature.shape)}")
            self.kind, self.matrix, self.size = "full", curvature, curvature.shape[0]
        else:
            raise TypeError(
                "curvature must be a diagonal (P,), a dense (P, P) tensor, (eigenvalues, "
                f"eigenvectors) or a Kronecker (K-FAC); got {type(curvature).__name__}"
            )
        if self.layout is not None and self.layout.num_params != self.size:
            raise ValueError(
                f"the curvature is over {self.size} parameters but the layout has "
                f"{self.layout.num_params}"
            )

    # -- prior precision -------------------------------------------------------------------
    def prior_diagonal(self, delta: PriorPrecision, like: Tensor) -> Tensor:
        """``(P,)``: the prior precision of every parameter."""
        d = self._prior(delta, like)
        if d.dim() == 0:
            return d.expand(self.size)
        if d.shape[0] == self.size:
            return d
        sizes = torch.tensor(self._layout().sizes(), device=d.device)
        return torch.repeat_interleave(d, sizes)

    def prior_per_tensor(self, delta: PriorPrecision, like: Tensor) -> Tensor:
        """``(L,)``: one prior precision per parameter tensor (K-FAC)."""
        d = self._prior(delta, like)
        layout = self._layout()
        if d.dim() == 0:
            return d.expand(len(layout.names))
        if d.shape[0] == len(layout.names):
            return d
        raise ValueError(
            f"a K-FAC posterior needs a scalar prior precision or one per parameter tensor "
            f"({len(layout.names)}), got shape {tuple(d.shape)} (per-parameter values do not "
            "keep the Kronecker structure)"
        )

    def _prior(self, delta: PriorPrecision, like: Tensor) -> Tensor:
        if isinstance(delta, Mapping):
            layout = self._layout()
            missing = [n for n in layout.names if n not in delta]
            if missing:
                raise ValueError(f"prior precision mapping lacks parameters {missing}")
            delta = torch.stack([torch.as_tensor(delta[n]).reshape(()) for n in layout.names])
        d = torch.as_tensor(delta).to(device=like.device, dtype=like.dtype)
        if d.dim() == 1 and d.shape[0] == 1:
            d = d[0]
        if d.dim() > 1 or (
            d.dim() == 1 and d.shape[0] not in (self.size, len(self._layout_names()))
        ):
            raise ValueError(
                f"prior precision must be a scalar, one value per parameter tensor or one per "
                f"parameter ({self.size}); got shape {tuple(d.shape)}"
            )
        if bool((d.detach() <= 0).any()):
            raise ValueError("prior precision must be positive")
        return d

    def _layout_names(self) -> tuple[str, ...]:
        return () if self.layout is None else self.layout.names

    def _layout(self) -> ParamLayout:
        if self.layout is None:
            raise ValueError(
                "a prior precision per parameter tensor needs the layout: pass layout= (e.g. "
                "the curvature operator or its FunctionalModel)"
            )
        return self.layout

    def reference(self) -> Tensor:
        """A tensor of the curvature's dtype and device."""
        if self.kind == "kron":
            return self.blocks[0].values[0]
        if self.kind == "full":
            return self.matrix
        return self.vectors if self.kind == "lowrank" else self.values

    # -- closed forms ----------------------------------------------------------------------
    def logdet(self, s: Tensor, delta: PriorPrecision, damping: bool = False) -> Tensor:
        """``log det (s H + diag(δ))``."""
        ref = self.reference()
        if self.kind == "diag":
            return torch.log(s * self.values + self.prior_diagonal(delta, ref)).sum()
        if self.kind == "full":
            P = s * self.matrix + torch.diag(self.prior_diagonal(delta, ref))
            L = torch.linalg.cholesky(P)
            return 2 * L.diagonal().log().sum()
        if self.kind == "lowrank":
            d = self.prior_diagonal(delta, ref)
            W = self.vectors * (s * self.values.clamp_min(0)).sqrt() / d.sqrt().unsqueeze(-1)
            k = W.shape[1]
            core = torch.eye(k, dtype=W.dtype, device=W.device) + W.T @ W
            return d.log().sum() + torch.logdet(core)
        deltas = self.prior_per_tensor(delta, ref)
        total = ref.new_zeros(())
        for block, dl in zip(self.blocks, deltas, strict=True):
            total = total + _block_precision(block, s, dl, damping).log().sum()
        return total

    def covariance(self, s: Tensor, delta: PriorPrecision, damping: bool = False):
        """Σ = (s H + diag(δ))^{-1} as a covariance operator."""
        ref = self.reference()
        if self.kind == "diag":
            return Diagonal((s * self.values + self.prior_diagonal(delta, ref)).reciprocal())
        if self.kind == "full":
            P = s * self.matrix + torch.diag(self.prior_diagonal(delta, ref))
            L = torch.linalg.cholesky(P)
            eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
            factor = torch.linalg.solve_triangular(L, eye, upper=False).T  # L^{-T}
            return _bound(Dense.from_factor(factor, check=False), self.layout)
        if self.kind == "lowrank":
            d = self.prior_diagonal(delta, ref)
            op = LowRankPrecision(self.vectors, s * self.values.clamp_min(0), d)
            return _bound(op, self.layout)
        deltas = self.prior_per_tensor(delta, ref)
        blocks: dict[str, CovarianceOperator] = {}
        for block, dl in zip(self.blocks, deltas, strict=True):
            precision = _block_precision(block, s, dl, damping)
            if block.kind == "pair":
                Qo, Qi = block.vectors
                blocks[block.name] = KroneckerEigen(Qo, Qi, precision.reciprocal(), check=False)
            elif block.kind == "dense":
                (Q,) = block.vectors
                blocks[block.name] = Dense.from_factor(Q * precision.rsqrt(), check=False)
            else:
                blocks[block.name] = Diagonal(precision.reciprocal(), check=False)
        return Kronecker(blocks, check=False).bind(self.layout)


def _bound(op: CovarianceOperator, layout: ParamLayout | None) -> CovarianceOperator:
    return op if layout is None else op.bind(layout)


def _decompose(name: str, block: CovarianceOperator) -> _Block:
    """Eigendecompose one K-FAC block (symmetrized; eigenvalues clamped at 0)."""
    if isinstance(block, KroneckerFactors):
        pairs = [_eigh(F) for F in (block.out_factor, block.in_factor)]
        return _Block(name, "pair", (pairs[0][0], pairs[1][0]), (pairs[0][1], pairs[1][1]))
    if isinstance(block, Diagonal):
        return _Block(name, "diagonal", (block.diagonal(),), ())
    if isinstance(block, Dense):
        lam, Q = _eigh(block.to_dense())
        return _Block(name, "dense", (lam,), (Q,))
    raise TypeError(
        f"K-FAC block of {name!r} is a {type(block).__name__}; expected KroneckerFactors, Dense "
        "or Diagonal (as GGN.kfac() makes them)"
    )


def _eigh(F: Tensor) -> tuple[Tensor, Tensor]:
    lam, Q = torch.linalg.eigh((F + F.T) / 2)
    return lam.clamp_min(0), Q


def _block_precision(block: _Block, s: Tensor, delta: Tensor, damping: bool) -> Tensor:
    if block.kind == "pair":
        lo, li = block.values
        if damping:
            root, rs = delta.sqrt(), s.sqrt()
            return torch.outer(rs * lo + root, rs * li + root)
        return s * torch.outer(lo, li) + delta
    return s * block.values[0] + delta


# -- public functions ---------------------------------------------------------------------------
def _scale(
    n_scale: float, sigma_noise: float | Tensor, temperature: float | Tensor, like: Tensor
) -> Tensor:
    sigma = torch.as_tensor(sigma_noise, dtype=like.dtype, device=like.device)
    T = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if bool((sigma <= 0).any()) or bool((T <= 0).any()):
        raise ValueError("sigma_noise and temperature must be positive")
    return n_scale / (sigma.square() * T)


def _spectrum(curvature: Curvature | Spectrum, layout: Any) -> Spectrum:
    if isinstance(curvature, Spectrum):
        return curvature
    layout = getattr(layout, "layout", layout)
    return Spectrum(curvature, layout)


def laplace_posterior(
    curvature: Curvature,
    prior_precision: PriorPrecision,
    *,
    temperature: float | Tensor = 1.0,
    n_data: int | None = None,
    sigma_noise: float | Tensor = 1.0,
    damping: bool = False,
    layout: Any = None,
) -> CovarianceOperator:
    """The Laplace posterior covariance Σ = (s H + diag(δ))^{-1} (see the module docstring).

    Args:
        curvature: ``GGN.diagonal()`` ``(P,)``, ``GGN.dense()`` ``(P, P)``, ``GGN.lowrank(k)``
            ``(eigenvalues, eigenvectors)`` or ``GGN.kfac()`` (a :class:`~pushforward.Kronecker`).
        prior_precision: δ: a scalar, one value per parameter tensor (needs the layout) or per
            parameter.
        temperature: T.
        n_data: the curvature is an average over this many examples (``reduction="mean"``):
            it is multiplied by it. ``None`` for a summed curvature.
        sigma_noise: σ, the observation noise of regression (the curvature is for unit noise).
        damping: laplace-torch's damped Kronecker form (K-FAC only).
        layout: the :class:`~pushforward.ParamLayout` (or anything with ``.layout``: the
            curvature operator, a FunctionalModel) for per-tensor prior precisions and to bind
            the result; a K-FAC curvature brings its own.

    Returns:
        A covariance operator for ``functional_variance``, ``predictive``, samples, ...
    """
    spectrum = _spectrum(curvature, layout)
    s = _scale(
        1.0 if n_data is None else float(n_data), sigma_noise, temperature, spectrum.reference()
    )
    if damping and spectrum.kind != "kron":
        raise ValueError("damping applies to Kronecker (K-FAC) posteriors only")
    return spectrum.covariance(s, prior_precision, damping)


def log_marginal_likelihood(
    fit: Any,
    curvature: Curvature | Spectrum,
    prior_precision: PriorPrecision,
    *,
    sigma_noise: float | Tensor = 1.0,
    temperature: float | Tensor = 1.0,
    prior_mean: float | Tensor = 0.0,
    damping: bool = False,
) -> Tensor:
    """laplace-torch's Laplace approximation of the log marginal likelihood (module docstring).

    Args:
        fit: the :class:`~pushforward.curvature.GGN` / :class:`EmpiricalFisher` the curvature
            came from: it gives the loss at the parameters (one forward pass over its data the
            first time), the number of examples and outputs, the parameters θ and the likelihood.
        curvature: its diagonal, dense matrix, low-rank pair or K-FAC.
        prior_precision: δ (scalar, per tensor or per parameter); differentiable.
        sigma_noise: σ (regression only); differentiable.
        temperature: T.
        prior_mean: μ0, scalar or ``(P,)``.

    Returns:
        A scalar tensor.
    """
    spectrum = _spectrum(curvature, fit)
    ref = spectrum.reference()
    kind = fit.likelihood.kind
    sigma = torch.as_tensor(sigma_noise, dtype=ref.dtype, device=ref.device)
    if kind != "regression" and bool(sigma != 1):
        raise ValueError("sigma_noise applies to regression only")
    n_scale = float(fit.n_data) if fit.reduction == "mean" else 1.0
    s = _scale(n_scale, sigma, temperature, ref)
    T = torch.as_tensor(temperature, dtype=ref.dtype, device=ref.device)
    loss = fit.loss().to(ref.dtype)
    if kind == "regression":
        log_lik = -loss / (sigma.square() * T) - fit.num_outputs() * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )
    else:
        log_lik = -loss / T
    delta = spectrum.prior_diagonal(prior_precision, ref)
    theta = fit.fm.flatten(fit.fm.params(False)).to(ref.dtype)
    diff = theta - torch.as_tensor(prior_mean, dtype=ref.dtype, device=ref.device)
    scatter = (diff * delta * diff).sum()
    logdet = spectrum.logdet(s, prior_precision, damping)
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
    sigma_noise: float | Tensor = 1.0,
    optimize_sigma: bool = False,
    temperature: float = 1.0,
    prior_mean: float | Tensor = 0.0,
    val_data: Iterable | None = None,
    grid: Tensor | None = None,
    link: str = "probit",
) -> Tensor | tuple[Tensor, Tensor]:
    """Tune the prior precision δ (and for regression optionally σ).

    Args:
        fit: the curvature operator the curvature came from (see
            :func:`log_marginal_likelihood`).
        curvature: its diagonal, dense matrix, low-rank pair or K-FAC (decomposed once).
        method: ``"marglik"`` — maximize :func:`log_marginal_likelihood` with Adam on ``log δ``
            (``n_steps`` steps of learning rate ``lr`` from ``init_prior_prec``; laplace-torch's
            loop); ``"gridsearch"`` — the scalar δ of ``grid`` (default ``10^-4 ... 10^4``,
            100 points) with the best log-likelihood of the predictive on ``val_data``
            (classification: the ``link`` predictive; regression: ``N(f, var + σ²)``).
        prior_structure: ``"scalar"``, ``"layerwise"`` (one per parameter tensor) or ``"diag"``
            (one per parameter; not for K-FAC) — marglik only.
        optimize_sigma: also maximize over σ (regression, marglik).

    Returns:
        δ — 0-d for ``"scalar"``, ``(L,)``, or ``(P,)`` — or ``(δ, σ)`` with ``optimize_sigma``.
    """
    spectrum = _spectrum(curvature, fit)
    ref = spectrum.reference()
    if method == "gridsearch":
        if prior_structure != "scalar" or optimize_sigma:
            raise ValueError("gridsearch tunes a scalar prior precision only")
        if val_data is None:
            raise ValueError("method='gridsearch' needs val_data (batches of (x, y))")
        return _gridsearch(fit, spectrum, val_data, grid, sigma_noise, temperature, link)
    if method != "marglik":
        raise ValueError(f"method must be 'marglik' or 'gridsearch', got {method!r}")
    if optimize_sigma and fit.likelihood.kind != "regression":
        raise ValueError("optimize_sigma applies to regression only")
    sizes = {"scalar": 1, "diag": spectrum.size}
    if prior_structure == "layerwise":
        sizes["layerwise"] = len(spectrum._layout().names)
    if prior_structure not in sizes:
        raise ValueError(
            f"prior_structure must be 'scalar', 'layerwise' or 'diag', got {prior_structure!r}"
        )
    log_delta = torch.full(
        (sizes[prior_structure],), math.log(init_prior_prec), dtype=ref.dtype, device=ref.device
    ).requires_grad_(True)
    variables = [log_delta]
    log_sigma = torch.as_tensor(sigma_noise, dtype=ref.dtype, device=ref.device).log()
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
                spectrum,
                delta if prior_structure != "scalar" else delta[0],
                sigma_noise=log_sigma.exp(),
                temperature=temperature,
                prior_mean=prior_mean,
            )
            loss.backward()
            optimizer.step()
    delta = log_delta.detach().exp()
    delta = delta[0] if prior_structure == "scalar" else delta
    return (delta, log_sigma.detach().exp()) if optimize_sigma else delta


def _gridsearch(fit, spectrum: Spectrum, val_data, grid, sigma_noise, temperature, link) -> Tensor:
    from pushforward.api.predictive import predictive
    from pushforward.api.variance import functional_variance
    from pushforward.curvature.data import Batches

    ref = spectrum.reference()
    if grid is None:
        grid = torch.logspace(-4, 4, 100, dtype=ref.dtype, device=ref.device)
    fm, lik = fit.fm, fit.likelihood
    if lik.kind not in ("classification", "regression"):
        raise ValueError("gridsearch needs a classification or regression likelihood")
    val = Batches(val_data, fm.device, fit.data.target_key, group=fit.group)
    batches = list(val)
    n_scale = float(fit.n_data) if fit.reduction == "mean" else 1.0
    sigma = torch.as_tensor(sigma_noise, dtype=ref.dtype, device=ref.device)
    s = _scale(n_scale, sigma, temperature, ref)
    best, best_score = None, math.inf
    for delta in grid:
        S = spectrum.covariance(s, delta)
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
        total, count = val.total([torch.tensor([total, count], dtype=torch.float64)])[0].tolist()
        score = total / max(count, 1)
        if score < best_score:
            best, best_score = delta, score
    if best is None:
        raise ValueError("gridsearch: every prior precision gave a non-finite validation loss")
    return best.detach()
