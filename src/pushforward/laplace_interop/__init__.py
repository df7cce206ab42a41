"""Interoperability with laplace-torch (imported lazily: only when a function here is called).

:class:`PushforwardGGN` and :class:`PushforwardEF` (laplace-torch curvature backends) subclass
laplace-torch's classes, so their module is imported on first access.
"""

from typing import Any

from pushforward.laplace_interop.convert import from_laplace

__all__ = ["PushforwardEF", "PushforwardGGN", "from_laplace"]

_BACKENDS = ("PushforwardEF", "PushforwardGGN")


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        from pushforward.laplace_interop import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
