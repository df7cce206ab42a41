"""A covariance over a subset of the flat coordinates, zero elsewhere (subnetwork Laplace)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.isotropic import Isotropic
from pushforward.covariance.marginal import check_index
from pushforward.covariance.operator import CovarianceOperator, ParamGroup

__all__ = ["Subset"]


class Subset(CovarianceOperator):
    """Σ = E Σ_s E^T: a covariance over some flat coordinates, zero for every other one.

    ``inner`` (s x s) covers the flat coordinates ``indices`` of a P-dimensional space.

    Args:
        inner: the operator over the ``s`` selected coordinates, in the order of ``indices``.
        indices: ``(s,)`` distinct flat indices in ``[0, num_params)``, any order.
        num_params: P.
        check: unused (``inner`` was checked when it was made); the indices are always checked.

    ``E`` is the ``(P, s)`` embedding with ``E[indices[j], j] = 1``; the square-root factor is
    ``E L_s`` (``sqrt_cols = inner.sqrt_cols``). laplace-torch's ``SubnetLaplace`` is converted
    to this form. :meth:`param_groups` gives one group per parameter tensor when ``inner`` is
    :class:`Diagonal` or :class:`Isotropic`, else one group.
    """

    def __init__(
        self, inner: CovarianceOperator, indices: Tensor, num_params: int, *, check: bool = True
    ) -> None:
        if not isinstance(inner, CovarianceOperator):
            raise TypeError(
                f"Subset inner must be a CovarianceOperator, got {type(inner).__name__}"
            )
        indices = check_index(indices, num_params, "Subset indices")
        if indices.numel() != inner.num_params:
            raise ValueError(
                f"Subset has {indices.numel()} indices but its inner operator has size "
                f"{inner.num_params}"
            )
        super().__init__(int(num_params), inner.sqrt_cols)
        self.inner = inner
        self.indices = indices.to(inner.device)

    def _fields(self) -> dict[str, Any]:
        return {"inner": self.inner, "indices": self.indices, "num_params": self._num_params}

    def workspace_bytes(self, rows: int) -> int:
        """The inner operator's temporaries plus two gathered ``(rows, s)`` tensors, in bytes."""
        gathered = rows * self.inner.num_params * self.dtype.itemsize
        return 2 * gathered + self.inner.workspace_bytes(rows)

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: the inner operator's."""
        return self.inner.matmul_flops()

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` for one vector: the inner operator's."""
        return self.inner.sqrt_flops()

    def _embed(self, X: Tensor) -> Tensor:
        """``(n, s) -> (n, P)`` with zeros outside ``indices``."""
        return X.new_zeros(X.shape[0], self.num_params).index_copy(1, self.indices, X)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        return self._embed(self.inner.matmul_rows(V[:, self.indices]))

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return self._embed(self.inner.sqrt_rows(Z))

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return self.inner.sqrt_t_rows(V[:, self.indices])

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        return self.inner.quadratic_rows(V[:, self.indices])

    def diagonal(self) -> Tensor:
        """``(P,)``: the inner operator's variances at ``indices``, zero elsewhere."""
        d = self.inner.diagonal()
        return d.new_zeros(self.num_params).index_copy(0, self.indices, d)

    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The covariance of the flat coordinates ``index`` ``(n,)``, unbound.

        A :class:`Subset` over those of them inside ``indices`` (the inner operator's marginal),
        or a zero :class:`Isotropic` when none is.
        """
        index = check_index(index, self.num_params, "marginal index").to(self.device)
        position = torch.full((self.num_params,), -1, dtype=torch.int64, device=self.device)
        position[self.indices] = torch.arange(self.indices.numel(), device=self.device)
        inner_pos = position[index]
        kept = (inner_pos >= 0).nonzero().reshape(-1)
        if kept.numel() == 0:
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            return Isotropic(zero, index.numel(), check=False)
        return Subset(self.inner.marginal(inner_pos[kept]), kept, index.numel(), check=False)

    def param_groups(self) -> list[ParamGroup]:
        """Uncorrelated parameter groups (needs a bound layout).

        One group per parameter tensor when ``inner`` is a :class:`Diagonal` or :class:`Isotropic`,
        else one group with every parameter.
        """
        layout = self._require_layout()
        if isinstance(self.inner, (Diagonal, Isotropic)):
            return [ParamGroup((n,), self.block(n)) for n in layout.names]
        return [ParamGroup(layout.names, self)]
