"""A low-rank-plus-diagonal covariance Σ = U diag(λ) U^T + diag(d)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pushforward.covariance.checks import check_nonnegative, common_dtype_device
from pushforward.covariance.marginal import check_index
from pushforward.covariance.operator import CovarianceOperator, check_finite

__all__ = ["LowRank"]


class LowRank(CovarianceOperator):
    """Σ = U diag(eigvals) U^T (+ diag(diag)).

    Args:
        U: ``(P, k)`` (e.g. eigenvectors; orthonormality is not required).
        eigvals: ``(k,)``, non-negative.
        diag: optional ``(P,)`` non-negative diagonal added to the low-rank part.

    The square-root factor is ``[U diag(sqrt(eigvals)), diag(sqrt(diag))]``, so
    ``sqrt_cols = k`` without ``diag`` and ``k + P`` with it (the first k columns of ``Z`` drive
    the low-rank part). For a posterior whose *precision* is low-rank plus diagonal (laplace-
    torch's ``LowRankLaplace``) use :class:`LowRankPrecision`.
    """

    def __init__(self, U: Tensor, eigvals: Tensor, diag: Tensor | None = None) -> None:
        tensors = {"U": U, "eigvals": eigvals} | ({} if diag is None else {"diag": diag})
        common_dtype_device("LowRank", tensors)
        if U.dim() != 2:
            raise ValueError(f"LowRank U must have shape (P, k), got {tuple(U.shape)}")
        P, k = U.shape
        if eigvals.shape != (k,):
            raise ValueError(
                f"LowRank eigvals must have shape ({k},) to match U (P={P}, k={k}), got {tuple(eigvals.shape)}"
            )
        if diag is not None and diag.shape != (P,):
            raise ValueError(
                f"LowRank diag must have shape ({P},) to match U (P={P}, k={k}), got {tuple(diag.shape)}"
            )
        for name, t in tensors.items():
            check_finite(f"LowRank {name}", t)
        check_nonnegative("LowRank eigvals", eigvals)
        if diag is not None:
            check_nonnegative("LowRank diag", diag)
        self.U, self.eigvals, self.diag = U, eigvals, diag

    @property
    def num_params(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """k, the number of columns of ``U``."""
        return self.U.shape[1]

    @property
    def sqrt_cols(self) -> int:
        return self.rank + (0 if self.diag is None else self.num_params)

    def matmul_flops(self) -> float:
        return 4.0 * self.num_params * self.rank + (0 if self.diag is None else self.num_params)

    def sqrt_flops(self) -> float:
        return 2.0 * self.num_params * self.rank + (0 if self.diag is None else self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        return self.U.device

    def _scaled_U(self) -> Tensor:
        return self.U * self.eigvals.sqrt()

    def _matmul_rows(self, V: Tensor) -> Tensor:
        out = ((V @ self.U) * self.eigvals) @ self.U.T
        return out if self.diag is None else out + V * self.diag

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        k = self.rank
        out = Z[:, :k] @ self._scaled_U().T
        return out if self.diag is None else out + Z[:, k:] * self.diag.sqrt()

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        low = V @ self._scaled_U()
        return low if self.diag is None else torch.cat([low, V * self.diag.sqrt()], dim=-1)

    def quadratic_rows(self, V: Tensor) -> Tensor:
        out = (V @ self.U).square() @ self.eigvals
        return out if self.diag is None else out + V.square() @ self.diag

    def diagonal(self) -> Tensor:
        out = self.U.square() @ self.eigvals
        return out if self.diag is None else out + self.diag

    def marginal(self, index: Tensor) -> LowRank:
        index = check_index(index, self.num_params, "marginal index").to(self.device)
        return LowRank(self.U[index], self.eigvals, None if self.diag is None else self.diag[index])

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> LowRank:
        out = LowRank(fn(self.U), fn(self.eigvals), None if self.diag is None else fn(self.diag))
        out.layout = self.layout
        return out
