"""Symmetric products ``X^T X``: only the blocks on and above the diagonal are multiplied.

A Gram matrix is symmetric, and a plain ``X.T @ X`` computes both triangles. Splitting the
columns into ``k`` blocks and multiplying block row ``i`` with the columns from block ``i`` on
takes ``(k + 1) / (2 k)`` of the work; the blocks below the diagonal are the transposes of those
above. K-FAC's factors and the dense GGN's blocks are Gram matrices of activations and output
gradients.
"""

from __future__ import annotations

import itertools

from torch import Tensor

__all__ = ["add_gram", "gram", "mirror_upper", "rows_of"]

#: Column blocks at most, and the narrowest block worth a separate product.
_BLOCKS, _NARROWEST = 4, 64


def _edges(t: Tensor, d: int) -> list[int] | None:
    """The column blocks' edges for a ``(d, d)`` Gram matrix of (or accumulated into) ``t``.

    Blocks of at least 64 columns (at most 4) on a CPU when ``t`` needs no gradient; ``None``: one
    product (on a GPU such products are bound by their launches, not their work).
    """
    k = min(_BLOCKS, d // _NARROWEST)
    if k < 2 or t.requires_grad or t.device.type != "cpu":
        return None
    return [round(i * d / k) for i in range(k + 1)]


def gram(X: Tensor) -> Tensor:
    """``X^T X`` for ``X (n, d)``: ``(d, d)``, by blocks on and above the diagonal where they pay."""
    return mirror_upper(add_gram(None, X))


def add_gram(total: Tensor | None, X: Tensor, alpha: float = 1.0) -> Tensor:
    """``total + alpha X^T X`` for a running sum ``total (d, d)`` of Gram matrices.

    ``total`` ``None`` starts a sum: ``alpha X^T X`` written into fresh memory (no zeros written
    first). In place where no gradient flows. With column blocks (see :func:`gram`) only the
    blocks on and above the diagonal are added, straight into ``total``: no product is formed
    apart from it. The blocks below are then stale (uninitialized in a new sum) until
    :func:`mirror_upper` fills them, once, after the last addition.
    """
    if X.requires_grad or (total is not None and total.requires_grad):
        product = X.T @ X if alpha == 1.0 else alpha * (X.T @ X)
        return product if total is None else total + product
    d = X.shape[1]
    beta = 0.0 if total is None else 1.0  # beta = 0: the fresh memory is not read (NaN included)
    if total is None:
        total = X.new_empty(d, d)
    edges = _edges(X, d)
    if edges is None:
        return total.addmm_(X.T, X, beta=beta, alpha=alpha)
    for start, stop in itertools.pairwise(edges):
        total[start:stop, start:].addmm_(X[:, start:stop].T, X[:, start:], beta=beta, alpha=alpha)
    return total


def mirror_upper(total: Tensor) -> Tensor:
    """``total`` with the blocks below the diagonal set from those above (after :func:`add_gram`).

    Nothing to do where :func:`add_gram` added whole products (a GPU, a gradient).
    """
    edges = _edges(total, total.shape[0])
    if edges is None:
        return total
    for start, stop in itertools.pairwise(edges):
        total[stop:, start:stop] = total[start:stop, stop:].T
    return total


def rows_of(t: Tensor) -> Tensor:
    """The rows of ``t (..., d)`` as one ``(n, d)`` matrix, taken in the order they lie in memory.

    A Gram matrix sums over its rows in any order: rows laid out with their leading dimensions
    transposed (a batched backward's ``(r, b)`` rows viewed as ``(b, r)``) become a view rather
    than a copy.
    """
    lead = sorted(range(t.dim() - 1), key=lambda i: t.stride(i), reverse=True)
    return t.permute(*lead, t.dim() - 1).reshape(-1, t.shape[-1])
