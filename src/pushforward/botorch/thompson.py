"""Thompson sampling in continuous spaces: maximize fixed sample functions with gradients.

Each of the q candidates of a batch maximizes (or, with ``maximize=False``, minimizes) its own
pathwise sample function
(:meth:`~pushforward.botorch.PushforwardModel.function_samples`) over the search space. The q
maximizations are run as one BoTorch ``optimize_acqf`` over q-batches: the acquisition value of
``(x_1, ..., x_q)`` is ``sum_i f̃_i(x_i)``, which separates, so the joint optimum is every
sample function's optimum (multi-start L-BFGS-B with exact gradients of the sample functions).
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.acquisition.acquisition import AcquisitionFunction
from botorch.acquisition.objective import PosteriorTransform
from botorch.optim import optimize_acqf
from botorch.utils.transforms import t_batch_mode_transform
from torch import Tensor

from pushforward.botorch.model import PushforwardModel

__all__ = ["PathwiseThompsonSampling", "thompson_candidates"]


class PathwiseThompsonSampling(AcquisitionFunction):
    """Thompson sampling as an acquisition function: a q-batch scored by q fixed sample functions.

    The value of a q-batch ``X`` (``b x q x d``) is ``sum_i f̃_i(x_i)`` (point ``i`` scored by
    sample ``i``), shape ``(b,)``.

    Args:
        model: a :class:`PushforwardModel`.
        num_samples: q, the number of sample functions (and of points per q-batch).
        generator: ``torch.Generator`` for the draws.
        posterior_transform: scalarizes a multi-output model's samples (required when it has
            several outputs).
        maximize: ``False``: the value is ``-sum_i f̃_i(x_i)`` (so that maximizing it minimizes
            the sample functions).

    Raises:
        TypeError: ``model`` is not a :class:`PushforwardModel`.
        ValueError: a model with several outputs and no ``posterior_transform``.
    """

    def __init__(
        self,
        model: PushforwardModel,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        posterior_transform: PosteriorTransform | None = None,
        maximize: bool = True,
    ) -> None:
        super().__init__(model=model)
        if not isinstance(model, PushforwardModel):
            raise TypeError(f"model must be a PushforwardModel, got {type(model).__name__}")
        if model.num_outputs != 1 and posterior_transform is None:
            raise ValueError(
                f"the model has {model.num_outputs} outputs: pass a posterior_transform that "
                "scalarizes them"
            )
        self.paths = model.function_samples(num_samples, generator=generator)
        self.posterior_transform = posterior_transform
        self.maximize = maximize

    @t_batch_mode_transform()
    def forward(self, X: Tensor) -> Tensor:
        """The value of each q-batch of ``X`` (``b x q x d``): ``(b,)``.

        Raises:
            ValueError: a q-batch does not hold exactly ``num_samples`` points.
        """
        q = self.paths.n
        if X.shape[-2] != q:
            raise ValueError(
                f"X must hold q = {q} points per batch (one per sample), got {X.shape[-2]}"
            )
        samples = self.paths(X)  # (q, b, q, m)
        if self.posterior_transform is not None:
            values = self.posterior_transform.evaluate(samples)  # (q, b, q)
        else:
            values = samples.squeeze(-1)
        value = values.diagonal(dim1=0, dim2=-1).sum(-1)
        return value if self.maximize else -value


def thompson_candidates(
    model: PushforwardModel,
    bounds: Tensor,
    q: int,
    *,
    generator: torch.Generator | None = None,
    num_restarts: int = 10,
    raw_samples: int = 512,
    posterior_transform: PosteriorTransform | None = None,
    maximize: bool = True,
    **optimize_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Thompson-sampling candidates: q points in the box ``bounds`` (``2 x d``).

    The candidates are the maximizers (with ``maximize=False`` the minimizers) of q fresh sample
    functions, found by ``optimize_acqf`` (``num_restarts`` L-BFGS-B starts chosen from
    ``raw_samples`` random q-batches; other keyword arguments are passed on).

    Args:
        model: a :class:`PushforwardModel` (one output, or several with a
            ``posterior_transform``).
        bounds: ``2 x d`` lower and upper bounds of the search box.
        q: number of candidates (and of sample functions).
        generator: ``torch.Generator`` for the sample functions' draws.
        num_restarts: L-BFGS-B starts.
        raw_samples: random q-batches the starts are chosen from.
        posterior_transform: scalarizes a multi-output model's samples.
        maximize: ``False``: minimize the sample functions instead.
        **optimize_kwargs: passed on to ``optimize_acqf``.

    Returns:
        ``(candidates (q, d), values (q,))``: each candidate and its sample function's value.
    """
    acqf = PathwiseThompsonSampling(
        model, q, generator=generator, posterior_transform=posterior_transform, maximize=maximize
    )
    candidates, _ = optimize_acqf(
        acqf,
        bounds=bounds,
        q=q,
        num_restarts=num_restarts,
        raw_samples=raw_samples,
        **optimize_kwargs,
    )
    with torch.no_grad():
        samples = acqf.paths(candidates.unsqueeze(0))  # (q, 1, q, m)
        values = (
            posterior_transform.evaluate(samples)
            if posterior_transform is not None
            else samples.squeeze(-1)
        )
    return candidates, values[:, 0].diagonal()
