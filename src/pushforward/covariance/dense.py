"""A dense P x P covariance, given as the matrix or as a square-root factor."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pushforward.covariance.checks import (
    cached,
    check_finite,
    check_index,
    check_matrix,
    check_psd,
    check_symmetric,
    common_dtype_device,
    psd_sqrt,
    remember,
)
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["Dense"]


class Dense(CovarianceOperator):
    """Σ as a dense ``(P, P)`` matrix.

    Args:
        matrix: the symmetric PSD covariance ``(P, P)``.
        cholesky: instead of ``matrix``, a lower-triangular ``L`` ``(P, P)`` with Σ = L L^T
            (same as :meth:`from_cholesky`).
        factor: instead of either, any square ``L`` with Σ = L L^T, used as the square-root
            factor (same as :meth:`from_factor`).
        check: check the matrix is finite, symmetric and positive semi-definite (one Cholesky
            factorization, kept as the square-root factor; an eigendecomposition only when the
            matrix is singular).

    The square-root factor (``sqrt_cols = P``) is the given factor, else the Cholesky factor of
    ``matrix``, or — when ``matrix`` is only positive semi-definite — its clamped symmetric
    eigen square root; it is recomputed after an in-place change of ``matrix``. A float16 or
    bfloat16 matrix is factorized in float32 and the factor rounded to its dtype.
    """

    def __init__(
        self,
        matrix: Tensor | None = None,
        *,
        cholesky: Tensor | None = None,
        factor: Tensor | None = None,
        check: bool = True,
    ) -> None:
        given = {"matrix": matrix, "cholesky": cholesky, "factor": factor}
        chosen = [(k, v) for k, v in given.items() if v is not None]
        if len(chosen) != 1:
            raise ValueError("Dense needs exactly one of matrix=..., cholesky=... or factor=...")
        ((kind, M),) = chosen
        name = {"matrix": "Dense matrix", "cholesky": "Dense cholesky factor"}.get(
            kind, "Dense factor"
        )
        common_dtype_device("Dense", {kind: M})
        check_matrix(name, M)
        self._cache: dict[str, Tensor] = {}
        if check:
            check_finite(name, M)
        if kind == "cholesky" and bool((M.triu(1) != 0).any()):
            raise ValueError(
                "Dense cholesky factor must be lower triangular (it has non-zero entries "
                "above the diagonal); use Dense.from_factor for a general square root"
            )
        if kind == "matrix" and check:
            check_symmetric(name, M)
            L = check_psd(name, M)
            if L is not None and not M.requires_grad:
                remember(self._cache, "sqrt", L, M)
        super().__init__(M.shape[0])
        self._kind = kind
        self._matrix = M if kind == "matrix" else None
        self._factor = None if kind == "matrix" else M

    @classmethod
    def from_cholesky(cls, L: Tensor, *, check: bool = True) -> Dense:
        """Σ = L L^T for a lower-triangular ``L`` ``(P, P)``."""
        return cls(cholesky=L, check=check)

    @classmethod
    def from_factor(cls, L: Tensor, *, check: bool = True) -> Dense:
        """Σ = L L^T for any square ``L`` ``(P, P)`` (e.g. ``Q diag(sqrt(λ))``).

        ``L`` is used as the square-root factor.
        """
        return cls(factor=L, check=check)

    def _fields(self) -> dict[str, Any]:
        return {self._kind: self._matrix if self._kind == "matrix" else self._factor}

    def workspace_bytes(self, rows: int) -> int:
        """An intermediate ``(rows, P)`` and the square-root factor ``(P, P)``, in bytes."""
        P = self.num_params
        return (rows * P + P * P) * self.dtype.itemsize  # an intermediate and the factor

    # -- products ------------------------------------------------------------------------
    def _sqrt(self) -> Tensor:
        if self._factor is not None:
            return self._factor
        return cached(
            self._cache, "sqrt", lambda: psd_sqrt(self._matrix, "Dense matrix"), self._matrix
        )

    def _matmul_rows(self, V: Tensor) -> Tensor:
        if self._matrix is not None:
            return V @ self._matrix
        return (V @ self._factor) @ self._factor.T

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return Z @ self._sqrt().T

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return V @ self._sqrt()

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        if self._matrix is not None:
            return super()._quadratic_rows(V)
        return (V @ self._factor).square().sum(-1)

    def diagonal(self) -> Tensor:
        """``(P,)``: the matrix's diagonal, or the factor's squared row norms."""
        if self._matrix is not None:
            return self._matrix.diagonal()
        return self._factor.square().sum(-1)

    def to_dense(self) -> Tensor:
        """The ``(P, P)`` matrix: the given one, or ``L L^T`` from a factor."""
        if self._matrix is not None:
            return self._matrix
        return self._factor @ self._factor.T

    def marginal(self, index: Tensor) -> Dense:
        """The covariance of the flat coordinates ``index`` ``(n,)``: an unbound :class:`Dense`."""
        index = check_index(index, self.num_params, "marginal index").to(self.device)
        if self._matrix is not None:
            return Dense(self._matrix[index][:, index], check=False)
        rows = self._factor[index]
        return Dense(rows @ rows.T, check=False)
