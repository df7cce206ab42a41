"""The library's exceptions and warnings, in one place."""

from __future__ import annotations

__all__ = [
    "BatchCouplingError",
    "DerivativeOverflowError",
    "InconsistentDerivativesError",
    "MemoryBudgetError",
    "PushforwardFallbackWarning",
]


class BatchCouplingError(ValueError):
    """The model's output for one example depends on the batch or on random draws.

    The outputs for one example change with the other examples of the batch, or between two
    identical calls: per-example Jacobians are not defined.
    """


class DerivativeOverflowError(RuntimeError):
    """A half-precision model's derivatives left its dtype's range while its outputs did not.

    Raised by ``pushforward.core.precision``'s checks (typically a float16 model, whose range ends
    at 65,504); a plan falls through to its next strategy first, and the error reaches the caller
    only when no strategy is left (or one was forced with ``strategy=``).
    """


class InconsistentDerivativesError(ValueError):
    """PyTorch's forward and reverse modes give the model different derivatives.

    Typically the model's forward computes something from the posterior parameters inside
    ``torch.no_grad()``, which reverse mode treats as a constant and forward mode
    (``torch.func.jvp``) differentiates through; strategies using different modes would give
    different answers (see ``pushforward.core.derivatives``).
    """


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
