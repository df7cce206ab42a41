"""A covariance whose precision is low-rank plus diagonal (laplace-torch's LowRankLaplace)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.covariance.checks import (
    cached,
    check_lowrank,
    factor_dtype,
    inv_sqrt_update,
    inv_sqrt_update_rows,
)
from pushforward.covariance.marginal import Marginal
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["LowRankPrecision"]


class LowRankPrecision(CovarianceOperator):
    """Σ = (U diag(eigvals) U^T + diag(diag))^{-1}, applied by Woodbury without forming P x P.

    Args:
        U: ``(P, k)``.
        eigvals: ``(k,)``, non-negative (the low-rank curvature, already scaled).
        diag: ``(P,)``, positive (the diagonal prior precision).
        check: check the tensors are finite, ``eigvals`` non-negative and ``diag`` positive (then
            the precision is positive definite and Σ exists). The shapes are always checked.

    laplace-torch's ``LowRankLaplace.posterior_precision`` is ``((U, eigvals), diag)`` in exactly
    this form. With ``D = diag(diag)`` and ``W = D^{-1/2} U diag(sqrt(eigvals))`` (P x k),
    Σ = D^{-1/2} (I + W W^T)^{-1} D^{-1/2} and

    * products, ``diagonal`` and ``quadratic_rows`` use a Cholesky factor of the k x k matrix
      ``I + W^T W`` (exact gradients everywhere);
    * the square-root factor is the exact ``D^{-1/2} (I + W W^T)^{-1/2}`` with the symmetric
      inverse square root ``I + W Q diag(c) Q^T W^T`` from the eigendecomposition
      ``W^T W = Q diag(s) Q^T``, ``c = ((1 + s)^{-1/2} - 1) / s`` (the Woodbury inverse square
      root ``PrecisionUpdate`` uses too); ``sqrt_cols = P``. (Its gradient, like any ``eigh``
      gradient, is undefined when ``s`` has repeated values.)

    Cost: O(P k) per row and O(P k²) once (recomputed after an in-place change of ``U``,
    ``eigvals`` or ``diag``; in float32 for a half-precision operator); :meth:`marginal`/
    ``block`` keep this operator and select coordinates (exact, same ``sqrt_cols``).
    """

    def __init__(self, U: Tensor, eigvals: Tensor, diag: Tensor, *, check: bool = True) -> None:
        P, _ = check_lowrank("LowRankPrecision", U, eigvals, diag, check)
        if check and bool((diag <= 0).any()):
            raise ValueError(
                f"LowRankPrecision diag (the diagonal precision) has {int((diag <= 0).sum())} "
                "entries <= 0; it must be positive for the precision to be invertible"
            )
        super().__init__(P)
        self.U, self.eigvals, self.diag = U, eigvals, diag
        self._cache: dict[str, Any] = {}

    def _fields(self) -> dict[str, Any]:
        return {"U": self.U, "eigvals": self.eigvals, "diag": self.diag}

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of the cached pieces and the intermediates for ``rows`` rows.

        The cached ``W``, ``M`` and the square root's ``W Q`` (each ``(P, k)``) and ``diag^{-1/2}``
        ``(P,)``, and two ``(rows, k)`` intermediates.
        """
        P, k = self.U.shape  # cached W, M and the square root's W Q (each P x k), intermediates
        return (3 * P * k + P + 2 * rows * k) * self.dtype.itemsize

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: ``4 P k + 2 k² + P``."""
        k = self.U.shape[1]
        return 4.0 * self.num_params * k + 2.0 * k * k + self.num_params

    # -- cached pieces -------------------------------------------------------------------
    def _inputs(self) -> tuple[Tensor, ...]:
        return self.U, self.eigvals, self.diag

    def _scale(self) -> Tensor:
        """``(P,)``: diag^{-1/2}."""
        return cached(self._cache, "scale", lambda: self.diag.rsqrt(), *self._inputs())

    def _W(self) -> Tensor:
        """``(P, k)``: D^{-1/2} U diag(sqrt(eigvals))."""
        return cached(
            self._cache,
            "W",
            lambda: self.U * self.eigvals.sqrt() * self._scale().unsqueeze(-1),
            *self._inputs(),
        )

    def _M(self) -> Tensor:
        """``(P, k)`` with ``M M^T = W (I + W^T W)^{-1} W^T``."""

        def compute() -> Tensor:
            W = self._W()
            work = W.to(factor_dtype(W.dtype))
            K = torch.eye(W.shape[1], dtype=work.dtype, device=W.device) + work.T @ work
            R = torch.linalg.cholesky(K)
            return torch.linalg.solve_triangular(R, work.T, upper=False).T.to(W.dtype)

        return cached(self._cache, "M", compute, *self._inputs())

    def _sqrt_parts(self) -> tuple[Tensor, Tensor]:
        """``W Q`` ``(P, k)`` and ``c`` ``(k,)`` of the symmetric factor.

        The factor is ``I + W Q diag(c) Q^T W^T``.
        """
        return cached(self._cache, "sqrt", lambda: inv_sqrt_update(self._W()), *self._inputs())

    # -- products ------------------------------------------------------------------------
    def _matmul_rows(self, V: Tensor) -> Tensor:
        X = V * self._scale()
        M = self._M()
        return (X - (X @ M) @ M.T) * self._scale()

    def _inv_sqrt_core(self, X: Tensor) -> Tensor:
        """Rows of ``X (I + W W^T)^{-1/2}`` (the core factor is symmetric)."""
        return inv_sqrt_update_rows(X, *self._sqrt_parts())

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return self._inv_sqrt_core(Z) * self._scale()

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return self._inv_sqrt_core(V * self._scale())

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        X = V * self._scale()
        return X.square().sum(-1) - (X @ self._M()).square().sum(-1)

    def diagonal(self) -> Tensor:
        """``(P,)``: the exact variances, ``D^{-1}`` less the Woodbury correction."""
        return self._scale().square() * (1 - self._M().square().sum(-1))

    def marginal(self, index: Tensor) -> Marginal:
        """The covariance of the flat coordinates ``index`` ``(n,)``.

        A :class:`Marginal` of this operator: exact, with the same ``sqrt_cols``, unbound.
        """
        return Marginal(self, index)
