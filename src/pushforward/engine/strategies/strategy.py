"""What every strategy provides: an estimate (cost, memory, chunking, prepared state) and a run.

Strategies are stateless: what estimating finds and running needs (the structured strategy's
split of the parameters, its sub-plan for the rest) travels in :attr:`Estimate.state`, so a plan
runs exactly what it estimated, as often as it is executed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor

from pushforward.core.settings import settings
from pushforward.core.units import format_bytes
from pushforward.engine.problem import Problem

__all__ = ["Estimate", "NotApplicable", "Strategy", "SubPlan", "SubPlanner", "traffic"]


class SubPlan(Protocol):
    """What a strategy needs of a plan for a sub-problem (the planner's ``Plan``)."""

    problem: Problem
    estimate: Estimate

    @property
    def name(self) -> str:
        """The chosen strategy's name."""
        ...

    def run_canonical(self) -> tuple[Tensor, ...]:
        """Run the sub-plan: ``(f, result, ...)`` with the results in canonical layout."""
        ...


#: Plans a sub-problem (the structured strategy's generic remainder) with the strategies not in
#: the excluded tuple; given to :meth:`Strategy.estimate` by the planner.
SubPlanner = Callable[[Problem, tuple[str, ...]], SubPlan]


def traffic() -> float:
    """FLOP-equivalents per element of a materialized parameter-sized vector.

    The current ``settings.traffic``.
    """
    return settings.current().traffic


class NotApplicable(Exception):
    """The strategy cannot compute this problem (the message says why)."""


@dataclass(frozen=True)
class Estimate:
    """A strategy's plan for one problem.

    Attributes:
        strategy: the strategy's name.
        flops: estimated work in FLOP-equivalents (memory traffic included).
        memory: estimated peak of what the computation allocates, in bytes (result included).
        chunk_size: rows, tangents or examples processed at once (meaning per strategy).
        passes: what is computed, in words (e.g. ``"2,560 VJP rows"``).
        exact: whether the result is exact (not a Monte Carlo estimate).
        alone: every example is evaluated by itself (each chunk holds one example): no other
            example's values can reach its results, so the per-call check that examples do
            not interact (:meth:`~pushforward.FunctionalModel.check_examples`) is not needed
            after a signature's first call.
        state: what the strategy prepared while estimating and uses when running.
    """

    strategy: str
    flops: float
    memory: int
    chunk_size: int
    passes: str
    exact: bool = True
    state: Any = field(default=None, compare=False, repr=False)
    alone: bool = False

    def summary(self) -> str:
        """The estimate in one line: strategy, passes, chunk size, FLOPs and memory."""
        return (
            f"{self.strategy}: {self.passes}, chunks of {self.chunk_size:,}; "
            f"est. {self.flops:.2e} FLOP, {format_bytes(self.memory)}"
        )


class Strategy(abc.ABC):
    """A way to compute functional (co)variances."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True

    @abc.abstractmethod
    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """Cost and memory for ``problem``; raises :class:`NotApplicable` with the reason."""

    @abc.abstractmethod
    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        """Compute ``(f, result)`` as estimated.

        ``f`` is in the user's output shape, ``result`` in canonical layout (see
        ``pushforward.engine.problem``). Runs under the problem's grad mode.
        """
