"""A BoTorch model from a network and a weight-space Gaussian: :class:`PushforwardModel`.

The posterior over the outputs of a network linearized at its weights θ*, with weight-space
covariance S, at the q points of a t-batch is the Gaussian with mean ``f(X; θ*)`` and covariance
``J(X) S J(X)^T`` (q m x q m, points major and outputs minor). :meth:`PushforwardModel.posterior`
computes exactly that block for every t-batch with
:func:`pushforward.functional_covariance` (``joint="groups"``: the layer-structured closed forms
where the posterior has them), never a covariance across t-batches, and differentiably in X.

Conditioning (:meth:`PushforwardModel.condition_on_observations`, hence ``fantasize``) adds the
new points' Gauss-Newton curvature ``J_n^T Λ J_n`` (Λ the noise precisions) to the posterior
precision — what refitting the Laplace approximation with those points would add, at the same
θ* and prior. The mean stays ``f(X; θ*)`` (the network is not retrained and the observed values
do not move it); the covariance becomes ``K_XX - K_Xn (K_nn + N)^{-1} K_nX`` with ``K = J S J^T``,
computed from the joint covariance of each t-batch with the conditioning points.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from botorch.acquisition.objective import PosteriorTransform
from botorch.models.model import FantasizeMixin, Model
from botorch.models.transforms.input import InputTransform
from botorch.models.transforms.outcome import OutcomeTransform
from botorch.posteriors import Posterior
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator
from torch import Tensor, nn

from pushforward.api.variance import functional_covariance
from pushforward.botorch.paths import SamplePaths
from pushforward.core.functional_model import FunctionalModel
from pushforward.covariance.operator import CovarianceOperator
from pushforward.covariance.precision_update import PrecisionUpdate
from pushforward.products.jacobian import jacobian

__all__ = ["PosteriorSource", "PushforwardModel"]

LIKELIHOODS = ("regression",)


@dataclass(frozen=True)
class PosteriorSource:
    """What a posterior of a :class:`PushforwardModel` was computed from (kept on the posterior
    as ``posterior.pushforward_source``; :class:`~pushforward.botorch.PathwiseSampler` reads it).

    Attributes:
        model: the model.
        X: the inputs after the input transform, ``batch_shape x q x d``.
        output_indices: the model's outputs the posterior is over (``None``: all).
        observation_noise: as passed to ``posterior``.
        posterior_transform: as passed to ``posterior``.
    """

    model: PushforwardModel
    X: Tensor
    output_indices: tuple[int, ...] | None
    observation_noise: bool | Tensor
    posterior_transform: PosteriorTransform | None


@dataclass(frozen=True)
class _Conditioning:
    """Observations the model is conditioned on: inputs (after the input transform)
    ``batch x n x d`` and noise variances ``batch x n x m`` (all network outputs), with the
    model's batch shape (that of the observed values, which may add fantasy dimensions)."""

    X: Tensor
    noise: Tensor
    batch_shape: torch.Size


class PushforwardModel(Model, FantasizeMixin):
    """A BoTorch model: a network linearized at its weights with a weight-space Gaussian.

    Args:
        model: an ``nn.Module`` (its trainable parameters carry the posterior) or a
            :class:`~pushforward.FunctionalModel` (selected parameters) mapping inputs
            ``(N, d)`` to outputs ``(N, m)``. Used in its current mode (call ``.eval()`` first
            if it has dropout or batch norm).
        cov: the posterior covariance S over the selected parameters, a
            :class:`~pushforward.CovarianceOperator` (e.g. from
            :func:`pushforward.from_laplace`).
        noise: observation noise variance σ² in the network's output space (that of the
            outcome-transformed targets): a number, or a tensor ``()`` or ``(m,)``. Needed
            for ``observation_noise=True`` and for conditioning.
        likelihood: ``"regression"`` (Gaussian observations; the only likelihood of BoTorch's
            Gaussian posteriors).
        outcome_transform: a fitted BoTorch outcome transform (e.g. ``Standardize`` on the
            training targets the network was trained on), applied to posteriors as
            ``untransform_posterior``; kept in eval mode.
        input_transform: a fitted BoTorch input transform (e.g. ``Normalize`` with the search
            bounds), applied to every X before the network.
        num_outputs: m; default: the ``out_features`` of the last ``nn.Linear`` of the module
            (checked against the output at every call).
        strategy, memory_budget: passed to :func:`pushforward.functional_covariance`.

    ``posterior(X)`` for X ``batch_shape x q x d`` returns a :class:`GPyTorchPosterior` with,
    per t-batch, the joint Gaussian over its q points (``MultivariateNormal`` for one output,
    an interleaved ``MultitaskMultivariateNormal`` for several). Everything is differentiable
    w.r.t. X and the covariance's tensors.
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        cov: CovarianceOperator,
        *,
        noise: float | Tensor | None = None,
        likelihood: str = "regression",
        outcome_transform: OutcomeTransform | None = None,
        input_transform: InputTransform | None = None,
        num_outputs: int | None = None,
        strategy: str = "auto",
        memory_budget: int | str | None = None,
    ) -> None:
        super().__init__()
        fm = model if isinstance(model, FunctionalModel) else FunctionalModel(model)
        if fm.output_dims != 1:
            raise ValueError(
                f"the FunctionalModel must have output_dims=1 (outputs (N, m)), got "
                f"{fm.output_dims}"
            )
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {list(LIKELIHOODS)} (BoTorch's posteriors are "
                f"Gaussian over the outputs), got {likelihood!r}"
            )
        if not isinstance(cov, CovarianceOperator):
            raise TypeError(f"cov must be a pushforward covariance operator, got {type(cov)}")
        width = _num_outputs(fm, num_outputs)
        self._fm = fm
        self._cov = cov.bind(fm.layout)
        self._cov_tensors = tuple(self._cov.tensors())
        self._width = width
        self._all = tuple(range(width))
        self._selection: tuple[int, ...] = self._all
        self._conditioning: _Conditioning | None = None
        self._engine = {"strategy": strategy, "memory_budget": memory_budget}
        self.likelihood = likelihood
        self.noise: Tensor | None
        self.register_buffer("noise", _noise(noise, width, fm))
        self._noise_matrices: dict[tuple, Tensor] = {}
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform.eval()
        if input_transform is not None:
            self.input_transform = input_transform.eval()

    @classmethod
    def from_laplace(
        cls,
        la: Any,
        *,
        outcome_transform: OutcomeTransform | None = None,
        input_transform: InputTransform | None = None,
        strategy: str = "auto",
        memory_budget: int | str | None = None,
    ) -> PushforwardModel:
        """The model of a fitted laplace-torch regression Laplace approximation (any structure
        :func:`pushforward.from_laplace` converts: full, diagonal, Kronecker, low-rank,
        last-layer, subnetwork), with its observation noise ``la.sigma_noise ** 2``."""
        from pushforward.laplace_interop.convert import from_laplace

        if getattr(la, "likelihood", None) != "regression":
            raise ValueError(
                "PushforwardModel.from_laplace needs a regression Laplace approximation "
                f"(likelihood='regression'), got likelihood={getattr(la, 'likelihood', None)!r}"
            )
        fm, cov = from_laplace(la)
        sigma = torch.as_tensor(la.sigma_noise).detach().reshape(-1)
        return cls(
            fm,
            cov,
            noise=sigma.square().to(fm.dtype),
            outcome_transform=outcome_transform,
            input_transform=input_transform,
            num_outputs=int(la.n_outputs),
            strategy=strategy,
            memory_budget=memory_budget,
        )

    # -- what the model is ---------------------------------------------------------------
    @property
    def functional_model(self) -> FunctionalModel:
        """The network and the parameters the posterior is over."""
        return self._fm

    @property
    def covariance(self) -> CovarianceOperator:
        """The weight-space posterior covariance: the one given, or after conditioning the
        :class:`~pushforward.covariance.PrecisionUpdate` by the conditioning points' rows (a
        model with a batch shape has one per batch element: not available)."""
        cond = self._conditioning
        if cond is None:
            return self._cov
        if cond.X.dim() > 2:
            raise ValueError(
                f"the model is conditioned on batches of observations (batch shape "
                f"{tuple(cond.X.shape[:-2])}): it has one weight-space covariance per batch"
            )
        with torch.no_grad():
            _, J = jacobian(self._fm, cond.X)  # (n, m, P)
        return PrecisionUpdate(
            self._cov, J.reshape(-1, J.shape[-1]), cond.noise.reshape(-1).reciprocal()
        )

    @property
    def num_outputs(self) -> int:
        return len(self._selection)

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size() if self._conditioning is None else self._conditioning.batch_shape

    def _set_transformed_inputs(self) -> None:
        """No training inputs are stored (the network was trained elsewhere), so there is
        nothing to transform when switching modes."""

    # -- posterior -------------------------------------------------------------------------
    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: PosteriorTransform | None = None,
        **kwargs: Any,
    ) -> Posterior:
        """The joint Gaussian posterior over each t-batch of ``X`` (``batch_shape x q x d``).

        Args:
            X: ``batch_shape x q x d`` (a ``q x d`` X is one t-batch).
            output_indices: outputs to compute (default all ``num_outputs``).
            observation_noise: ``False``: the latent function; ``True``: add the noise σ²
                to every point's variance; a tensor ``batch_shape x q x m`` of noise
                variances to add (in the outcome-transformed space).
            posterior_transform: applied last (e.g. a scalarization of several outputs).

        Returns:
            A :class:`GPyTorchPosterior` (or what the outcome and posterior transforms make of
            it), mean ``broadcast(batch_shape, model.batch_shape) x q x m``.
        """
        self.eval()
        X_tf = self.transform_inputs(X)
        local = _check_indices(output_indices, self.num_outputs)
        selection = self._selection if local is None else tuple(self._selection[i] for i in local)
        mean, cov = self._latent(X_tf, selection)
        cov = self._add_noise(cov, observation_noise, local, mean.shape)
        dist = _distribution(mean, cov)
        post: Posterior = GPyTorchPosterior(dist)
        if hasattr(self, "outcome_transform"):
            tf = self.outcome_transform
            if local is not None:
                tf = tf.subset_output(list(local))
            post = tf.untransform_posterior(post, X=X_tf)
        if posterior_transform is not None:
            post = posterior_transform(posterior=post, X=X_tf)
        post.pushforward_source = PosteriorSource(
            self, X_tf, local, observation_noise, posterior_transform
        )
        return post

    def _differentiable(self, X: Tensor) -> bool:
        return torch.is_grad_enabled() and (
            X.requires_grad or any(t.requires_grad for t in self._cov_tensors)
        )

    def _joint(self, Z: Tensor, group: int, selection: tuple[int, ...] | None) -> tuple:
        """``(f (N, m), covariance (N / group, group s, group s))`` of the rows of ``Z``."""
        N = Z.shape[0]
        outputs = None
        if selection is not None and selection != self._all:
            outputs = torch.tensor(selection, device=Z.device).expand(N, len(selection))
        f, cov = functional_covariance(
            self._fm,
            Z,
            self._cov,
            joint="groups",
            group_size=group,
            outputs=outputs,
            differentiable=self._differentiable(Z),
            **self._engine,
        )
        if f.dim() != 2 or f.shape[1] != self._width:
            raise ValueError(
                f"the network maps inputs (N, d) to outputs of shape {tuple(f.shape)}; expected "
                f"(N, num_outputs={self._width})"
            )
        return f, cov.reshape(N // group, *cov.shape[-2:])

    def _latent(self, X: Tensor, selection: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Mean ``(*batch, q, s)`` and covariance ``(*batch, q s, q s)`` of the latent f."""
        if X.dim() < 2:
            raise ValueError(f"X must have shape batch_shape x q x d, got {tuple(X.shape)}")
        q, d, s = X.shape[-2], X.shape[-1], len(selection)
        cond = self._conditioning
        if cond is None:
            batch = X.shape[:-2]
            f, cov = self._joint(X.reshape(-1, d), q, selection)
            if selection != self._all:
                f = f[:, list(selection)]
            mean = f.reshape(*batch, q, s)
            return mean, cov.reshape(*batch, q * s, q * s)
        # conditioned: the joint covariance of each t-batch with its conditioning points
        n, m = cond.X.shape[-2], self._width
        batch = torch.broadcast_shapes(X.shape[:-2], cond.X.shape[:-2])
        Z = torch.cat([X.expand(*batch, q, d), cond.X.expand(*batch, n, d)], dim=-2)
        f, K = self._joint(Z.reshape(-1, d), q + n, None)
        noise = cond.noise.expand(*batch, n, m).reshape(-1, n * m)
        Knn = K[:, q * m :, q * m :] + torch.diag_embed(noise)
        L = torch.linalg.cholesky(0.5 * (Knn + Knn.transpose(-1, -2)))
        V = torch.linalg.solve_triangular(L, K[:, q * m :, : q * m], upper=False)
        cov = K[:, : q * m, : q * m] - V.transpose(-1, -2) @ V
        picked = torch.tensor(selection, device=X.device)
        index = (torch.arange(q, device=X.device)[:, None] * m + picked).reshape(-1)
        cov = cov[:, index][:, :, index]
        mean = f.reshape(-1, q + n, m)[:, :q, list(selection)]
        out = torch.broadcast_shapes(batch, cond.batch_shape)
        mean = mean.reshape(*batch, q, s).expand(*out, q, s)
        return mean, cov.reshape(*batch, q * s, q * s).expand(*out, q * s, q * s)

    def _add_noise(
        self,
        cov: Tensor,
        observation_noise: bool | Tensor,
        local: tuple[int, ...] | None,
        mean_shape: torch.Size,
    ) -> Tensor:
        if observation_noise is False:
            return cov
        s = mean_shape[-1]
        if isinstance(observation_noise, Tensor):
            noise = observation_noise.to(cov)
            if local is not None and noise.shape[-1] == self.num_outputs != s:
                noise = noise[..., list(local)]
            noise = noise.expand(mean_shape)
        elif observation_noise is True:
            if self.noise is None:
                raise ValueError(
                    "observation_noise=True needs the model's noise: pass noise=... (or use "
                    "PushforwardModel.from_laplace, which reads la.sigma_noise)"
                )
            selection = (
                self._selection if local is None else tuple(self._selection[i] for i in local)
            )
            return cov + self._noise_matrix(selection, mean_shape[-2], cov.dtype)
        else:
            raise TypeError(
                f"observation_noise must be a bool or a tensor, got {type(observation_noise)}"
            )
        return cov + torch.diag_embed(noise.reshape(*mean_shape[:-2], -1))

    # -- sample functions ----------------------------------------------------------------
    def function_samples(self, n: int, *, generator: torch.Generator | None = None) -> SamplePaths:
        """``n`` fixed pathwise sample functions ``f̃_i(X) = f(X) + J(X) L z_i``: a callable
        mapping X (``batch_shape x q x d``) to ``n x batch_shape x q x m`` samples, the same
        functions at every call, differentiable in X (see :mod:`pushforward.botorch.paths`).

        Args:
            n: number of sample functions.
            generator: ``torch.Generator`` (on the network's device) for the draws.
        """
        return SamplePaths(self, n, generator)

    def _noise_matrix(self, selection: tuple[int, ...], q: int, dtype: torch.dtype) -> Tensor:
        """``(q s, q s)`` diagonal of the noise variances of ``selection`` at q points (kept per
        shape while the noise buffer is unchanged)."""
        noise = self.noise
        key = (selection, q, dtype, noise.data_ptr(), noise._version)
        found = self._noise_matrices.get(key)
        if found is None or noise.requires_grad:
            picked = noise if selection == self._all else noise[list(selection)]
            found = torch.diag(picked.repeat(q).to(dtype))
            if not noise.requires_grad:
                self._noise_matrices = {key: found}
        return found

    # -- outputs ---------------------------------------------------------------------------
    def subset_output(self, idcs: list[int]) -> PushforwardModel:
        """The model over outputs ``idcs`` (of this model's outputs). Conditioning keeps using
        every output of the conditioning points (the marginal of the conditioned model)."""
        local = _check_indices(idcs, self.num_outputs)
        new = self._copy()
        new._selection = tuple(self._selection[i] for i in local)
        if hasattr(self, "outcome_transform"):
            new.outcome_transform = self.outcome_transform.subset_output(list(local))
        return new

    def _copy(self) -> PushforwardModel:
        """A model sharing the network and covariance, with copies of the transforms."""
        new = copy.copy(self)
        new._modules = {k: copy.deepcopy(v) for k, v in self._modules.items()}
        new._buffers = dict(self._buffers)
        new._parameters = dict(self._parameters)
        return new

    # -- conditioning ----------------------------------------------------------------------
    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> PushforwardModel:
        """The model with the curvature of observations ``(X, Y)`` added to its precision.

        Args:
            X: ``batch_shape x n' x d`` inputs (before the input transform).
            Y: ``batch_shape' x n' x m`` observed values (before the outcome transform; only
                their shape matters: the mean stays ``f(X; θ*)``, see the module docstring).
                ``batch_shape'`` may add leading dimensions (fantasies): the new model's
                batch shape is ``broadcast(batch_shape', batch_shape)``.
            noise: noise variances of the observations, shaped like ``Y`` (in the
                outcome-transformed space); default the model's ``noise``.

        Returns:
            A new :class:`PushforwardModel`; this one is unchanged.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self.eval()
        X_tf = self.transform_inputs(X)
        if self.num_outputs != self._width:
            raise ValueError(
                "condition the full model and subset its outputs afterwards (observations of "
                "a subset of the network's outputs are not supported)"
            )
        if Y.dim() < 2 or Y.shape[-1] != self.num_outputs or Y.shape[-2] != X.shape[-2]:
            raise ValueError(
                f"Y must have shape batch_shape' x n' x m = ... x {X.shape[-2]} x "
                f"{self.num_outputs}, got {tuple(Y.shape)}"
            )
        n, m = X_tf.shape[-2], self._width
        if noise is None and self.noise is None:
            raise ValueError(
                "conditioning needs the observation noise: pass noise=... here or to the model"
            )
        variances = (self.noise if noise is None else noise).to(X_tf)
        try:
            variances = variances.expand(*X_tf.shape[:-1], m)
        except RuntimeError:
            raise ValueError(
                f"noise must broadcast to X's batch_shape x n' x m = "
                f"{(*X_tf.shape[:-1], m)} (one covariance per batch of X), got "
                f"{tuple(variances.shape)}"
            ) from None
        if bool((variances <= 0).any()):
            raise ValueError("observation noise variances must be positive to condition on")
        batch = torch.broadcast_shapes(Y.shape[:-2], X_tf.shape[:-2], self.batch_shape)
        old = self._conditioning
        if old is not None:
            both = torch.broadcast_shapes(old.X.shape[:-2], X_tf.shape[:-2])
            d = X_tf.shape[-1]
            X_tf = torch.cat([old.X.expand(*both, -1, d), X_tf.expand(*both, n, d)], dim=-2)
            variances = torch.cat(
                [old.noise.expand(*both, -1, m), variances.expand(*both, n, m)], dim=-2
            )
        new = self._copy()
        new._conditioning = _Conditioning(X_tf, variances, batch)
        return new


# -- helpers -----------------------------------------------------------------------------------
def _num_outputs(fm: FunctionalModel, given: int | None) -> int:
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"num_outputs must be a positive integer, got {given!r}")
        return given
    linear = [m for m in fm.module.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(
            "cannot tell the network's number of outputs (it has no nn.Linear layer): pass "
            "num_outputs=..."
        )
    return linear[-1].out_features


def _noise(noise: float | Tensor | None, width: int, fm: FunctionalModel) -> Tensor | None:
    if noise is None:
        return None
    t = torch.as_tensor(noise, dtype=fm.dtype).detach().reshape(-1)
    if t.numel() not in (1, width):
        raise ValueError(
            f"noise must be a number or have one entry per output ({width}), got shape "
            f"{tuple(torch.as_tensor(noise).shape)}"
        )
    if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"noise variances must be finite and >= 0, got {t.tolist()}")
    return t.expand(width).clone().to(fm.device)


def _check_indices(indices: Sequence[int] | None, m: int) -> tuple[int, ...] | None:
    if indices is None:
        return None
    out = tuple(int(i) for i in indices)
    if not out or any(i < 0 or i >= m for i in out):
        raise ValueError(f"output indices must lie in [0, {m}), got {list(indices)}")
    return out


def _distribution(mean: Tensor, cov: Tensor) -> MultivariateNormal:
    """``MultivariateNormal`` (one output) or interleaved ``MultitaskMultivariateNormal``
    from mean ``(*batch, q, s)`` and covariance ``(*batch, q s, q s)``; the covariance is
    lazy, so a singular one (repeated points, no noise) is factored only when sampled."""
    covariance = DenseLinearOperator(cov)
    if mean.shape[-1] == 1:
        return MultivariateNormal(mean.squeeze(-1), covariance)
    return MultitaskMultivariateNormal(mean, covariance, interleaved=True)
