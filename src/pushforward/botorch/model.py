"""A BoTorch model from a network and a weight-space Gaussian: :class:`PushforwardModel`.

The posterior over the outputs of a network linearized at its weights θ*, with weight-space
covariance S, at the q points of a t-batch is the Gaussian with mean ``f(X; θ*)`` and covariance
``J(X) S J(X)^T`` (q m x q m, points major and outputs minor). :meth:`PushforwardModel.posterior`
computes exactly that block for every t-batch with
:func:`pushforward.functional_covariance` (``joint="groups"``: the layer-structured closed forms
where the posterior has them), never a covariance across t-batches, and differentiably in X.

The linearized network with θ ~ N(θ*, S) is a Gaussian process with mean ``f(x; θ*)`` and kernel
``k(x, x') = J(x) S J(x')^T``. Conditioning it on observations ``(X_n, Y_n)`` with noise
variances ``N`` (:meth:`PushforwardModel.condition_on_observations`, hence ``fantasize``) is
exact and closed form for both moments (``K_ab = k(a, b)``, ``C = K_nn + N``):

* mean ``f(X) + K_Xn C^{-1} (Y_n - f(X_n))``,
* covariance ``K_XX - K_Xn C^{-1} K_nX``,

equivalently the weight-space update ``θ̄ = θ* + S J_n^T C^{-1} (Y_n - f(X_n))``,
``S' = (S^{-1} + J_n^T N^{-1} J_n)^{-1}`` — what refitting the Laplace approximation of the
linearized network with the new points gives (same θ*, same prior). The network itself is not
retrained. Conditioning again composes (it equals conditioning once on all the points).
Nothing of size P x P is formed: one conditioning set shared by every t-batch keeps
``S J_n^T`` (``n m`` rows of P) and pushes it through the network with ``n m`` Jacobian-vector
products per call; a batch of conditioning sets (fantasies at the q-batches of an acquisition)
uses the joint covariance of each t-batch with its own conditioning points.
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
from pushforward.core.layout import ParamLayout
from pushforward.covariance.operator import CovarianceOperator
from pushforward.covariance.precision_update import PrecisionUpdate
from pushforward.persistence import from_state, register, to_state
from pushforward.products.jacobian import jacobian
from pushforward.products.jvp import batched_jvp

__all__ = ["PosteriorSource", "PushforwardModel"]

LIKELIHOODS = ("regression",)


@dataclass(frozen=True)
class PosteriorSource:
    """What a posterior of a :class:`PushforwardModel` was computed from.

    It is kept on the posterior as ``posterior.pushforward_source``;
    :class:`~pushforward.botorch.PathwiseSampler` reads it.

    Attributes:
        model: the model.
        X: the inputs after the input transform, ``batch_shape x q x d``.
        output_indices: the model's outputs the posterior is over (``None``: all).
        observation_noise: the noise added: as passed to ``posterior``, or ``True`` where the
            model adds its noise to every posterior (``observation_noise=True`` at
            construction).
        posterior_transform: as passed to ``posterior``.
    """

    model: PushforwardModel
    X: Tensor
    output_indices: tuple[int, ...] | None
    observation_noise: bool | Tensor
    posterior_transform: PosteriorTransform | None


@dataclass(frozen=True)
class _Conditioning:
    """Observations the model is conditioned on (all network outputs observed).

    Attributes:
        X: inputs after the input transform, ``cbatch x n x d``.
        Y: observed values after the outcome transform, ``ybatch x n x m``.
        noise: noise variances (outcome-transformed space), ``cbatch x n x m``.
        batch_shape: the model's batch shape, ``broadcast(ybatch, cbatch)`` (fantasies add
            leading dimensions to ``ybatch``).
    """

    X: Tensor
    Y: Tensor
    noise: Tensor
    batch_shape: torch.Size

    @property
    def shared(self) -> bool:
        """One conditioning set for every batch element: the weight-space update applies."""
        return self.X.dim() == 2


@dataclass(frozen=True)
class _Update:
    """The weight-space update of a shared conditioning set (``r = n m`` observed entries).

    Attributes:
        rows: ``(r, P)``, ``J_n S`` (the columns ``S J_n^T`` as rows).
        chol: ``(r, r)``, the Cholesky factor of ``C = J_n S J_n^T + N``.
        alpha: ``(*ybatch, r, 1)``, ``C^{-1} (Y_n - f(X_n))``.
    """

    rows: Tensor
    chol: Tensor
    alpha: Tensor


@register
class PushforwardModel(Model, FantasizeMixin):
    """A BoTorch model: a network linearized at its weights with a weight-space Gaussian.

    Args:
        model: an ``nn.Module`` (its trainable parameters carry the posterior) or a
            :class:`~pushforward.FunctionalModel` (selected parameters) mapping inputs
            ``(N, d)`` to outputs ``(N, m)``. Used in its current mode (call ``.eval()`` first
            if it has dropout or batch norm), in its own dtype: inputs must have the dtype of
            its parameters (BoTorch works in float64: build the network in float64).
        cov: the posterior covariance S over the selected parameters, a
            :class:`~pushforward.CovarianceOperator` (e.g. from
            :func:`pushforward.from_laplace`).
        noise: observation noise variance σ² in the network's output space (that of the
            outcome-transformed targets): a number, or a tensor ``()`` or ``(m,)``. Needed
            for ``observation_noise`` and for conditioning.
        observation_noise: ``False`` (default): posteriors are over the latent function unless
            a call asks for the noise (BoTorch's convention); ``True``: every posterior adds
            σ² (as laplace-bayesopt's ``LaplaceBoTorch`` does), whatever the acquisition asks.
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
        observation_noise: bool = False,
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
        if not isinstance(observation_noise, bool):
            raise TypeError(
                f"observation_noise must be True or False, got {type(observation_noise).__name__}"
            )
        if observation_noise and noise is None:
            raise ValueError("observation_noise=True needs the noise variance: pass noise=...")
        width = _num_outputs(fm, num_outputs)
        self._fm = fm
        self._set_covariance(cov.bind(fm.layout))
        self._width = width
        self._all = tuple(range(width))
        self._selection: tuple[int, ...] = self._all
        self._conditioning: _Conditioning | None = None
        self._update_cache: tuple[tuple, _Update] | None = None
        self._engine = {"strategy": strategy, "memory_budget": memory_budget}
        self.likelihood = likelihood
        self.observation_noise = observation_noise
        self.noise: Tensor | None
        self.register_buffer("noise", _noise(noise, width, fm))
        self._noise_matrices: dict[tuple, Tensor] = {}
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform.eval()
        if input_transform is not None:
            self.input_transform = input_transform.eval()

    def _set_covariance(self, cov: CovarianceOperator) -> None:
        self._cov = cov
        self._cov_tensors = tuple(cov.tensors())

    @classmethod
    def from_laplace(
        cls,
        la: Any,
        *,
        observation_noise: bool | None = None,
        outcome_transform: OutcomeTransform | None = None,
        input_transform: InputTransform | None = None,
        strategy: str = "auto",
        memory_budget: int | str | None = None,
    ) -> PushforwardModel:
        """The model of a fitted laplace-torch regression Laplace approximation.

        Any structure :func:`pushforward.from_laplace` converts is accepted (full, diagonal,
        Kronecker, low-rank, last-layer, subnetwork); the observation noise is
        ``la.sigma_noise ** 2``.

        Args:
            la: the fitted Laplace approximation, or a laplace-bayesopt ``LaplaceBoTorch``
                (its ``bnn``; its input and outcome transforms are used unless others are
                given).
            observation_noise: whether every posterior adds σ² (see the class); default
                ``False`` for a Laplace approximation, ``True`` for a ``LaplaceBoTorch`` (the
                same posteriors as it).
            outcome_transform: a fitted BoTorch outcome transform, as for the class (default: a
                ``LaplaceBoTorch``'s own, else none).
            input_transform: a fitted BoTorch input transform, as for the class (default: a
                ``LaplaceBoTorch``'s own, else none).
            strategy: passed to :func:`pushforward.functional_covariance`, as for the class.
            memory_budget: passed to :func:`pushforward.functional_covariance`, as for the class.

        Returns:
            A :class:`PushforwardModel`. What it keeps is detached from autograd: a Laplace
            approximation whose prior precision or noise was tuned with gradients
            (``la.log_marginal_likelihood(prior, σ)`` stores them with their graph) gives a model
            that can be deep-copied and back-propagated through on its own.
        """
        from pushforward.laplace_interop.convert import from_laplace

        la, defaults = _unwrap_laplace_botorch(la)
        if observation_noise is None:
            observation_noise = defaults.get("observation_noise", False)
        outcome_transform = outcome_transform or defaults.get("outcome_transform")
        input_transform = input_transform or defaults.get("input_transform")
        if getattr(la, "likelihood", None) != "regression":
            raise ValueError(
                "PushforwardModel.from_laplace needs a regression Laplace approximation "
                f"(likelihood='regression'), got likelihood={getattr(la, 'likelihood', None)!r}"
            )
        fm, cov = from_laplace(la)
        sigma = torch.as_tensor(la.sigma_noise).detach().reshape(-1)
        return cls(
            fm,
            cov._apply(lambda t: t.detach()),
            noise=sigma.square().to(fm.dtype),
            observation_noise=observation_noise,
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
        """The weight-space posterior covariance S, a :class:`~pushforward.CovarianceOperator`.

        The one given, or after conditioning the :class:`~pushforward.covariance.PrecisionUpdate` by
        the conditioning points' rows.

        Raises:
            ValueError: the model is conditioned on a batch of observation sets (it has one
                weight-space covariance per batch element).
        """
        cond = self._conditioning
        if cond is None:
            return self._cov
        if not cond.shared:
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
    def weight_shift(self) -> Tensor | None:
        """The posterior mean of the weights minus θ*, ``(P,)`` (``None`` before conditioning).

        It is ``S J_n^T C^{-1} (Y_n - f(X_n))``.

        Raises:
            ValueError: the model is conditioned on a batch of observation sets, or on batched
                observations (``batch_shape != ()``): it needs one conditioning set.
        """
        cond = self._conditioning
        if cond is None:
            return None
        if not cond.shared or cond.Y.dim() > 2:
            raise ValueError(
                f"the model is conditioned on batches of observations (batch shape "
                f"{tuple(self.batch_shape)}): its weights have one posterior mean per batch"
            )
        up = self._update()
        return (up.rows.T @ up.alpha).squeeze(-1)

    @property
    def num_outputs(self) -> int:
        """m, the number of outputs the posteriors are over (after :meth:`subset_output`)."""
        return len(self._selection)

    @property
    def batch_shape(self) -> torch.Size:
        """The model's batch shape (``()``, or that of the observation sets it is conditioned on)."""
        return torch.Size() if self._conditioning is None else self._conditioning.batch_shape

    def _set_transformed_inputs(self) -> None:
        """Do nothing: no training inputs are stored (the network was trained elsewhere).

        So there is nothing to transform when switching modes.
        """

    def _check_inputs(self, X: Tensor, what: str = "X") -> None:
        """A clear error for inputs the network cannot take (type, rank, dtype)."""
        if not isinstance(X, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(X).__name__}")
        if X.dim() < 2:
            raise ValueError(
                f"{what} must have shape batch_shape x q x d, got {tuple(X.shape)} (a 1-d X is "
                f"ambiguous: one point or several of width 1; pass 1 x d for one point)"
            )
        if X.dtype != self._fm.dtype:
            raise ValueError(
                f"{what} has dtype {X.dtype} but the network's parameters are "
                f"{self._fm.dtype}: build the network in {X.dtype} (e.g. net.to({X.dtype}) "
                f"before fitting; BoTorch works in float64) or pass {what}.to({self._fm.dtype})"
            )

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
            X: ``batch_shape x q x d``. A 2-d ``q x d`` X is ONE t-batch of q points (their
                joint covariance, as for BoTorch's GPs; laplace-bayesopt's ``LaplaceBoTorch``
                reads it as q t-batches of one point): for q separate predictions pass
                ``X.unsqueeze(-2)`` (``q x 1 x d``). Means and marginal variances are the same
                either way; the joint covariance (and so joint samples) differs.
            output_indices: outputs to compute (default all ``num_outputs``).
            observation_noise: ``False``: the latent function (unless the model was built with
                ``observation_noise=True``); ``True``: add the noise σ² to every point's
                variance; a tensor ``batch_shape x q x m`` of noise variances to add (in the
                outcome-transformed space), broadcast against the points.
            posterior_transform: applied last (e.g. a scalarization of several outputs).
            **kwargs: accepted for BoTorch's ``Model.posterior`` interface and ignored.

        Returns:
            A :class:`GPyTorchPosterior` (or what the outcome and posterior transforms make of
            it), mean ``broadcast(batch_shape, model.batch_shape) x q x m``.
        """
        self.eval()
        self._check_inputs(X)
        if observation_noise is False and self.observation_noise:
            observation_noise = True
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
        cond = self._conditioning
        if cond is None:
            q, d, s = X.shape[-2], X.shape[-1], len(selection)
            batch = X.shape[:-2]
            f, cov = self._joint(X.reshape(-1, d), q, selection)
            if selection != self._all:
                f = f[:, list(selection)]
            return f.reshape(*batch, q, s), cov.reshape(*batch, q * s, q * s)
        try:
            torch.broadcast_shapes(X.shape[:-2], cond.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"X's batch shape {tuple(X.shape[:-2])} does not broadcast with the model's "
                f"batch shape {tuple(cond.batch_shape)} (it is conditioned on batches of "
                "observations)"
            ) from None
        if cond.shared:
            return self._latent_shared(X, selection)
        return self._latent_batched(X, selection)

    def _latent_shared(self, X: Tensor, selection: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The moments conditioned on one set of points, ``(mean, covariance)``.

        They are ``f + W C^{-1} r`` and ``K_XX - W C^{-1} W^T`` with ``W = J(X) S J_n^T`` from
        ``n m`` Jacobian-vector products.
        """
        q, d, s = X.shape[-2], X.shape[-1], len(selection)
        batch = X.shape[:-2]
        flat = X.reshape(-1, d)
        up = self._update()
        f, K = self._joint(flat, q, selection)
        _, W = batched_jvp(
            self._fm,
            flat,
            up.rows,
            differentiable=self._differentiable(flat) or up.rows.requires_grad,
            memory_budget=self._engine["memory_budget"],
        )  # (r, N, m)
        if selection != self._all:
            f, W = f[:, list(selection)], W[..., list(selection)]
        r = W.shape[0]
        W = W.reshape(r, -1, q * s).permute(1, 2, 0)  # (B, q s, r)
        V = torch.linalg.solve_triangular(up.chol, W.transpose(-1, -2), upper=False)
        cov = (K - V.transpose(-1, -2) @ V).reshape(*batch, q * s, q * s)
        shift = W.reshape(*batch, q * s, r) @ up.alpha  # (*out, q s, 1)
        out = shift.shape[:-2]
        mean = f.reshape(*batch, q, s) + shift.reshape(*out, q, s)
        return mean, cov.expand(*out, q * s, q * s)

    def _latent_batched(self, X: Tensor, selection: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The moments conditioned on a batch of point sets, ``(mean, covariance)``.

        The joint covariance of each t-batch with its own conditioning points, then the Gaussian
        conditioning of both moments.
        """
        cond = self._conditioning
        q, d, s = X.shape[-2], X.shape[-1], len(selection)
        n, m = cond.X.shape[-2], self._width
        batch = torch.broadcast_shapes(X.shape[:-2], cond.X.shape[:-2])
        Z = torch.cat([X.expand(*batch, q, d), cond.X.expand(*batch, n, d)], dim=-2)
        f, K = self._joint(Z.reshape(-1, d), q + n, None)
        K = K.reshape(*batch, (q + n) * m, (q + n) * m)
        noise = cond.noise.expand(*batch, n, m).reshape(*batch, n * m)
        Knn = K[..., q * m :, q * m :] + torch.diag_embed(noise)
        L = torch.linalg.cholesky(0.5 * (Knn + Knn.transpose(-1, -2)))
        V = torch.linalg.solve_triangular(L, K[..., q * m :, : q * m], upper=False)
        cov = K[..., : q * m, : q * m] - V.transpose(-1, -2) @ V
        f = f.reshape(*batch, q + n, m)
        residual = cond.Y - f[..., q:, :]  # (*out, n, m)
        out = residual.shape[:-2]
        w = torch.linalg.solve_triangular(L, residual.reshape(*out, n * m, 1), upper=False)
        mean = f[..., :q, :] + (V.transpose(-1, -2) @ w).reshape(*out, q, m)
        picked = torch.tensor(selection, device=X.device)
        index = (torch.arange(q, device=X.device)[:, None] * m + picked).reshape(-1)
        cov = cov[..., index][..., index, :]
        mean = mean[..., list(selection)]
        return mean, cov.expand(*out, q * s, q * s)

    def _update(self) -> _Update:
        """The weight-space update of the shared conditioning set.

        Cached while the covariance and the network's parameters are unchanged and need no gradient.
        """
        cond = self._conditioning
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in self._cov_tensors)
        params = self._fm.params(True).values()  # the module's own tensors (stable ids)
        key = (self._cov.version(), tuple((id(p), p._version) for p in params))
        if not grad and self._update_cache is not None and self._update_cache[0] == key:
            return self._update_cache[1]
        with torch.set_grad_enabled(grad):
            f_n, J = jacobian(self._fm, cond.X, memory_budget=self._engine["memory_budget"])
            rows = J.reshape(-1, J.shape[-1])  # (r, P)
            U = self._cov.matmul_rows(rows)  # J_n S
            C = U @ rows.T + torch.diag(cond.noise.reshape(-1))
            chol = torch.linalg.cholesky(0.5 * (C + C.T))
            residual = (cond.Y - f_n).reshape(*cond.Y.shape[:-2], -1, 1)
            half = torch.linalg.solve_triangular(chol, residual, upper=False)
            alpha = torch.linalg.solve_triangular(chol.T, half, upper=True)
        up = _Update(U, chol, alpha)
        if not grad:
            self._update_cache = (key, up)
        return up

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
            try:
                noise = noise.expand(mean_shape)
            except RuntimeError:
                raise ValueError(
                    f"observation_noise must broadcast to the posterior's batch_shape x q x m "
                    f"= {tuple(mean_shape)}, got shape {tuple(observation_noise.shape)}"
                ) from None
            if not bool(torch.isfinite(noise).all()) or bool((noise < 0).any()):
                raise ValueError("observation_noise variances must be finite and >= 0")
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
        """``n`` fixed pathwise sample functions ``f̃_i(X) = f(X) + J(X) δ_i``.

        ``δ_i`` are drawn from the weight-space posterior (after conditioning: mean
        :attr:`weight_shift`, covariance :attr:`covariance`). The result is a callable mapping X
        (``batch_shape x q x d``) to ``n x batch_shape x q x m`` samples, the same functions at
        every call, differentiable in X (see ``pushforward.botorch.paths``).

        Args:
            n: number of sample functions.
            generator: ``torch.Generator`` (on the network's device) for the draws.

        Returns:
            A :class:`~pushforward.botorch.SamplePaths`.

        Raises:
            ValueError: the model is conditioned on a batch of observation sets (a fantasy model):
                it has no single weight posterior.
        """
        return SamplePaths(self, n, generator)

    def _noise_matrix(self, selection: tuple[int, ...], q: int, dtype: torch.dtype) -> Tensor:
        """``(q s, q s)`` diagonal matrix of the noise variances of ``selection`` at q points.

        Kept per shape while the noise buffer is unchanged.
        """
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
        """The model over outputs ``idcs`` (of this model's outputs).

        Conditioning keeps using every output of the conditioning points (the marginal of the
        conditioned model).
        """
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
        new._update_cache = None
        return new

    # -- saving and loading ------------------------------------------------------------------
    @property
    def layout(self) -> ParamLayout:
        """The layout of the parameters the posterior is over (recorded when saved)."""
        return self._fm.layout

    def _to_state(self) -> dict[str, Any]:
        """The model's state: everything but the network's code.

        The weights θ* (checked at loading), the covariance, noise, options, output selection,
        conditioning and transforms.
        """
        cond = self._conditioning
        conditioning = None
        if cond is not None:
            conditioning = {
                "X": cond.X,
                "Y": cond.Y,
                "noise": cond.noise,
                "batch_shape": list(cond.batch_shape),
            }
        return {
            "weights": self._fm.params(False),
            "covariance": self._cov,
            "noise": self.noise,
            "observation_noise": self.observation_noise,
            "likelihood": self.likelihood,
            "num_outputs": self._width,
            "selection": list(self._selection),
            "strategy": self._engine["strategy"],
            "memory_budget": self._engine["memory_budget"],
            "conditioning": conditioning,
            "outcome_transform": _transform_state(getattr(self, "outcome_transform", None)),
            "input_transform": _transform_state(getattr(self, "input_transform", None)),
        }

    @classmethod
    def _from_state(
        cls, state: dict[str, Any], model: nn.Module | FunctionalModel | None = None
    ) -> PushforwardModel:
        """The model of ``state`` on ``model``, the network with the weights it was saved with.

        Raises:
            ValueError: ``model`` is missing, or a parameter's values differ from the saved ones
                (naming the first).
        """
        if model is None:
            raise ValueError(
                "loading a PushforwardModel needs its network: pass model=... (the nn.Module, "
                "or the FunctionalModel selecting the parameters, with the fitted weights)"
            )
        fm = model if isinstance(model, FunctionalModel) else FunctionalModel(model)
        new = cls(
            fm,
            state["covariance"],
            noise=state["noise"],
            observation_noise=state["observation_noise"],
            likelihood=state["likelihood"],
            outcome_transform=_transform_from_state(state["outcome_transform"]),
            input_transform=_transform_from_state(state["input_transform"]),
            num_outputs=state["num_outputs"],
            strategy=state["strategy"],
            memory_budget=state["memory_budget"],
        )
        new._restore(state)
        return new

    def _restore(self, state: dict[str, Any]) -> None:
        """Take the posterior of ``state`` (saved for this network: weights checked)."""
        _check_weights(self._fm, state["weights"])
        selection = tuple(int(i) for i in state["selection"])
        if int(state["num_outputs"]) != self._width or any(
            i < 0 or i >= self._width for i in selection
        ):
            raise ValueError(
                f"the saved model has {state['num_outputs']} outputs (selected {list(selection)}),"
                f" this one {self._width}"
            )
        cond = state["conditioning"]
        self._set_covariance(state["covariance"].bind(self._fm.layout))
        self._selection = selection
        self._conditioning = None
        if cond is not None:
            self._conditioning = _Conditioning(
                cond["X"], cond["Y"], cond["noise"], torch.Size(cond["batch_shape"])
            )
        self._update_cache = None
        self._noise_matrices = {}
        self.observation_noise = bool(state["observation_noise"])

    def get_extra_state(self) -> dict[str, Any]:
        """What ``state_dict()`` carries besides the noise and the transforms' buffers.

        It is the whole saved model (:func:`pushforward.persistence.to_state`), so that
        ``load_state_dict`` restores the posterior exactly or refuses.
        """
        return to_state(self)

    def set_extra_state(self, state: Any) -> None:
        """Restore the posterior of a ``state_dict()``.

        This model's network must hold the weights it was saved with, and the same parameter names
        and shapes.

        Raises:
            ValueError: the weights, names, shapes or outputs differ, or the state is not a model's.
        """
        restored = from_state(state, model=self._fm)
        if not isinstance(restored, PushforwardModel):
            raise ValueError(f"the state holds a {type(restored).__name__}, not a model")
        self._restore(restored._to_state())

    # -- conditioning ----------------------------------------------------------------------
    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> PushforwardModel:
        """The model conditioned on observations ``(X, Y)``.

        Exact Gaussian-process conditioning of the linearized network, mean and covariance (module
        docstring).

        Args:
            X: ``batch_shape x n' x d`` inputs (before the input transform).
            Y: ``batch_shape' x n' x m`` observed values (before the outcome transform, which
                is applied to them). ``batch_shape'`` may add leading dimensions (fantasies):
                the new model's batch shape is ``broadcast(batch_shape', batch_shape)``.
            noise: noise variances of the observations, broadcastable to
                ``batch_shape x n' x m`` (in the outcome-transformed space); default the
                model's ``noise``.
            **kwargs: BoTorch's interface passes none; any given raise ``TypeError``.

        Returns:
            A new :class:`PushforwardModel`; this one is unchanged. Conditioning a conditioned
            model again equals conditioning this one on all the observations at once.

        Raises:
            TypeError: unexpected keyword arguments, or ``Y`` not a tensor.
            ValueError: a model with selected outputs (condition the full model, then subset), ``Y``
                of the wrong shape, non-finite ``X`` or ``Y``, no noise, or noise variances that do
                not broadcast or are not finite and positive.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self.eval()
        if self.num_outputs != self._width:
            raise ValueError(
                "condition the full model and subset its outputs afterwards (observations of "
                "a subset of the network's outputs are not supported)"
            )
        self._check_inputs(X)
        if not isinstance(Y, Tensor):
            raise TypeError(f"Y must be a tensor, got {type(Y).__name__}")
        if Y.dim() < 2 or Y.shape[-1] != self.num_outputs or Y.shape[-2] != X.shape[-2]:
            raise ValueError(
                f"Y must have shape batch_shape' x n' x m = ... x {X.shape[-2]} x "
                f"{self.num_outputs}, got {tuple(Y.shape)}"
            )
        for name, t in (("X", X), ("Y", Y)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"cannot condition on non-finite {name} (NaN or inf entries)")
        X_tf = self.transform_inputs(X)
        Y_tf = Y.to(X_tf)
        if hasattr(self, "outcome_transform"):
            Y_tf, _ = self.outcome_transform(Y_tf, X=X_tf)
        n, m, d = X_tf.shape[-2], self._width, X_tf.shape[-1]
        if noise is None and self.noise is None:
            raise ValueError(
                "conditioning needs the observation noise: pass noise=... here or to the model"
            )
        variances = (self.noise if noise is None else torch.as_tensor(noise)).to(X_tf)
        try:
            cbatch = torch.broadcast_shapes(X_tf.shape[:-2], variances.shape[:-2])
            variances = variances.expand(*cbatch, n, m)
        except RuntimeError:
            raise ValueError(
                f"noise must broadcast to X's batch_shape x n' x m = "
                f"{(*X_tf.shape[:-1], m)}, got {tuple(variances.shape)}"
            ) from None
        if not bool(torch.isfinite(variances).all()) or bool((variances <= 0).any()):
            raise ValueError(
                "observation noise variances must be finite and positive to condition on"
            )
        X_tf = X_tf.expand(*cbatch, n, d)
        old = self._conditioning
        if old is not None:
            cbatch = torch.broadcast_shapes(old.X.shape[:-2], cbatch)
            ybatch = torch.broadcast_shapes(old.Y.shape[:-2], Y_tf.shape[:-2])
            k = old.X.shape[-2]
            X_tf = torch.cat([old.X.expand(*cbatch, k, d), X_tf.expand(*cbatch, n, d)], -2)
            variances = torch.cat(
                [old.noise.expand(*cbatch, k, m), variances.expand(*cbatch, n, m)], -2
            )
            Y_tf = torch.cat([old.Y.expand(*ybatch, k, m), Y_tf.expand(*ybatch, n, m)], -2)
        batch = torch.broadcast_shapes(Y_tf.shape[:-2], cbatch)
        new = self._copy()
        new._conditioning = _Conditioning(X_tf.detach(), Y_tf.detach(), variances.detach(), batch)
        return new


# -- helpers -----------------------------------------------------------------------------------
def _unwrap_laplace_botorch(la: Any) -> tuple[Any, dict[str, Any]]:
    """Unwrap a laplace-bayesopt ``LaplaceBoTorch``: ``(laplace approximation, defaults)``.

    A ``LaplaceBoTorch`` gives its ``bnn`` and, as defaults, its transforms and its noise in every
    posterior; anything else is returned with no defaults.
    """
    if not (isinstance(la, Model) and hasattr(la, "bnn")):
        return la, {}
    if la.bnn is None:
        raise ValueError("the LaplaceBoTorch has no fitted Laplace approximation (bnn is None)")
    defaults: dict[str, Any] = {"observation_noise": True}
    for name in ("outcome_transform", "input_transform"):
        if hasattr(la, name):
            defaults[name] = copy.deepcopy(getattr(la, name))
    return la.bnn, defaults


def _check_weights(fm: FunctionalModel, saved: dict[str, Tensor]) -> None:
    """The network's selected parameters must hold the saved values θ* exactly."""
    params = fm.params(False)
    if list(saved) != list(params):
        raise ValueError(
            f"the saved model is over parameters {list(saved)}, the network selects {list(params)}"
        )
    for name, p in params.items():
        value = saved[name]
        if value.shape != p.shape or not torch.equal(value.to(p), p):
            diff = (
                "another shape"
                if value.shape != p.shape
                else f"max |difference| {(value.to(p) - p).abs().max().item():.3g}"
            )
            raise ValueError(
                f"the network's parameter {name!r} differs from the weights the posterior "
                f"was fitted at ({diff}): load the network's fitted weights before the model"
            )


_TRANSFORMS = ("Standardize", "Normalize")


def _transform_state(tf: nn.Module | None) -> dict[str, Any] | None:
    """A BoTorch ``Standardize`` or ``Normalize`` as its arguments and buffers."""
    if tf is None:
        return None
    kind = type(tf).__name__
    if kind not in _TRANSFORMS or type(tf).__module__.split(".")[0] != "botorch":
        raise TypeError(
            f"cannot save a model with a {type(tf).__qualname__} transform: saving supports "
            f"BoTorch's {' and '.join(_TRANSFORMS)}; save the model without it and set it "
            "again after loading (model.outcome_transform = ... / model.input_transform = ...)"
        )
    if kind == "Standardize":
        args = {
            "m": tf._m,
            "outputs": tf._outputs,
            "batch_shape": list(tf._batch_shape),
            "min_stdv": tf._min_stdv,
        }
    else:
        indices = getattr(tf, "indices", None)
        args = {
            "d": tf._d,
            "indices": None if indices is None else indices.tolist(),
            "batch_shape": list(tf.batch_shape),
            "transform_on_train": tf.transform_on_train,
            "transform_on_eval": tf.transform_on_eval,
            "transform_on_fantasize": tf.transform_on_fantasize,
            "reverse": tf.reverse,
            "min_range": tf.min_range,
            "learn_bounds": tf._learn_coefficients,
            "center": tf.center,
        }
    return {"class": kind, "args": args, "buffers": dict(tf.state_dict())}


def _transform_from_state(state: dict[str, Any] | None) -> nn.Module | None:
    if state is None:
        return None
    from botorch.models.transforms.input import Normalize
    from botorch.models.transforms.outcome import Standardize

    kind, args = state["class"], dict(state["args"])
    if kind not in _TRANSFORMS:
        raise ValueError(f"the file holds a {kind!r} transform; known: {list(_TRANSFORMS)}")
    args["batch_shape"] = torch.Size(args["batch_shape"])
    tf = (Standardize if kind == "Standardize" else Normalize)(**args)
    tf.load_state_dict(state["buffers"], assign=True)  # the saved dtypes, not the defaults
    return tf.eval()


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
    """The Gaussian of mean ``(*batch, q, s)`` and covariance ``(*batch, q s, q s)``.

    A ``MultivariateNormal`` for one output, else an interleaved ``MultitaskMultivariateNormal``;
    the covariance is lazy, so a singular one (repeated points, no noise) is factored only when
    sampled.
    """
    covariance = DenseLinearOperator(cov)
    if mean.shape[-1] == 1:
        return MultivariateNormal(mean.squeeze(-1), covariance)
    return MultitaskMultivariateNormal(mean, covariance, interleaved=True)
