"""A dense P x P covariance, given as the matrix or as a square-root factor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pushforward.covariance.checks import (
    cached,
    check_matrix,
    check_nonnegative,
    check_symmetric,
    common_dtype_device,
    psd_sqrt,
)
from pushforward.covariance.marginal import check_index
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["Dense"]


class Dense(CovarianceOperator):
    """Σ as a dense ``(P, P)`` matrix.

    Args:
        matrix: the symmetric PSD covariance ``(P, P)``.
        cholesky: instead of ``matrix``, a lower-triangular ``L`` ``(P, P)`` with Σ = L L^T
            (same as :meth:`from_cholesky`).

    The square-root factor (``sqrt_cols = P``) is the given factor, else the Cholesky factor of
    ``matrix`` (computed once, lazily), or — when ``matrix`` is only positive semi-definite —
    its clamped symmetric eigen square root.
    """

    def __init__(self, matrix: Tensor | None = None, *, cholesky: Tensor | None = None) -> None:
        if (matrix is None) == (cholesky is None):
            raise ValueError("Dense needs exactly one of matrix=... or cholesky=...")
        self._cache: dict[str, Tensor] = {}
        self._matrix: Tensor | None = None
        self._factor: Tensor | None = None
        self._triangular = False
        if matrix is not None:
            self._dtype, self._device = common_dtype_device("Dense", {"matrix": matrix})
            check_matrix("Dense matrix", matrix)
            check_symmetric("Dense matrix", matrix)
            check_nonnegative("Dense matrix", matrix.diagonal(), "diagonal entries (variances)")
            self._matrix = matrix
        else:
            self._set_factor(cholesky, "Dense cholesky factor")
            if bool((cholesky.triu(1) != 0).any()):
                raise ValueError(
                    "Dense cholesky factor must be lower triangular (it has non-zero entries "
                    "above the diagonal); use Dense.from_factor for a general square root"
                )
            self._triangular = True

    def _set_factor(self, L: Tensor, name: str) -> None:
        self._dtype, self._device = common_dtype_device("Dense", {name: L})
        check_matrix(name, L)
        self._factor = L

    @classmethod
    def from_cholesky(cls, L: Tensor) -> Dense:
        """Σ = L L^T for a lower-triangular ``L`` ``(P, P)``."""
        return cls(cholesky=L)

    @classmethod
    def from_factor(cls, L: Tensor) -> Dense:
        """Σ = L L^T for any square ``L`` ``(P, P)`` (e.g. ``Q diag(sqrt(λ))``); ``L`` is used as
        the square-root factor."""
        out = cls.__new__(cls)
        out._cache, out._matrix, out._triangular = {}, None, False
        out._set_factor(L, "Dense factor")
        return out

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return (self._matrix if self._matrix is not None else self._factor).shape[0]

    @property
    def sqrt_cols(self) -> int:
        return self.num_params

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

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

    def quadratic_rows(self, V: Tensor) -> Tensor:
        if self._matrix is not None:
            return super().quadratic_rows(V)
        return (V @ self._factor).square().sum(-1)

    def diagonal(self) -> Tensor:
        if self._matrix is not None:
            return self._matrix.diagonal()
        return self._factor.square().sum(-1)

    def to_dense(self) -> Tensor:
        if self._matrix is not None:
            return self._matrix
        return self._factor @ self._factor.T

    def marginal(self, index: Tensor) -> Dense:
        index = check_index(index, self.num_params, "marginal index").to(self.device)
        if self._matrix is not None:
            return Dense(self._matrix[index][:, index])
        rows = self._factor[index]
        return Dense(rows @ rows.T)

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> Dense:
        if self._matrix is not None:
            out = Dense(fn(self._matrix))
        elif self._triangular:
            out = Dense(cholesky=fn(self._factor))
        else:
            out = Dense.from_factor(fn(self._factor))
        out.layout = self.layout
        return out
