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


Failure = tuple[str, BaseException]
#: ``(failures, method used, what it had to step down to inside) -> warning text``.
Message = Callable[[list[Failure], str, list[str]], str]


class Ladder:
    """Methods tried in order; the first that works is remembered on ``owner``.

    The one fallback mechanism of the library: a product stepping down from ``vmap`` to a loop,
    the producer of layer pieces stepping down its rungs and a plan falling through to its next
    strategy are all ladders.

    Args:
        key: name of this ladder (one per kind of computation, e.g. ``"forward-mode products"``).
        methods: ``(name, callable)`` pairs from fastest to most general.
        scope: what else the memory is kept per (a plan's key: one plan's failures are its own).
        message: formats the warning (default: ``"<key> via <method> (<error>) failed ...;
            used <method> instead"``).
    """

    def __init__(
        self,
        key: str,
        methods: Sequence[tuple[str, Callable[..., Any]]],
        *,
        scope: Any = None,
        message: Message | None = None,
    ) -> None:
        self.key = key
        self.methods = list(methods)
        self.message = message or self._message
        #: where ``owner`` remembers the first method that worked and why others failed:
        #: ladders of one name over different method lists remember separately
        self.state_key = (key, tuple(name for name, _ in self.methods), scope)

    def failures(self, owner: Any) -> dict[str, str]:
        """The methods that failed for ``owner``, with why."""
        return dict(owner.cache.failures.get(self.state_key, {}))

    def __call__(self, owner: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the first method that works for ``owner`` on ``args``/``kwargs``.

        ``owner`` is a FunctionalModel, whose cache remembers the method that worked. One warning,
        once a slower method has worked, names what failed and why (and what the working method
        stepped down to inside); when every method fails, the last failure is raised, chained to the
        first (no warning).
        """
        state: dict[tuple, int] = owner.cache.methods
        failed: dict[str, str] = owner.cache.failures.setdefault(self.state_key, {})
        start = state.get(self.state_key, 0)
        failures: list[Failure] = []
        for i in range(start, len(self.methods)):
            name, method = self.methods[i]
            try:
                if not failures:
                    result = method(*args, **kwargs)
                else:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", PushforwardFallbackWarning)
                        result = method(*args, **kwargs)
            except TRANSFORM_ERRORS as err:
                raise_if_random(err)
                failed[name] = f"{type(err).__name__}: {first_line(err)}"
                if i == len(self.methods) - 1:
                    if failures:
                        raise err from failures[0][1]
                    raise
                failures.append((name, err))
                continue
            state[self.state_key] = i
            if failures:
                inner = []
                for w in caught:
                    if issubclass(w.category, PushforwardFallbackWarning):
                        inner.append(str(w.message).removeprefix("pushforward: "))
                    else:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                warnings.warn(
                    self.message(failures, name, inner), PushforwardFallbackWarning, stacklevel=3
                )
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _message(self, failures: list[Failure], used: str, inner: list[str]) -> str:
        tried = "; ".join(f"via {n} ({type(e).__name__}: {first_line(e)})" for n, e in failures)
        extra = f" (inside it, {'; '.join(inner)})" if inner else ""
        return (
            f"pushforward: {self.key} {tried} failed for this model; used {used} instead "
            f"(exact, slower){extra}. This warning is shown once per model."
        )


def first_line(err: BaseException) -> str:
    """The first line of an error's message (at most 200 characters)."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
