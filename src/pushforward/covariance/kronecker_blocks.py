"""Kronecker-factored covariance blocks of one weight tensor (K-FAC style), as operators.

A weight ``W`` of shape ``(out, *in_shape)`` is flattened row-major; its covariance block is
``B ⊗ A``: ``Cov(W[o, i], W[o', i']) = B[o, o'] A[i, i']`` with ``i`` the row-major index over
``in_shape`` (``in_flat = prod(in_shape)``). Rows ``X (n, out * in_flat)`` are multiplied as
``(n, out, in_flat)`` matrices: ``B X A`` — never the ``(out in) x (out in)`` matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pushforward.covariance.checks import (
    cached,
    check_finite,
    check_matrix,
    check_nonnegative,
    check_psd,
    check_symmetric,
    common_dtype_device,
    psd_sqrt,
    remember,
)
from pushforward.covariance.marginal import Marginal
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["KroneckerBlock", "KroneckerEigen", "KroneckerFactors"]


#: The smallest left factor (its side) whose rows go side by side in one product.
_SIDE_BY_SIDE = 512


class KroneckerBlock(CovarianceOperator):
    """A covariance over one weight of ``out x in_flat`` entries with Kronecker structure."""

    def __init__(self, out: int, inn: int) -> None:
        super().__init__(out * inn)
        self.sides = (out, inn)

    def check_weight(self, name: str, shape: torch.Size) -> None:
        """Raise unless this block fits a weight ``name`` of ``shape`` ``(out, *in_shape)``.

        Raises:
            ValueError: ``shape`` has fewer than 2 dimensions, or its ``(out, in_flat)`` differs
                from this block's sides.
        """
        numel = math.prod(shape)
        if len(shape) < 2:
            raise ValueError(
                f"Kronecker factor pair given for {name!r} of shape {tuple(shape)}; a pair needs "
                f"a weight with at least 2 dimensions (give one ({numel}, {numel}) covariance "
                "instead)"
            )
        expected = (shape[0], numel // shape[0])
        if self.sides != expected:
            raise ValueError(
                f"Kronecker {self._side_names} for {name!r} have sides {self.sides}, but a "
                f"weight of shape {tuple(shape)} needs (out, in_flat) = {expected}"
            )

    _side_names = "factors"

    def _grid(self, X: Tensor) -> Tensor:
        """Rows ``(n, out * in)`` as ``(n, out, in)``."""
        return X.reshape(X.shape[0], *self.sides)

    @staticmethod
    def _sandwich(left: Tensor, X: Tensor, right: Tensor) -> Tensor:
        """``left @ X[j] @ right`` for every row ``X (n, out, in)``.

        ``left @ X`` broadcasts ``left`` over the rows: one product per row, each reading all of
        ``left``. When ``left`` is large (``out >= 512``) and ``out`` more than four times
        ``in`` (a LoRA ``B``: 2,304 x 8) those thin products cost more than putting the rows'
        columns side by side in one product (two copies of the rows), which is done then.
        """
        n, out, inn = X.shape
        if out < _SIDE_BY_SIDE or out <= 4 * inn:
            return left @ X @ right
        Y = X @ right  # one (n out, in) x (in, in) product
        Y = left @ Y.transpose(0, 1).reshape(out, -1)
        return Y.reshape(left.shape[0], n, -1).transpose(0, 1)

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: ``2 (out² in + out in²)``."""
        out, inn = self.sides
        return 2.0 * (out * out * inn + out * inn * inn)

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` for one vector, as :meth:`matmul_flops`."""
        return self.matmul_flops()

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of two ``(rows, out, in)`` intermediates and the two square factors."""
        out, inn = self.sides
        return (2 * rows * out * inn + out * out + inn * inn) * self.dtype.itemsize

    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The covariance of the flat coordinates ``index`` ``(n,)``: a :class:`Marginal`."""
        return Marginal(self, index)


class KroneckerFactors(KroneckerBlock):
    """Σ_W = B ⊗ A (see the module docstring).

    Args:
        out_factor: B, ``(out, out)``, symmetric PSD.
        in_factor: A, ``(in_flat, in_flat)``, symmetric PSD.
        check: check both are finite, symmetric and positive semi-definite (their Cholesky
            factors, when they exist, are kept for the square root).

    The square root is ``chol(B) ⊗ chol(A)`` (the clamped eigen square root of a singular
    factor); factors are never eigendecomposed otherwise. It is recomputed after an in-place
    change of either factor; half-precision factors are factorized in float32.
    """

    _side_names = "out_factor/in_factor"

    def __init__(self, out_factor: Tensor, in_factor: Tensor, *, check: bool = True) -> None:
        label = "KroneckerFactors"
        common_dtype_device(label, {"out_factor": out_factor, "in_factor": in_factor})
        check_matrix(f"{label}: out_factor", out_factor)
        check_matrix(f"{label}: in_factor", in_factor)
        super().__init__(out_factor.shape[0], in_factor.shape[0])
        self.out_factor, self.in_factor = out_factor, in_factor
        self._cache: dict[str, Any] = {}
        if check:
            roots = []
            for name, F in (("out_factor", out_factor), ("in_factor", in_factor)):
                check_finite(f"{label}: {name}", F)
                check_symmetric(f"{label}: {name}", F)
                roots.append(check_psd(f"{label}: {name}", F))
            if None not in roots and not (out_factor.requires_grad or in_factor.requires_grad):
                remember(self._cache, "chol", tuple(roots), out_factor, in_factor)

    def _fields(self) -> dict[str, Any]:
        return {"out_factor": self.out_factor, "in_factor": self.in_factor}

    def _chol(self) -> tuple[Tensor, Tensor]:
        B, A = self.out_factor, self.in_factor
        return cached(
            self._cache,
            "chol",
            lambda: (psd_sqrt(B, "Kronecker out_factor"), psd_sqrt(A, "Kronecker in_factor")),
            B,
            A,
        )

    def _matmul_rows(self, V: Tensor) -> Tensor:
        return self._sandwich(self.out_factor, self._grid(V), self.in_factor).reshape(V.shape)

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        LB, LA = self._chol()
        return self._sandwich(LB, self._grid(Z), LA.T).reshape(Z.shape)

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        LB, LA = self._chol()
        return self._sandwich(LB.T, self._grid(V), LA).reshape(V.shape)

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        X = self._grid(V)
        return (X * self._sandwich(self.out_factor, X, self.in_factor)).sum((-2, -1))

    def diagonal(self) -> Tensor:
        """``(out * in_flat,)``: ``diag(B) ⊗ diag(A)``, flattened row-major."""
        return torch.outer(self.out_factor.diagonal(), self.in_factor.diagonal()).reshape(-1)


class KroneckerEigen(KroneckerBlock):
    """Σ_W = (Q_out ⊗ Q_in) diag(vec(eigvals)) (Q_out ⊗ Q_in)^T (row-major ``vec``).

    Args:
        out_eigvecs: Q_out, ``(out, out)``, orthogonal.
        in_eigvecs: Q_in, ``(in_flat, in_flat)``, orthogonal.
        eigvals: ``(out, in_flat)``, the non-negative covariance eigenvalues (prior, scale and
            inversion already applied).
        check: check the tensors are finite and the eigenvalues non-negative.
    """

    _side_names = "out_eigvecs/in_eigvecs"

    def __init__(
        self, out_eigvecs: Tensor, in_eigvecs: Tensor, eigvals: Tensor, *, check: bool = True
    ) -> None:
        label = "KroneckerEigen"
        common_dtype_device(
            label, {"out_eigvecs": out_eigvecs, "in_eigvecs": in_eigvecs, "eigvals": eigvals}
        )
        check_matrix(f"{label}: out_eigvecs", out_eigvecs)
        check_matrix(f"{label}: in_eigvecs", in_eigvecs)
        if eigvals.shape != (out_eigvecs.shape[0], in_eigvecs.shape[0]):
            raise ValueError(
                f"{label}: eigvals must have shape (out, in_flat) = ({out_eigvecs.shape[0]}, "
                f"{in_eigvecs.shape[0]}) to match the eigenvectors, got {tuple(eigvals.shape)}"
            )
        if check:
            for name, t in (("out_eigvecs", out_eigvecs), ("in_eigvecs", in_eigvecs)):
                check_finite(f"{label}: {name}", t)
            check_finite(f"{label}: eigvals", eigvals)
            check_nonnegative(f"{label}: eigvals", eigvals, "eigenvalues")
        super().__init__(out_eigvecs.shape[0], in_eigvecs.shape[0])
        self.out_eigvecs, self.in_eigvecs, self.eigvals = out_eigvecs, in_eigvecs, eigvals

    def _fields(self) -> dict[str, Any]:
        return {
            "out_eigvecs": self.out_eigvecs,
            "in_eigvecs": self.in_eigvecs,
            "eigvals": self.eigvals,
        }

    def _rotate(self, X: Tensor) -> Tensor:
        """``Q_out^T X Q_in`` for rows ``X`` as ``(n, out, in)``."""
        return self._sandwich(self.out_eigvecs.T, self._grid(X), self.in_eigvecs)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        Y = self._rotate(V) * self.eigvals
        return self._sandwich(self.out_eigvecs, Y, self.in_eigvecs.T).reshape(V.shape)

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        Y = self._grid(Z) * self.eigvals.sqrt()
        return self._sandwich(self.out_eigvecs, Y, self.in_eigvecs.T).reshape(Z.shape)

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return (self._rotate(V) * self.eigvals.sqrt()).reshape(V.shape)

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        return (self._rotate(V).square() * self.eigvals).sum((-2, -1))

    def diagonal(self) -> Tensor:
        """``(out * in_flat,)``: ``(Q_out ∘ Q_out) eigvals (Q_in ∘ Q_in)^T``, row-major."""
        Qo, Qi = self.out_eigvecs, self.in_eigvecs
        return (Qo.square() @ self.eigvals @ Qi.square().T).reshape(-1)
