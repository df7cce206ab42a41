"""A covariance after a rank-n update of its precision: conditioning on new observations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.checks import (
    cached,
    check_finite,
    check_nonnegative,
    common_dtype_device,
    factor_dtype,
    inv_sqrt_update,
    inv_sqrt_update_rows,
)
from pushforward.covariance.marginal import Marginal
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["PrecisionUpdate"]


class PrecisionUpdate(CovarianceOperator):
    """Σ' = (Σ^{-1} + R^T diag(w) R)^{-1}: the covariance ``base`` after adding n new rows.

    The covariance Σ after adding the curvature of n new rows to its precision, applied by
    Woodbury without forming P x P.

    Args:
        base: the covariance Σ before the update (any operator).
        rows: ``(n, P)``, the rows R (for a Gaussian likelihood: the Jacobian rows ``J(x_i)``
            of the new observations, one per observed output).
        weights: ``(n,)``, non-negative: the likelihood precision of each row (``1 / σ_i²``).
        check: check ``rows`` and ``weights`` are finite and ``weights`` non-negative.

    With ``A = diag(sqrt(w)) R`` and ``C = I_n + A Σ A^T`` (the Gaussian conditioning of the
    linear model ``y = R θ + ε`` on the prior N(·, Σ)),

    * Σ' = Σ - M^T M with ``M = K^{-1} A Σ`` (``C = K K^T``, Cholesky): products, ``diagonal``
      and ``quadratic_rows`` cost the base's product plus O(P n) per row;
    * the square-root factor is ``L' = L (I + N^T N)^{-1/2}`` with the base's factor ``L`` and
      ``N = A L`` (n x r), the symmetric inverse square root written ``I + N^T Q diag(c) Q^T N``
      from the eigendecomposition ``N N^T = Q diag(s) Q^T``, ``c = ((1 + s)^{-1/2} - 1) / s``;
      ``sqrt_cols`` is the base's r. (Its gradient, like any ``eigh`` gradient, is undefined
      when ``s`` has repeated values.)

    The cached pieces are recomputed after an in-place change of ``rows``, ``weights`` or the
    base's tensors; a half-precision operator factorizes in float32. The update is exact: rows
    that are zero outside some parameters leave the others' marginal covariance unchanged, and
    updating an updated operator again equals one update with all rows (:meth:`updated` does the
    latter).
    """

    def __init__(
        self, base: CovarianceOperator, rows: Tensor, weights: Tensor, *, check: bool = True
    ) -> None:
        if not isinstance(base, CovarianceOperator):
            raise TypeError(
                f"PrecisionUpdate base must be a covariance operator, got {type(base).__name__}"
            )
        common_dtype_device("PrecisionUpdate", {"rows": rows, "weights": weights})
        if rows.dim() != 2 or rows.shape[1] != base.num_params:
            raise ValueError(
                f"PrecisionUpdate rows must have shape (n, P={base.num_params}), got "
                f"{tuple(rows.shape)}"
            )
        if weights.shape != rows.shape[:1]:
            raise ValueError(
                f"PrecisionUpdate weights must have shape ({rows.shape[0]},) (one per row), got "
                f"{tuple(weights.shape)}"
            )
        if rows.dtype != base.dtype or rows.device != base.device:
            raise ValueError(
                f"PrecisionUpdate rows ({rows.dtype}, {rows.device}) and base ({base.dtype}, "
                f"{base.device}) must share dtype and device"
            )
        if check:
            check_finite("PrecisionUpdate rows", rows)
            check_finite("PrecisionUpdate weights", weights)
            check_nonnegative("PrecisionUpdate weights", weights)
        super().__init__(base.num_params, base.sqrt_cols)
        self.base, self.rows, self.weights = base, rows, weights
        self.layout = base.layout
        self._cache: dict[str, Any] = {}

    def _fields(self) -> dict[str, Any]:
        return {"base": self.base, "rows": self.rows, "weights": self.weights}

    def updated(self, rows: Tensor, weights: Tensor) -> PrecisionUpdate:
        """This covariance after adding more rows: one update of the base with all rows."""
        return PrecisionUpdate(
            self.base, torch.cat([self.rows, rows]), torch.cat([self.weights, weights])
        )

    def bind(self, layout: ParamLayout) -> CovarianceOperator:
        """This update with its base bound to ``layout`` (rows and weights unchanged).

        Raises:
            ValueError: ``layout`` has another number of parameters, or the base refuses it.
        """
        if self.num_params != layout.num_params:
            return super().bind(layout)  # raises the size error
        if self.layout == layout:
            return self
        return PrecisionUpdate(self.base.bind(layout), self.rows, self.weights, check=False)

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ' v`` for one vector: the base's plus ``4 P n``."""
        return self.base.matmul_flops() + 4.0 * self.num_params * self.rows.shape[0]

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L' z`` for one vector: the base's plus ``4 r n``."""
        return self.base.sqrt_flops() + 4.0 * self.sqrt_cols * self.rows.shape[0]

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of temporaries for ``rows`` rows and of the cached pieces.

        The base's workspace for ``max(rows, n)`` rows, the cached ``M`` ``(n, P)`` and ``N^T Q``
        ``(r, n)``, and the rows' ``(rows, n)`` products with them.
        """
        n = self.rows.shape[0]  # cached M (n x P) and N (n x r), and the rows' n products
        cached_bytes = n * (self.num_params + self.sqrt_cols) * self.dtype.itemsize
        return self.base.workspace_bytes(max(rows, n)) + cached_bytes + rows * n * 8

    # -- cached pieces -------------------------------------------------------------------
    def _inputs(self) -> list[Tensor]:
        return [self.rows, self.weights, *self.base.tensors()]

    def _scaled(self) -> Tensor:
        """``(n, P)``: A = diag(sqrt(w)) R."""
        return self.rows * self.weights.sqrt().unsqueeze(-1)

    def _M(self) -> Tensor:
        """``(n, P)`` with ``M^T M = Σ A^T C^{-1} A Σ``."""

        def compute() -> Tensor:
            A = self._scaled()
            work = factor_dtype(A.dtype)
            U = self.base.matmul_rows(A).to(work)  # A Σ
            C = torch.eye(A.shape[0], dtype=work, device=A.device) + U @ A.to(work).T
            K = torch.linalg.cholesky(0.5 * (C + C.T))
            return torch.linalg.solve_triangular(K, U, upper=False).to(A.dtype)

        return cached(self._cache, "M", compute, *self._inputs())

    def _sqrt_parts(self) -> tuple[Tensor, Tensor]:
        """``N^T Q`` ``(r, n)`` and ``c`` ``(n,)`` of the core factor.

        ``(I + N^T N)^{-1/2} = I + N^T Q diag(c) Q^T N`` (:func:`inv_sqrt_update` of ``N^T``).
        """

        def compute() -> tuple[Tensor, Tensor]:
            return inv_sqrt_update(self.base.sqrt_t_rows(self._scaled()).T)  # N^T = (A L)^T

        return cached(self._cache, "sqrt", compute, *self._inputs())

    def _core(self, X: Tensor) -> Tensor:
        """Rows of ``X (I + N^T N)^{-1/2}`` (the core factor is symmetric)."""
        return inv_sqrt_update_rows(X, *self._sqrt_parts())

    # -- products ------------------------------------------------------------------------
    def _matmul_rows(self, V: Tensor) -> Tensor:
        M = self._M()
        return self.base.matmul_rows(V) - (V @ M.T) @ M

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return self.base.sqrt_rows(self._core(Z))

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return self._core(self.base.sqrt_t_rows(V))

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        return self.base.quadratic_rows(V) - (V @ self._M().T).square().sum(-1)

    def diagonal(self) -> Tensor:
        """``(P,)``: the base's variances less the column sums of ``M ∘ M``."""
        return self.base.diagonal() - self._M().square().sum(0)

    def marginal(self, index: Tensor) -> Marginal:
        """The covariance of the flat coordinates ``index`` ``(n,)``: a :class:`Marginal`."""
        return Marginal(self, index)
