"""A low-rank-plus-diagonal covariance Σ = U diag(λ) U^T + diag(d)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.covariance.checks import (
    cached,
    check_index,
    check_lowrank,
    check_nonnegative,
)
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["LowRank"]


class LowRank(CovarianceOperator):
    """Σ = U diag(eigvals) U^T (+ diag(diag)).

    Args:
        U: ``(P, k)`` (e.g. eigenvectors; orthonormality is not required).
        eigvals: ``(k,)``, non-negative.
        diag: optional ``(P,)`` non-negative diagonal added to the low-rank part.
        check: check the tensors are finite and ``eigvals``/``diag`` non-negative (then Σ is
            positive semi-definite).

    The square-root factor is ``[U diag(sqrt(eigvals)), diag(sqrt(diag))]``, so
    ``sqrt_cols = k`` without ``diag`` and ``k + P`` with it (the first k columns of ``Z`` drive
    the low-rank part). For a posterior whose *precision* is low-rank plus diagonal (laplace-
    torch's ``LowRankLaplace``) use :class:`LowRankPrecision`.
    """

    def __init__(
        self, U: Tensor, eigvals: Tensor, diag: Tensor | None = None, *, check: bool = True
    ) -> None:
        P, k = check_lowrank("LowRank", U, eigvals, diag, check)
        if check and diag is not None:
            check_nonnegative("LowRank diag", diag)
        super().__init__(P, k + (0 if diag is None else P))
        self.U, self.eigvals, self.diag = U, eigvals, diag
        self._cache: dict[str, Tensor] = {}

    def _fields(self) -> dict[str, Any]:
        return {"U": self.U, "eigvals": self.eigvals, "diag": self.diag}

    @property
    def rank(self) -> int:
        """k, the number of columns of ``U``."""
        return self.U.shape[1]

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: ``4 P k`` (+ P with ``diag``)."""
        return 4.0 * self.num_params * self.rank + (0 if self.diag is None else self.num_params)

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` for one vector: ``2 P k`` (+ P with ``diag``)."""
        return 2.0 * self.num_params * self.rank + (0 if self.diag is None else self.num_params)

    def workspace_bytes(self, rows: int) -> int:
        # the cached scaled factor (P, k), an (rows, k) intermediate and, with diag, its root
        """Bytes of the cached pieces and of an intermediate for ``rows`` rows.

        The cached ``U diag(sqrt(eigvals))`` ``(P, k)`` (with ``diag``, also its square root
        ``(P,)``) and a ``(rows, k)`` intermediate.
        """
        P, k = self.U.shape
        return (P * k + rows * k + (0 if self.diag is None else P)) * self.dtype.itemsize

    def _scaled_U(self) -> Tensor:
        """``U diag(sqrt(eigvals))`` ``(P, k)`` (cached unless autograd records it)."""
        return cached(
            self._cache, "scaled", lambda: self.U * self.eigvals.sqrt(), self.U, self.eigvals
        )

    def _root_diag(self) -> Tensor:
        return cached(self._cache, "root", self.diag.sqrt, self.diag)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        out = ((V @ self.U) * self.eigvals) @ self.U.T
        return out if self.diag is None else out + V * self.diag

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        k = self.rank
        out = Z[:, :k] @ self._scaled_U().T
        return out if self.diag is None else out + Z[:, k:] * self._root_diag()

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        low = V @ self._scaled_U()
        return low if self.diag is None else torch.cat([low, V * self._root_diag()], dim=-1)

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        out = (V @ self.U).square() @ self.eigvals
        return out if self.diag is None else out + V.square() @ self.diag

    def diagonal(self) -> Tensor:
        """``(P,)``: ``(U ∘ U) eigvals``, plus ``diag`` when given."""
        out = self.U.square() @ self.eigvals
        return out if self.diag is None else out + self.diag

    def marginal(self, index: Tensor) -> LowRank:
        """The covariance of the flat coordinates ``index`` ``(n,)``.

        An unbound :class:`LowRank` with the rows ``U[index]`` (and ``diag[index]``) and the same
        eigenvalues.
        """
        index = check_index(index, self.num_params, "marginal index").to(self.device)
        diag = None if self.diag is None else self.diag[index]
        return LowRank(self.U[index], self.eigvals, diag, check=False)
