"""The shared interface of weight-space covariance operators Σ (P x P, never formed).

Every operator works on the flat parameter space of a :class:`~pushforward.FunctionalModel`
(size P, ``param_names`` order) and provides:

* ``matmul(V)`` — Σ V for ``V`` of shape ``(P,)``, ``(P, m)`` (columns) or ``(..., P)`` (rows:
  Σ applied to each row). A 2-d ``V`` whose first dimension is P is read as columns.
* ``sqrt_matmul(Z)`` — L Z for a square-root factor ``L`` (P x r) with ``L L^T = Σ``; ``Z`` of
  shape ``(r,)``, ``(r, m)`` or ``(..., r)``; ``r = sqrt_cols`` (the rank for low-rank, P for
  diagonal/Kronecker/dense).
* ``sqrt_t_matmul(V)`` — L^T V, the transpose (``(P,)``/``(P, m)``/``(..., P)`` to r).
* ``diagonal()`` — ``(P,)``; ``to_dense()`` — ``(P, P)`` (small P only).
* ``param_groups()`` — the finest partition of the parameters into groups with zero
  cross-covariance, each with an operator over that group (used by the layer-structured path).
* ``bind(layout)`` — check against a model's parameter layout (P, names, shapes) and return an
  operator whose flat order is that layout's; raises a clear error on any mismatch.
* ``block(name)`` — the covariance of one parameter tensor (an operator over
  ``layout.sub([name])``); ``marginal(index)`` — the covariance of any flat coordinates.
* ``.to(dtype/device)``.

Subclasses implement the row forms ``_matmul_rows`` (``(n, P) -> (n, P)``), ``_sqrt_rows``
(``(n, r) -> (n, P)``), ``_sqrt_t_rows`` (``(n, P) -> (n, r)``), ``diagonal`` and ``_apply``.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout

__all__ = ["CovarianceOperator", "ParamGroup", "check_finite"]


@dataclass(frozen=True)
class ParamGroup:
    """Parameters ``names`` whose covariance with every other parameter is zero, and the
    operator of their block (over ``layout.sub(names)``, i.e. in the model's flat order)."""

    names: tuple[str, ...]
    operator: CovarianceOperator


#: True while an operator derives another from its own, already validated tensors.
_TRUSTED = contextvars.ContextVar("pushforward_trusted_covariance", default=False)

#: Methods that only derive operators from validated tensors: value checks are skipped inside.
_DERIVING = ("bind", "to", "_apply", "block", "marginal", "param_groups")


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Skip value checks (finite, non-negative, symmetric) of operators built in this block."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted() -> bool:
    """Whether value checks are currently skipped (see :func:`trusted`)."""
    return _TRUSTED.get()


def _deriving(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with trusted():
            return method(*args, **kwargs)

    wrapper.__pushforward_deriving__ = True  # type: ignore[attr-defined]
    return wrapper


class CovarianceOperator(abc.ABC):
    """A symmetric positive semi-definite P x P covariance, applied without forming it."""

    #: The parameter layout this operator's flat order refers to (None: any layout of size P).
    layout: ParamLayout | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in _DERIVING:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__pushforward_deriving__", False):
                setattr(cls, name, _deriving(method))

    # -- sizes -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_params(self) -> int:
        """P."""

    @property
    @abc.abstractmethod
    def sqrt_cols(self) -> int:
        """r, the number of columns of the square-root factor used by ``sqrt_matmul``."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    # -- row forms implemented by subclasses -----------------------------------------
    @abc.abstractmethod
    def _matmul_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n, P)``: rows of ``V Σ``."""

    @abc.abstractmethod
    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        """``(n, r) -> (n, P)``: rows of ``Z L^T``."""

    def _sqrt_rows_into(self, Z: Tensor, out: Tensor) -> None:
        """``out[:] = Z L^T`` for rows ``Z (n, r)``; ``Z`` may be ``out`` itself when ``r = P``
        (subclasses may avoid the temporary)."""
        out.copy_(self._sqrt_rows(Z))

    @abc.abstractmethod
    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n, r)``: rows of ``V L``."""

    @abc.abstractmethod
    def diagonal(self) -> Tensor:
        """``(P,)``: the variances."""

    @abc.abstractmethod
    def _apply(self, fn: Callable[[Tensor], Tensor]) -> CovarianceOperator:
        """A copy with ``fn`` applied to every defining tensor (for ``.to``)."""

    # -- public products ---------------------------------------------------------------
    def matmul(self, V: Tensor) -> Tensor:
        """Σ V; see the module docstring for the accepted shapes."""
        return _dispatch(V, self.num_params, self._matmul_rows, "matmul")

    def sqrt_matmul(self, Z: Tensor) -> Tensor:
        """L Z with ``L L^T = Σ``, ``L`` of shape ``(P, sqrt_cols)``."""
        return _dispatch(Z, self.sqrt_cols, self._sqrt_rows, "sqrt_matmul")

    def sqrt_t_matmul(self, V: Tensor) -> Tensor:
        """L^T V."""
        return _dispatch(V, self.num_params, self._sqrt_t_rows, "sqrt_t_matmul")

    def quadratic_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n,)``: ``v_i^T Σ v_i`` for each row (subclasses may do it cheaper)."""
        return (V * self._matmul_rows(V)).sum(-1)

    def matmul_flops(self) -> float:
        """Estimated floating-point operations of ``Σ v`` for one vector (used by the planner;
        subclasses with structure override it)."""
        return 2.0 * self.num_params * self.num_params

    def sqrt_flops(self) -> float:
        """Estimated floating-point operations of ``L z`` (or ``L^T v``) for one vector."""
        return 2.0 * self.num_params * self.sqrt_cols

    def to_dense(self) -> Tensor:
        """The P x P matrix (small P only)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self._matmul_rows(eye)

    def sqrt_dense(self) -> Tensor:
        """The P x r square-root factor L (small P only)."""
        eye = torch.eye(self.sqrt_cols, dtype=self.dtype, device=self.device)
        return self._sqrt_rows(eye).T

    @_deriving
    def to(self, *args, **kwargs) -> CovarianceOperator:
        """Move/cast every defining tensor, like ``Tensor.to``."""
        return self._apply(lambda t: t.to(*args, **kwargs))

    # -- structure -----------------------------------------------------------------------
    @_deriving
    def bind(self, layout: ParamLayout) -> CovarianceOperator:
        """This operator checked against ``layout`` (in ``layout``'s flat order).

        The default accepts any layout with the same P and records it.
        """
        if self.num_params != layout.num_params:
            raise ValueError(
                f"{type(self).__name__} has size P={self.num_params}, but the model's selected "
                f"parameters have P={layout.num_params} ({len(layout.names)} tensors)"
            )
        if self.layout == layout:
            return self
        bound = self._apply(lambda t: t)
        bound.layout = layout
        return bound

    @_deriving
    def param_groups(self) -> list[ParamGroup]:
        """Finest known partition into uncorrelated parameter groups (default: one group).

        Requires a bound layout (see :meth:`bind`).
        """
        layout = self._require_layout()
        return [ParamGroup(layout.names, self)]

    @_deriving
    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The covariance of the flat coordinates ``index`` (a 1-d integer tensor of size n):
        the n x n operator ``S Σ S^T`` for the row selector ``S``, unbound.

        The default keeps this operator and selects coordinates around each product (exact;
        ``sqrt_cols`` unchanged); subclasses return a smaller operator where they can.
        """
        from pushforward.covariance.marginal import Marginal

        return Marginal(self, index)

    @_deriving
    def block(self, name: str) -> CovarianceOperator:
        """The covariance of parameter ``name`` alone, bound to ``layout.sub([name])``.

        Requires a bound layout; the layer-structured path uses it for one weight's block.
        """
        layout = self._require_layout()
        if name not in layout.shapes:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(layout.names)}")
        return self.marginal(layout.index([name])).bind(layout.sub([name]))

    def _require_layout(self) -> ParamLayout:
        if self.layout is None:
            raise ValueError(
                f"{type(self).__name__} is not bound to a model's parameter layout; call "
                "cov.bind(functional_model.layout) first"
            )
        return self.layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.num_params}, sqrt_cols={self.sqrt_cols}, dtype={self.dtype})"


def _dispatch(V: Tensor, size: int, rows_fn: Callable[[Tensor], Tensor], what: str) -> Tensor:
    if not isinstance(V, Tensor):
        raise TypeError(f"{what} expects a tensor, got {type(V).__name__}")
    if V.dim() == 1:
        if V.shape[0] != size:
            raise ValueError(f"{what}: expected a vector of size {size}, got {tuple(V.shape)}")
        return rows_fn(V.unsqueeze(0)).squeeze(0)
    if V.dim() == 2 and V.shape[0] == size:
        return rows_fn(V.T).T
    if V.shape[-1] != size:
        raise ValueError(
            f"{what}: expected shape ({size},), ({size}, m) or (..., {size}); got {tuple(V.shape)}"
        )
    lead = V.shape[:-1]
    out = rows_fn(V.reshape(-1, size))
    return out.reshape(*lead, out.shape[-1])


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``t`` has NaN or infinite entries."""
    if is_trusted():
        return
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} has {bad} non-finite entries (NaN or inf)")
