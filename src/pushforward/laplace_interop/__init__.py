"""Interoperability with laplace-torch (imported lazily: only when a function here is called).

:func:`from_laplace` converts a fitted Laplace approximation; :func:`glm_predictive` computes its
``la(x, pred_type="glm", ...)`` matrix-free, and :func:`accelerate` / :func:`restore` switch one
object's own ``la(x, ...)`` to it and back. :class:`PushforwardGGN` and :class:`PushforwardEF`
(laplace-torch curvature backends) subclass laplace-torch's classes, so their module is imported
on first access.
"""

from typing import Any

from pushforward.laplace_interop.convert import from_laplace
from pushforward.laplace_interop.glm import accelerate, glm_predictive, restore

__all__ = [
    "PushforwardEF",
    "PushforwardGGN",
    "accelerate",
    "from_laplace",
    "glm_predictive",
    "restore",
]

_BACKENDS = ("PushforwardEF", "PushforwardGGN")


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        from pushforward.laplace_interop import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
