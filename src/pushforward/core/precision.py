"""Mixed precision: the dtype in which variances, covariances and curvature are accumulated.

A model may compute in a half-precision dtype — a ``bfloat16`` or ``float16`` base model with
``float32`` LoRA adapters (the usual Laplace-LoRA setup), or a model that is ``bfloat16``
throughout — while sums of squares over thousands of parameters lose all their digits in a
half-precision accumulator (``bfloat16`` keeps 8 bits of mantissa). The library therefore runs
the model in its own dtypes (tangents cast to each parameter's dtype, cotangents in the output's
dtype), and takes every Jacobian product it receives — layer pieces, VJP rows, pushed tangents —
up to the *accumulation dtype* before it meets the covariance: the promotion of the output's
and the parameters' dtypes, with a half-precision result raised to ``float32``. The covariance
is bound in that dtype, and variances and covariances are returned in it (the outputs ``f`` keep
the model's dtype).

Half precision has a narrow range (``float16`` overflows above 65,504): a model whose outputs are
finite can still have derivatives that overflow in its dtype — attention masked with the dtype's
minimum is the usual case. A strategy whose results are not finite where the outputs are raises
:class:`~pushforward.DerivativeOverflowError`, and the plan falls through to its next strategy (one
whose products take another route may stay in range); when none does, the error is raised: never a
silent ``nan``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pushforward.core.errors import DerivativeOverflowError

__all__ = ["HALF", "accumulation_dtype", "check_overflow", "upcast"]

#: The half-precision floating dtypes.
HALF: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promotion of ``dtypes``, ``float32`` where that is a half-precision dtype."""
    dtype = functools.reduce(torch.promote_types, dtypes)
    return torch.float32 if dtype in HALF else dtype


def upcast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (itself when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_overflow(f: Tensor | None, result: Tensor, how: str) -> None:
    """Raise :class:`~pushforward.DerivativeOverflowError` when ``result`` overflowed.

    That is, when ``result`` has non-finite entries while the outputs ``f`` are all finite
    (``f=None``: outputs not at hand, taken as finite); ``how`` names the computation in the
    message.

    Raises:
        pushforward.DerivativeOverflowError: as above.
    """
    if bool(torch.isfinite(result).all()) or (f is not None and not bool(torch.isfinite(f).all())):
        return
    dtype = "half precision" if f is None else str(f.dtype).removeprefix("torch.")
    raise DerivativeOverflowError(
        f"derivatives overflowed {dtype} in {how}: non-finite results of finite outputs (e.g. "
        "attention masked with the dtype's minimum); bfloat16 or float32 stay in range"
    )
