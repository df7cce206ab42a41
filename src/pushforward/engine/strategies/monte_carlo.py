"""``monte_carlo``: estimate the diagonal variance from linearized function samples.

Each sample perturbs every output by ``w = J L z`` (``z ~ N(0, I_r)``, one JVP for the whole
batch), and ``E[w^2] = diag(J S J^T)`` exactly, since the mean (zero) is known. Averaging ``w^2``
over n samples is an unbiased estimate whose standard error, ``sd(w^2) / sqrt(n)``, is reported
alongside (about ``var * sqrt(2 / n)`` for a Gaussian ``w``). Cost: n forward-mode passes,
whatever K and whatever the covariance's structure; memory: one chunk of samples plus running
moments, never ``n x B x K``. Not exact, so ``auto`` never picks it: ask for it by name.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from pushforward.core.precision import upcast
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import (
    Estimate,
    NotApplicable,
    Strategy,
    SubPlanner,
    traffic,
)
from pushforward.products.perturbations import perturbation_chunks, sample_bytes

__all__ = ["DEFAULT_SAMPLES", "MonteCarloStrategy", "RunningMoments"]

#: Samples drawn when the problem does not say (``n_samples=None``).
DEFAULT_SAMPLES = 100


class RunningMoments:
    """Mean and sum of squared deviations over dim 0, merged chunk by chunk.

    Chan et al.'s pairwise update: stable where ``E[y^2] - E[y]^2`` would cancel.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, values: Tensor) -> None:
        """Fold in ``values`` of shape ``(c, ...)`` (c observations)."""
        c = values.shape[0]
        mean = values.mean(0)
        m2 = (values - mean).square().sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean, m2
        else:
            n = self.count + c
            delta = mean - self.mean
            self.mean = self.mean + delta * (c / n)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * c / n)
        self.count += c

    def stderr(self) -> Tensor:
        """Standard error of the mean: ``sqrt(s^2 / n)`` with the unbiased sample variance.

        It is infinite from a single observation.

        Raises:
            ValueError: no observations were added.
        """
        if self.m2 is None:
            raise ValueError("no observations")
        if self.count < 2:
            return torch.full_like(self.m2, float("inf"))
        return (self.m2 / ((self.count - 1) * self.count)).sqrt()


class MonteCarloStrategy(Strategy):
    """Estimate the diagonal variance from the squares of pushed samples ``J L z_i`` (not exact)."""

    name = "monte_carlo"
    exact = False

    @staticmethod
    def samples(problem: Problem) -> int:
        """The number of samples to draw: the problem's ``n_samples`` or :data:`DEFAULT_SAMPLES`."""
        return DEFAULT_SAMPLES if problem.n_samples is None else problem.n_samples

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """Cost and memory of one JVP per sample, chunked; only for ``kind="variance"``.

        The chunk size is the number of samples pushed at once for the whole batch. Raises
        :class:`NotApplicable` for a covariance.
        """
        p = problem
        if p.kind != "variance":
            raise NotApplicable(
                "Monte Carlo estimates only the diagonal variance (functional_variance); for "
                "sample covariances use functional_samples"
            )
        n = self.samples(p)
        # running mean and squared deviations, the chunk's statistics, and f
        held = 4 * p.result_bytes() + p.outputs_bytes()
        per = sample_bytes(p.cost, p.B, p.cov)
        chunk = p.budget.chunk(per, held, at_most=n)
        memory = p.budget.peak(held, chunk, per)
        flops = n * (
            3 * p.cost.forward_flops * p.B + p.cov.sqrt_flops() + traffic() * p.cov.sqrt_cols
        )
        flops += n * p.B * p.rows_per_sample * 4
        return Estimate(
            self.name, flops, memory, chunk, f"{n:,} JVPs (random draws, not exact)", exact=False
        )

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, var, stderr)``: the estimated variance and its standard error.

        ``var`` and ``stderr`` are in canonical layout ``(B, T, S)``.
        """
        p = problem
        moments = RunningMoments()
        f = None
        for chunk_f, W in self.chunks(p, estimate):
            f = chunk_f
            moments.add(upcast(p.select(W), p.compute_dtype).square())
        return f, moments.mean, moments.stderr()

    def chunks(self, problem: Problem, estimate: Estimate) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(f, W)`` chunk by chunk: the outputs and the chunk's perturbations.

        ``W (c, B, T, K)`` holds the perturbations ``J L z_i`` (``n_samples`` in all,
        ``estimate.chunk_size`` at a time).
        """
        p = problem
        for f, W in perturbation_chunks(
            p.fm,
            p.fm.params(p.differentiable),
            p.inputs,
            p.cov,
            self.samples(p),
            estimate.chunk_size,
            p.generator,
            p.progress,
        ):
            yield f, W.reshape(W.shape[0], p.B, p.T, p.K)
