"""The shared interface of weight-space covariance operators Σ (P x P, never formed).

Every operator works on the flat parameter space of a :class:`~pushforward.FunctionalModel`
(size P, ``param_names`` order). Products come in two forms:

* **columns** (as a matrix acts): ``S.matmul(V)`` / ``S @ V`` for ``V`` of shape ``(P,)`` or
  ``(P, m)``; ``sqrt_matmul(Z)`` = L Z for ``Z`` ``(r,)``/``(r, m)`` with the square-root factor
  ``L`` (P x r, ``L L^T = Σ``, ``r = sqrt_cols``); ``sqrt_t_matmul(V)`` = L^T V;
* **rows** (one vector per row, what the engine uses): ``matmul_rows(V)`` ``(n, P) -> (n, P)``,
  also written ``V @ S`` for ``V`` of shape ``(..., P)``; ``sqrt_rows(Z)`` ``(n, r) -> (n, P)``
  (rows of ``Z L^T``); ``sqrt_t_rows(V)`` ``(n, P) -> (n, r)`` (rows of ``V L``);
  ``quadratic_rows(V)`` ``(n, P) -> (n,)`` (``v_i^T Σ v_i``).

and ``diagonal()`` ``(P,)``, ``to_dense()`` ``(P, P)`` (small P only), ``sqrt_dense()``.
Structure: ``param_groups()`` — the finest partition of the parameters into mutually
uncorrelated groups (used by the layer-structured path); ``bind(layout)`` — checked against a
model's parameter layout; ``block(name)`` / ``marginal(index)`` — the covariance of one
parameter tensor / of any flat coordinates; ``.to(dtype/device)``.

**Writing an operator.** A subclass calls ``super().__init__(num_params, sqrt_cols)`` (``None``
while the size is not known, e.g. before :meth:`bind`), implements the row hooks
``_matmul_rows``, ``_sqrt_rows``, ``_sqrt_t_rows`` and ``diagonal``, and :meth:`_fields`: its
constructor's keyword arguments. From those the base class derives ``dtype``, ``device``,
``.to(...)``, ``__repr__`` and copies: a copy is ``type(self)(**fields, check=False)``.

**Validation.** Every constructor takes ``check=True``: the defining tensors are checked
(finite, shapes, and positive semi-definite — a covariance with a clearly negative eigenvalue is
refused with its smallest eigenvalue named). ``check=False`` skips the value checks, for huge
operators whose check would cost a factorization, or when the tensors are known to be valid
(copies and restrictions of a checked operator are made so).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout

__all__ = ["CovarianceOperator", "ParamGroup"]


@dataclass(frozen=True)
class ParamGroup:
    """Parameters whose covariance with every other parameter is zero, and their block.

    Attributes:
        names: the parameter names of the group.
        operator: the covariance of their entries, over ``layout.sub(names)`` (i.e. in the
            model's flat order).
    """

    names: tuple[str, ...]
    operator: CovarianceOperator


class CovarianceOperator(abc.ABC):
    """A symmetric positive semi-definite P x P covariance, applied without forming it."""

    #: The parameter layout this operator's flat order refers to (None for any layout of size P).
    layout: ParamLayout | None = None

    def __init__(self, num_params: int | None, sqrt_cols: int | None = None) -> None:
        self._num_params = num_params
        self._sqrt_cols = num_params if sqrt_cols is None else sqrt_cols

    # -- what a subclass provides ---------------------------------------------------------
    @abc.abstractmethod
    def _fields(self) -> dict[str, Any]:
        """The constructor's keyword arguments that rebuild this operator (``check`` aside).

        Tensors, operators, mappings or sequences of them, and static values.
        """

    @abc.abstractmethod
    def _matmul_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n, P)``: rows of ``V Σ``."""

    @abc.abstractmethod
    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        """``(n, r) -> (n, P)``: rows of ``Z L^T``."""

    @abc.abstractmethod
    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n, r)``: rows of ``V L``."""

    @abc.abstractmethod
    def diagonal(self) -> Tensor:
        """``(P,)``: the variances."""

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n,)``; subclasses override it where it is cheaper."""
        return (V * self._matmul_rows(V)).sum(-1)

    # -- sizes, dtype, device: derived ----------------------------------------------------
    @property
    def num_params(self) -> int:
        """P."""
        if self._num_params is None:
            raise ValueError(self._unsized())
        return self._num_params

    @property
    def sqrt_cols(self) -> int:
        """r, the number of columns of the square-root factor used by ``sqrt_matmul``."""
        if self._sqrt_cols is None:
            raise ValueError(self._unsized())
        return self._sqrt_cols

    def _unsized(self) -> str:
        return (
            f"{type(self).__name__} has no size yet: call "
            ".bind(functional_model.layout) first (or give its size)"
        )

    def tensors(self) -> list[Tensor]:
        """The floating-point defining tensors (of this operator and those it is made of)."""
        return [
            t for t in _leaves(self._fields()) if isinstance(t, Tensor) and t.is_floating_point()
        ]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the defining tensors."""
        return self.tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the defining tensors."""
        return self.tensors()[0].device

    def version(self) -> tuple[int, ...]:
        """Identity and in-place version of every defining tensor.

        Equal versions mean equal values (used to cache work that depends on them). Operators are
        immutable (copies are new operators), so the defining tensors are listed once and only their
        in-place versions are read at each call.
        """
        tensors = self.__dict__.get("_defining_tensors")
        if tensors is None:
            tensors = self._defining_tensors = tuple(self.tensors())
        return tuple(v for t in tensors for v in (id(t), t._version))

    # -- public products ----------------------------------------------------------------
    def matmul(self, V: Tensor) -> Tensor:
        """Σ V for columns ``V`` of shape ``(P,)`` or ``(P, m)``, the result of the same shape.

        For rows use :meth:`matmul_rows` or ``V @ S``.
        """
        return _columns(V, self._num_params, self._matmul_rows, "matmul")

    __matmul__ = matmul

    def __rmatmul__(self, V: Tensor) -> Tensor:
        """``V @ S``: Σ applied to each row of ``V`` ``(..., P)`` (Σ is symmetric)."""
        if not isinstance(V, Tensor) or V.dim() < 1:
            raise TypeError("V @ S needs a tensor V of shape (..., P)")
        flat = V.reshape(-1, V.shape[-1])
        return self.matmul_rows(flat).reshape(V.shape)

    def sqrt_matmul(self, Z: Tensor) -> Tensor:
        """L Z for columns ``Z`` ``(r,)``/``(r, m)``: ``(P,)``/``(P, m)``."""
        return _columns(Z, self.sqrt_cols, self._sqrt_rows, "sqrt_matmul")

    def sqrt_t_matmul(self, V: Tensor) -> Tensor:
        """L^T V for columns ``V`` ``(P,)``/``(P, m)``: ``(r,)``/``(r, m)``."""
        return _columns(V, self._num_params, self._sqrt_t_rows, "sqrt_t_matmul")

    def matmul_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n, P)``: each row times Σ."""
        return self._matmul_rows(_rows(V, self._num_params, "matmul_rows"))

    def sqrt_rows(self, Z: Tensor) -> Tensor:
        """``(n, r) -> (n, P)``: rows of ``Z L^T`` (row ``i`` is ``L z_i``)."""
        return self._sqrt_rows(_rows(Z, self.sqrt_cols, "sqrt_rows"))

    def sqrt_rows_into(self, Z: Tensor, out: Tensor) -> None:
        """``out[:] = Z L^T`` for rows ``Z (n, r)`` into ``out (n, P)``.

        ``Z`` may be ``out`` itself when ``r = P`` (operators that can avoid the temporary do).
        """
        out.copy_(self.sqrt_rows(Z))

    def sqrt_t_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n, r)``: rows of ``V L``."""
        return self._sqrt_t_rows(_rows(V, self._num_params, "sqrt_t_rows"))

    def quadratic_rows(self, V: Tensor) -> Tensor:
        """``(n, P) -> (n,)``: ``v_i^T Σ v_i`` for each row."""
        return self._quadratic_rows(_rows(V, self._num_params, "quadratic_rows"))

    def to_dense(self) -> Tensor:
        """The P x P matrix (small P only)."""
        return self._matmul_rows(torch.eye(self.num_params, dtype=self.dtype, device=self.device))

    def sqrt_dense(self) -> Tensor:
        """The P x r square-root factor L (small P only)."""
        eye = torch.eye(self.sqrt_cols, dtype=self.dtype, device=self.device)
        return self._sqrt_rows(eye).T

    # -- costs (for the planner and the memory budget) --------------------------------------
    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector."""
        return 2.0 * self.num_params * self.num_params

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` (or ``L^T v``) for one vector."""
        return self.matmul_flops()

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of temporaries when applied to ``rows`` rows, and of what it caches for that.

        Temporaries beyond input and result, and cached pieces such as a factor; the default is one
        more ``(rows, P)`` tensor.
        """
        return rows * self.num_params * self.dtype.itemsize

    # -- copies --------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without what it derived from its tensors (cached factors).

        A copy recomputes them from its own tensors.
        """
        state = dict(self.__dict__)
        state.pop("_defining_tensors", None)
        if "_cache" in state:
            state["_cache"] = {}
        return state

    def _rebuild(self, fields: dict[str, Any]) -> CovarianceOperator:
        """An operator of this class from ``fields`` (no value checks), with this layout."""
        out = type(self)(**fields, check=False)
        out.layout = self.layout
        return out

    def _apply(
        self, fn: Callable[[Tensor], Tensor], index_fn: Callable[[Tensor], Tensor] | None = None
    ) -> CovarianceOperator:
        """A copy with ``fn`` applied to every floating-point defining tensor.

        ``index_fn`` (default: none) is applied to the integer ones (indices).
        """
        return self._rebuild(_map(self._fields(), fn, index_fn))

    def to(self, *args: Any, **kwargs: Any) -> CovarianceOperator:
        """Move/cast every defining tensor, like ``Tensor.to`` (differentiable).

        Indices move with the device and keep their integer dtype.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self._apply(
            lambda t: t.to(device=device, dtype=dtype, non_blocking=non_blocking),
            None if device is None else (lambda t: t.to(device=device)),
        )

    # -- saving (pushforward.save / pushforward.load) -------------------------------------
    def _to_state(self) -> dict[str, Any]:
        """The constructor's fields (tensors, nested operators, plain values) and the bound layout.

        What :func:`pushforward.save` writes (nested operators as their own states).
        """
        return {"fields": self._fields(), "layout": self.layout}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> CovarianceOperator:
        """The operator of a saved state, exactly as saved (its tensors are not re-checked)."""
        out = cls(**state["fields"], check=False)
        out.layout = state["layout"]
        return out

    # -- structure -----------------------------------------------------------------------
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
        bound = self._rebuild(self._fields())
        bound.layout = layout
        return bound

    def param_groups(self) -> list[ParamGroup]:
        """Finest known partition into uncorrelated parameter groups (default: one group).

        Requires a bound layout (see :meth:`bind`).
        """
        layout = self._require_layout()
        return [ParamGroup(layout.names, self)]

    @abc.abstractmethod
    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The covariance of the flat coordinates ``index`` (a 1-d integer tensor of size n).

        The n x n operator ``S Σ S^T`` for the row selector ``S``, unbound. Operators without a
        cheaper restriction return :class:`~pushforward.covariance.Marginal`.
        """

    def block(self, name: str) -> CovarianceOperator:
        """The covariance of parameter ``name`` alone, bound to ``layout.sub([name])``."""
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
        size = (
            f"P={self._num_params}, sqrt_cols={self._sqrt_cols}"
            if self._num_params is not None
            else "unbound"
        )
        tensors = self.tensors()
        dtype = f", dtype={tensors[0].dtype}" if tensors else ""
        return f"{type(self).__name__}({size}{dtype})"


# -- helpers ---------------------------------------------------------------------------------------
def _leaves(value: Any):
    """Tensors and static values in a field tree, operators expanded into their fields."""
    if isinstance(value, CovarianceOperator):
        yield from _leaves(value._fields())
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _map(
    value: Any, fn: Callable[[Tensor], Tensor], index_fn: Callable[[Tensor], Tensor] | None
) -> Any:
    """``fn`` applied to every floating-point tensor of a field tree, ``index_fn`` to the others.

    Operators are copied with ``_apply``.
    """
    if isinstance(value, Tensor):
        if value.is_floating_point():
            return fn(value)
        return value if index_fn is None else index_fn(value)
    if isinstance(value, CovarianceOperator):
        return value._apply(fn, index_fn)
    if isinstance(value, Mapping):
        return {k: _map(v, fn, index_fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn, index_fn) for v in value)
    return value


_ROW_FORMS = {"matmul": "matmul_rows", "sqrt_matmul": "sqrt_rows", "sqrt_t_matmul": "sqrt_t_rows"}


def _columns(V: Any, size: int | None, rows_fn: Callable[[Tensor], Tensor], what: str) -> Tensor:
    """A column product: ``V`` ``(size,)`` or ``(size, m)``, through the row form."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{what} expects a tensor, got {type(V).__name__}")
    if V.dim() not in (1, 2) or (size is not None and V.shape[0] != size):
        want = "P" if size is None else size
        raise ValueError(
            f"{what}: expected a vector ({want},) or columns ({want}, m), got shape "
            f"{tuple(V.shape)}; for rows use {_ROW_FORMS[what]} (or V @ S for matmul)"
        )
    if V.dim() == 1:
        return rows_fn(V.unsqueeze(0)).squeeze(0)
    return rows_fn(V.T).T


def _rows(V: Any, size: int | None, what: str) -> Tensor:
    """``V`` checked to be rows ``(n, size)``."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{what} expects a tensor, got {type(V).__name__}")
    if V.dim() != 2 or (size is not None and V.shape[1] != size):
        raise ValueError(
            f"{what}: expected rows of shape (n, {'P' if size is None else size}), got "
            f"{tuple(V.shape)}"
        )
    return V
