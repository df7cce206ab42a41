"""Output directions: which cotangent rows ``u_br`` a pass takes back through the model.

A pass over a chunk of examples computes, per example ``b`` and direction ``r``, the layer
output gradients ``G = J_z^T u_br`` (and the generic parameters' rows ``J_θ^T u_br``). What the
directions are is the caller's business:

* :class:`OneHotRows` — unit vectors at chosen output positions (a functional variance's rows
  ``e_k``: one per asked-for output);
* :class:`GivenRows` — cotangents computed beforehand (laplace-torch's sampled gradients);
* the curvature's likelihood rows (``pushforward.curvature.directions``) — rows of a factor
  of the loss Hessian, sampled gradients or the loss gradient, which depend on the outputs ``f``
  of the pass itself.

A :class:`Directions` gives, for a chunk, its per-example tensors (sliced and ``vmap``-ped along
with the examples) and turns a chunk's outputs into its cotangent rows, batched over a leading
example dimension, so that one implementation serves every rung of the producer
(``pushforward.layers.pieces``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk

__all__ = [
    "Directions",
    "GivenRows",
    "OneHot",
    "OneHotRows",
    "RowSquares",
    "add_row_squares",
    "dense",
]


class OneHot:
    """One-hot directions ``(b, r, *z_n)`` given by the flat index of each direction's 1.

    Attributes:
        index: ``(b, r)`` long, flat positions in one example's output.
        shape: the dense shape ``(b, r, *z_n)``.
        dtype: the dense dtype.
    """

    __slots__ = ("dtype", "index", "shape")

    def __init__(self, index: Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        self.index, self.shape, self.dtype = index, torch.Size(shape), dtype

    def dense(self) -> Tensor:
        """The directions as a dense tensor of shape ``shape``, ``(b, r, *z_n)``."""
        b, r = self.index.shape
        out = torch.zeros(b, r, self.shape[2:].numel(), dtype=self.dtype, device=self.index.device)
        return out.scatter_(2, self.index.unsqueeze(-1), 1).reshape(self.shape)


def dense(G: Tensor | OneHot) -> Tensor:
    """``G`` as a dense tensor."""
    return G.dense() if isinstance(G, OneHot) else G


class RowSquares:
    """Directions ``(b, r, *z_n)`` reduced to the sums of their squares over the rows.

    What a pass whose consumer needs nothing else of a layer call's directions (a curvature's
    diagonal, for a layer that applies its weight once per example) gets from the rungs that
    take the rows back by hand: the sums are formed a group of examples at a time as the rows go
    back, so no layer's directions for every row are alive at once.

    Attributes:
        values: ``(b, *z_n)``, ``sum_r G[:, r]^2``.
    """

    __slots__ = ("values",)

    def __init__(self, values: Tensor) -> None:
        self.values = values


#: Up to this many rows, their squares are added one row at a time (no squared copy of all rows).
_FEW_ROWS = 32
#: Rows of at most this many bytes are squared and summed at once whatever their number (the copy
#: is small; two operations instead of one per row).
_SMALL_BYTES = 128 * 2**10


def add_row_squares(G: Tensor, total: Tensor | None = None) -> Tensor:
    """``total + sum_r G[:, r]^2`` ``(b, *z)`` from rows ``G (b, r, *z)``, in place.

    ``total=None`` starts a new sum. Up to :data:`_FEW_ROWS` rows of more than
    :data:`_SMALL_BYTES` in all, one row at a time into the sum (no squared copy: the pass's peak
    memory is the rows themselves); else squared and summed at once.
    """
    if G.shape[1] > _FEW_ROWS or G.numel() * G.element_size() <= _SMALL_BYTES:
        squares = G.square().sum(1)
        return squares if total is None else total.add_(squares)
    rows = G.unbind(1)  # one call for all rows' views
    if total is None:
        total, rows = rows[0].square(), rows[1:]
    for row in rows:
        total.addcmul_(row, row)
    return total


class Directions(abc.ABC):
    """The cotangent rows of a pass: ``rows`` per example (see the module docstring)."""

    #: Rows per example.
    rows: int

    @abc.abstractmethod
    def per_example(self, chunk: RowChunk) -> tuple[Tensor, ...]:
        """Tensors with a leading dimension over the chunk's examples.

        Targets, random draws, indices: already restricted to the chunk's rows where they are
        per row; they are sliced and ``vmap``-ped along with the examples.
        """

    @abc.abstractmethod
    def dense(self, f: Tensor, rows: slice, *per: Tensor) -> Tensor:
        """``(b, r, *f_b)``: the cotangent rows ``rows`` of examples with outputs ``f (b, *f_b)``.

        Args:
            f: the examples' outputs ``(b, *f_b)``.
            rows: the rows to form (the chunk's rows).
            *per: the per-example tensors, as :meth:`per_example` made them.
        """

    def index(self, *per: Tensor) -> Tensor | None:
        """``(b, r)`` flat output positions when every row is a unit vector (else ``None``).

        Such rows are never materialized where a closed form can use the index.
        """
        return None


class OneHotRows(Directions):
    """Unit rows ``e_k``: ``index(chunk) (b, r)`` gives each row's flat output position.

    Args:
        index: ``chunk -> (b, r)`` long positions in one example's output (``prod(shape)``).
        rows: rows per example.
        shape: one example's output shape ``f_b``.
        dtype: the cotangents' dtype.
    """

    def __init__(
        self, index: Callable[[RowChunk], Tensor], rows: int, shape: torch.Size, dtype: torch.dtype
    ) -> None:
        self._index, self.rows, self.shape, self.dtype = index, rows, torch.Size(shape), dtype

    def per_example(self, chunk: RowChunk) -> tuple[Tensor, ...]:
        """``(index,)``: the chunk's flat output positions ``(b, r)``."""
        return (self._index(chunk),)

    def dense(self, f: Tensor, rows: slice, *per: Tensor) -> Tensor:
        """The unit rows ``(b, r, *f_b)`` at the positions ``per[0]`` (``f``, ``rows`` unused)."""
        (index,) = per
        b, r = index.shape
        cot = torch.zeros(b, r, math.prod(self.shape), dtype=self.dtype, device=index.device)
        cot.scatter_(2, index.unsqueeze(-1), 1)
        return cot.view(b, r, *self.shape)

    def index(self, *per: Tensor) -> Tensor:
        """``(b, r)``: the rows' flat output positions, ``per[0]``."""
        return per[0]


class GivenRows(Directions):
    """Cotangents computed beforehand: ``U (B, R, *f_b)`` for the whole batch."""

    def __init__(self, U: Tensor) -> None:
        self.U, self.rows = U, U.shape[1]

    def per_example(self, chunk: RowChunk) -> tuple[Tensor, ...]:
        """``(U[chunk's examples, chunk's rows],)``: the chunk's cotangents ``(b, r, *f_b)``."""
        return (self.U[chunk.samples, chunk.rows],)

    def dense(self, f: Tensor, rows: slice, *per: Tensor) -> Tensor:
        """The given cotangents ``per[0]`` ``(b, r, *f_b)`` in the outputs' dtype."""
        return per[0].to(f.dtype)
