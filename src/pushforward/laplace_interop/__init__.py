"""Interoperability with laplace-torch (imported lazily: only when a function here is called)."""

from pushforward.laplace_interop.convert import from_laplace

__all__ = ["from_laplace"]
