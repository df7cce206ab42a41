"""The marginal covariance of a subset of coordinates of another operator."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pushforward.covariance.checks import check_index
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["Marginal"]


class Marginal(CovarianceOperator):
    """``S Σ S^T``: the coordinates ``index`` (n,) of a parent operator Σ (P x P).

    Products embed their input into the parent's P coordinates (zeros elsewhere), apply the
    parent and select ``index``; the square root is the parent's rows ``S L`` (n x r), so
    ``sqrt_cols`` is the parent's. This is the exact restriction for operators without a
    cheaper one (e.g. :class:`LowRankPrecision`).
    """

    def __init__(self, parent: CovarianceOperator, index: Tensor, *, check: bool = True) -> None:
        index = check_index(index, parent.num_params, "marginal index").to(parent.device)
        super().__init__(index.numel(), parent.sqrt_cols)
        self.parent = parent
        self.index = index

    def _fields(self) -> dict[str, Any]:
        return {"parent": self.parent, "index": self.index}

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: the parent's."""
        return self.parent.matmul_flops()

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` for one vector: the parent's."""
        return self.parent.sqrt_flops()

    def workspace_bytes(self, rows: int) -> int:
        """The parent's temporaries plus two embedded ``(rows, P_parent)`` tensors, in bytes."""
        embedded = rows * self.parent.num_params * self.dtype.itemsize
        return 2 * embedded + self.parent.workspace_bytes(rows)

    def _embed(self, V: Tensor) -> Tensor:
        full = V.new_zeros(V.shape[0], self.parent.num_params)
        return full.index_copy(1, self.index, V)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        return self.parent.matmul_rows(self._embed(V))[:, self.index]

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return self.parent.sqrt_rows(Z)[:, self.index]

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return self.parent.sqrt_t_rows(self._embed(V))

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        return self.parent.quadratic_rows(self._embed(V))

    def diagonal(self) -> Tensor:
        """``(n,)``: the parent's variances at ``index``."""
        return self.parent.diagonal()[self.index]

    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The coordinates ``index`` of this marginal: a :class:`Marginal` of the same parent."""
        index = check_index(index, self.num_params, "marginal index").to(self.index.device)
        return Marginal(self.parent, self.index[index], check=False)
