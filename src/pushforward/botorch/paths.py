"""Pathwise samples of a :class:`~pushforward.botorch.PushforwardModel`: fixed sample functions.

A weight-space draw ``θ* + L z_i`` (``L L^T = S``) pushed through the linearized network is one
sample *function* ``f̃_i(X) = f(X; θ*) + J(X) L z_i`` (after conditioning on observations the
draws come from the conditioned weight posterior, mean shift included, so the sample functions
are those of the conditioned Gaussian process): the draws are made once, so the same
function is evaluated at every call (every step of an L-BFGS run), jointly across all points
of all calls, and differentiably in X (one Jacobian-vector product per sample for the whole
batch, :func:`pushforward.products.jvp.push_tangents`).

:class:`SamplePaths` holds the draws; :class:`PathwiseSampler` hands them to BoTorch's MC
acquisition functions (``qLogExpectedImprovement(model, best_f, sampler=PathwiseSampler(...))``)
in place of base samples of each t-batch's q x q covariance.
"""

from __future__ import annotations

import torch
from botorch.models.model import Model
from botorch.posteriors import Posterior
from botorch.sampling.base import MCSampler
from torch import Tensor

from pushforward.core.chunking import spans
from pushforward.core.cost import measure_cost
from pushforward.core.options import Options, check_generator, check_positive_int
from pushforward.covariance.binding import bind_covariance
from pushforward.products.jvp import push_tangents
from pushforward.products.perturbations import draw_perturbations, sample_bytes, sample_seeds

__all__ = ["PathwiseSampler", "SamplePaths"]


class SamplePaths:
    """``n`` fixed sample functions of a model: ``paths(X)`` is ``n x batch_shape x q x m``.

    Made by :meth:`PushforwardModel.function_samples`. Sample ``i`` is
    ``f(X) + J(X) L z_i`` with ``z_i`` drawn once from a stream seeded from ``generator`` (as
    :func:`pushforward.functional_samples` draws), mapped to the model's outcome space by its
    outcome transform. The ``n x P`` weight perturbations ``L z_i`` are kept (redrawn at each
    call only while the covariance's tensors require grad, so gradients reach them).
    """

    def __init__(self, model: Model, n: int, generator: torch.Generator | None = None) -> None:
        self.n = check_positive_int(n, "n")
        self.model = model
        if model.batch_shape:
            raise ValueError(
                f"pathwise samples need one weight-space posterior; the model has batch shape "
                f"{tuple(model.batch_shape)} (conditioned on batches of observations, e.g. a "
                f"fantasy model): use its posterior with a Monte Carlo sampler instead"
            )
        fm = model.functional_model
        check_generator(generator, fm.device)
        self._cov = bind_covariance(fm, model.covariance, fm.dtype, fm.device)
        self._seeds = sample_seeds(self.n, generator, fm.device)
        self._draws: Tensor | None = None

    def perturbations(self) -> Tensor:
        """The weight-space draws ``δ_i = L z_i``, shape ``(n, P)``.

        Plus the model's ``weight_shift`` once it is conditioned on observations.
        """
        if any(t.requires_grad for t in self._cov.tensors()) and torch.is_grad_enabled():
            return self._shifted(draw_perturbations(self._seeds, self._cov))
        if self._draws is None:
            with torch.no_grad():
                self._draws = self._shifted(draw_perturbations(self._seeds, self._cov))
        return self._draws

    def _shifted(self, draws: Tensor) -> Tensor:
        shift = self.model.weight_shift
        return draws if shift is None else draws + shift.to(draws)

    def latent(self, X: Tensor, selection: tuple[int, ...] | None = None) -> Tensor:
        """The samples of the network outputs ``selection`` (default the model's).

        Args:
            X: inputs already through the input transform, ``batch_shape x q x d``.
            selection: indices of the network's outputs (default the model's selection).

        Returns:
            ``n x batch_shape x q x s`` samples, ``s = len(selection)``.

        Raises:
            ValueError: ``X`` has fewer than 2 dimensions, or the network's outputs are not
                ``(N, num_outputs)``.
            pushforward.MemoryBudgetError: even one sample function at a time does not fit the
                model's memory budget.
        """
        model, fm = self.model, self.model.functional_model
        selection = model._selection if selection is None else selection
        if X.dim() < 2:
            raise ValueError(f"X must have shape batch_shape x q x d, got {tuple(X.shape)}")
        flat = X.reshape(-1, X.shape[-1])
        inputs = fm.prepare(flat)
        differentiable = torch.is_grad_enabled() and (
            X.requires_grad or any(t.requires_grad for t in self._cov.tensors())
        )
        options = Options(memory_budget=model._engine["memory_budget"])
        cost = measure_cost(fm, inputs)
        B = inputs.batch_size
        budget = options.budget(inputs.device)
        held = (2 * self.n + 1) * B * cost.output_bytes + self.n * self._cov.num_params * (
            self._cov.dtype.itemsize
        )
        per = sample_bytes(cost, B, self._cov)
        chunk = budget.chunk(per, held, at_most=self.n)
        budget.require(budget.peak(held, chunk, per), f"{self.n:,} sample functions at {B} points")
        draws = self.perturbations()
        with torch.set_grad_enabled(differentiable):
            inputs = inputs if differentiable else inputs.detach()
            params = fm.params(differentiable)
            parts = []
            for span in spans(self.n, chunk):
                f, JV = push_tangents(fm, params, inputs, fm.unflatten(draws[span]))
                parts.append(f + JV)
            samples = torch.cat(parts) if len(parts) > 1 else parts[0]
        if samples.dim() != 3 or samples.shape[-1] != model._width:
            raise ValueError(
                f"the network maps inputs (N, d) to outputs of shape {tuple(samples.shape[1:])}; "
                f"expected (N, num_outputs={model._width})"
            )
        samples = samples[..., list(selection)]
        return samples.reshape(self.n, *X.shape[:-1], len(selection))

    def __call__(self, X: Tensor) -> Tensor:
        """The sample functions at ``X`` (``batch_shape x q x d``, before the input transform).

        Returns:
            ``n x batch_shape x q x m`` samples in the outcome space (after the outcome transform's
            ``untransform``).
        """
        model = self.model
        model.eval()
        model._check_inputs(X)
        samples = self.latent(model.transform_inputs(X))
        if hasattr(model, "outcome_transform"):
            samples, _ = model.outcome_transform.untransform(samples)
        return samples


class PathwiseSampler(MCSampler):
    """A BoTorch sampler drawing fixed pathwise sample functions of a model.

    The model is a :class:`~pushforward.botorch.PushforwardModel`.
    ``sampler(posterior)`` evaluates the same ``sample_shape.numel()`` sample functions (drawn
    with ``seed``) at the posterior's points, whatever the t-batch shape: MC acquisition values
    are deterministic and smooth in X, consistent across calls, and joint across t-batches.
    The posterior must come from ``PushforwardModel.posterior`` (its ``pushforward_source``);
    its outcome transform, ``output_indices``, observation noise (fixed standard-normal draws
    per shape, from ``seed + 1``) and posterior transform are applied to the samples.

    Use with ``cache_root=False`` in acquisition functions that would otherwise cache a
    Cholesky factor of base samples (``qLogNoisyExpectedImprovement``).

    Args:
        sample_shape: the sample shape; ``sample_shape.numel()`` sample functions are drawn.
        seed: seed of the draws (BoTorch's default when ``None``).
    """

    def __init__(self, sample_shape: torch.Size, seed: int | None = None) -> None:
        super().__init__(sample_shape=sample_shape, seed=seed)
        self._paths: tuple[SamplePaths, ...] = ()

    def paths(self, model: Model) -> SamplePaths:
        """The sampler's sample functions of ``model`` (drawn on first use per model)."""
        if not self._paths or self._paths[0].model is not model:
            fm = model.functional_model
            generator = torch.Generator(device=fm.device).manual_seed(self.seed)
            self._paths = (SamplePaths(model, self.sample_shape.numel(), generator),)
        return self._paths[0]

    def forward(self, posterior: Posterior) -> Tensor:
        """The sample functions at the posterior's points: ``sample_shape x batch_shape x q x m``.

        Raises:
            ValueError: the posterior does not come from ``PushforwardModel.posterior``, or it
                asks for observation noise from a model without ``noise``.
        """
        source = getattr(posterior, "pushforward_source", None)
        if source is None:
            raise ValueError(
                "PathwiseSampler samples posteriors of a pushforward.botorch.PushforwardModel "
                f"(with a pushforward_source); got a {type(posterior).__name__}"
            )
        model = source.model
        local = source.output_indices
        selection = model._selection if local is None else tuple(model._selection[i] for i in local)
        samples = self.paths(model).latent(source.X, selection)
        noise = source.observation_noise
        if noise is not False:
            if isinstance(noise, Tensor):
                variance = noise.to(samples)
                if local is not None and variance.shape[-1] == model.num_outputs != len(local):
                    variance = variance[..., list(local)]
            elif model.noise is None:
                raise ValueError("observation_noise=True needs the model's noise (noise=...)")
            else:
                variance = model.noise[list(selection)].to(samples)
            gen = torch.Generator(device=samples.device).manual_seed(self.seed + 1)
            eps = torch.randn(samples.shape, generator=gen, dtype=samples.dtype)
            samples = samples + eps.to(samples.device) * variance.sqrt()
        if hasattr(model, "outcome_transform"):
            tf = model.outcome_transform
            if local is not None:
                tf = tf.subset_output(list(local))
            samples, _ = tf.untransform(samples)
        if source.posterior_transform is not None:
            samples = source.posterior_transform.evaluate(samples).unsqueeze(-1)
        return samples.reshape(*self.sample_shape, *samples.shape[1:])
