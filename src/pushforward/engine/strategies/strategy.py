"""What every strategy provides: an estimate (cost, memory, chunking) and a run."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from pushforward.core.budget import format_bytes
from pushforward.engine.problem import Problem

__all__ = ["TRAFFIC", "Estimate", "NotApplicable", "Strategy"]

#: FLOP-equivalents charged per element of a materialized P-sized row (or tangent): such rows
#: are written, read back and contracted at memory bandwidth, far slower than matmul FLOPs.
TRAFFIC = 8.0


class NotApplicable(Exception):
    """The strategy cannot compute this problem (the message says why)."""


@dataclass(frozen=True)
class Estimate:
    """A strategy's plan for one problem.

    Attributes:
        strategy: the strategy's name.
        flops: estimated floating-point operations.
        memory: estimated peak working memory in bytes (result included).
        chunk_size: rows, tangents or examples processed at once (meaning per strategy).
        passes: what is computed, in words (e.g. ``"2,560 VJP rows"``).
        exact: whether the result is exact (not a Monte Carlo estimate).
    """

    strategy: str
    flops: float
    memory: int
    chunk_size: int
    passes: str
    exact: bool = True

    def summary(self) -> str:
        return (
            f"{self.strategy}: {self.passes}, chunks of {self.chunk_size:,}; "
            f"est. {self.flops:.2e} FLOP, {format_bytes(self.memory)}"
        )


class Strategy(abc.ABC):
    """A way to compute functional (co)variances."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True

    @abc.abstractmethod
    def estimate(self, problem: Problem) -> Estimate:
        """Cost and memory for ``problem``; raises :class:`NotApplicable` with the reason."""

    @abc.abstractmethod
    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        """``(f, result)``: ``f`` in the user's output shape, ``result`` in canonical layout
        (see :mod:`pushforward.engine.problem`)."""
