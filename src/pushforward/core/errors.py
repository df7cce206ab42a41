"""The library's exceptions and warnings, in one place."""

from __future__ import annotations

__all__ = [
    "BatchCouplingError",
    "DerivativeOverflowError",
    "MemoryBudgetError",
    "PushforwardFallbackWarning",
]


class BatchCouplingError(ValueError):
    """The model's outputs for one example depend on the other examples of the batch, or on
    random draws: per-example Jacobians are not defined."""


class DerivativeOverflowError(RuntimeError):
    """A half-precision model's derivatives left its dtype's range while its outputs did not
    (``pushforward.core.precision``); a plan falls through to its next strategy first."""


class MemoryBudgetError(ValueError):
    """No way to compute what was asked fits the memory budget.

    Attributes:
        budget: the budget in bytes.
        need: the bytes the smallest plan needs.
    """

    def __init__(self, message: str, budget: int, need: int) -> None:
        super().__init__(message)
        self.budget, self.need = budget, need


class PushforwardFallbackWarning(UserWarning):
    """A faster method could not run the model and a slower, exact one was used instead."""
