"""Automatic fallbacks when a ``torch.func`` transform cannot run a model.

Some operations have no forward-mode derivative (PyTorch's fused scaled-dot-product attention
kernels, ``TransformerEncoderLayer``'s eval fast path), some cannot be batched by ``vmap``
(``.item()``, data-dependent control flow, old-style ``autograd.Function``), some in-place ops
are refused under a transform. A :class:`Ladder` tries a list of methods in order — the fast
ones first, plain autograd last — remembers per model which one worked, and warns once when it
had to step down. A failure of the last method is raised: never a silent wrong answer.

Not every error is a transform failure: ``vmap``'s refusal of a random operation means the model
draws random numbers (dropout in training mode), and stepping down to a loop would silently draw
new numbers for every example; that is raised as :class:`~pushforward.BatchCouplingError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pushforward.core.errors import BatchCouplingError, PushforwardFallbackWarning

__all__ = [
    "TRANSFORM_ERRORS",
    "Ladder",
    "PushforwardFallbackWarning",
    "first_line",
    "raise_if_random",
]

R = TypeVar("R")

#: Exceptions that mean "this transform cannot run this model" (not bad user input).
TRANSFORM_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, NotImplementedError)


def raise_if_random(err: BaseException) -> None:
    """Raise :class:`BatchCouplingError` when ``err`` is ``vmap`` refusing a random operation."""
    if "randomness" in str(err) and "vmap" in str(err):
        raise BatchCouplingError(
            "the model draws random numbers in its forward pass (dropout in training mode, a "
            "functional F.dropout(..., training=True), ...), so its Jacobian is not defined; "
            "call model.eval() or remove the random operation"
        ) from err


class Ladder:
    """Methods tried in order; the first that works is remembered on ``owner``.

    Args:
        key: name of this ladder (one per kind of computation, e.g. ``"forward"``).
        methods: ``(name, callable)`` pairs from fastest to most general.
    """

    def __init__(self, key: str, methods: Sequence[tuple[str, Callable[..., Any]]]) -> None:
        self.key = key
        self.methods = list(methods)

    def __call__(self, fm: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the first method that works for ``fm`` (a FunctionalModel, whose cache remembers
        it) on ``args``/``kwargs``. One warning, once a slower method has worked, names what
        failed and why; when every method fails, the last failure is raised (no warning)."""
        state: dict[str, int] = fm.cache.methods
        start = state.get(self.key, 0)
        failures: list[str] = []
        for i in range(start, len(self.methods)):
            name, method = self.methods[i]
            try:
                result = method(*args, **kwargs)
            except TRANSFORM_ERRORS as err:
                raise_if_random(err)
                if i == len(self.methods) - 1:
                    raise
                failures.append(f"via {name} ({type(err).__name__}: {first_line(err)})")
                continue
            state[self.key] = i
            if failures:
                warnings.warn(
                    f"pushforward: {self.key} products {'; '.join(failures)} failed for this "
                    f"model; used {name} instead (exact, slower). This warning is shown once "
                    "per model.",
                    PushforwardFallbackWarning,
                    stacklevel=3,
                )
            return result
        raise AssertionError("unreachable")  # pragma: no cover


def first_line(err: BaseException) -> str:
    """The first line of an error's message (at most 200 characters)."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
