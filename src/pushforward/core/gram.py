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

__all__ = ["gram", "rows_of"]

#: Column blocks at most, and the narrowest block worth a separate product.
_BLOCKS, _NARROWEST = 4, 64


def gram(X: Tensor) -> Tensor:
    """``X^T X`` for ``X (n, d)``: ``(d, d)``.

    Column blocks of at least 64 (at most 4 blocks) on a CPU when ``X`` needs no gradient; one
    product otherwise (on a GPU such products are bound by their launches, not their work).
    """
    d = X.shape[1]
    k = min(_BLOCKS, d // _NARROWEST)
    if k < 2 or X.requires_grad or X.device.type != "cpu":
        return X.T @ X
    edges = [round(i * d / k) for i in range(k + 1)]
    out = X.new_empty(d, d)
    for start, stop in itertools.pairwise(edges):
        block = X[:, start:stop].T @ X[:, start:]  # (stop - start, d - start)
        out[start:stop, start:] = block
        out[stop:, start:stop] = block[:, stop - start :].T
    return out


def rows_of(t: Tensor) -> Tensor:
    """The rows of ``t (..., d)`` as one ``(n, d)`` matrix, taken in the order they lie in memory.

    A Gram matrix sums over its rows in any order: rows laid out with their leading dimensions
    transposed (a batched backward's ``(r, b)`` rows viewed as ``(b, r)``) become a view rather
    than a copy.
    """
    lead = sorted(range(t.dim() - 1), key=lambda i: t.stride(i), reverse=True)
    return t.permute(*lead, t.dim() - 1).reshape(-1, t.shape[-1])
