"""The marginal covariance of a subset of coordinates of another operator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pushforward.covariance.operator import CovarianceOperator

__all__ = ["Marginal", "check_index"]


def check_index(index: Tensor, size: int, what: str) -> Tensor:
    """``index`` as a 1-d int64 tensor of distinct coordinates in ``[0, size)``."""
    if not isinstance(index, Tensor):
        index = torch.as_tensor(index)
    if (
        index.dim() != 1
        or index.is_floating_point()
        or index.is_complex()
        or index.dtype == torch.bool
    ):
        raise ValueError(
            f"{what} must be a 1-d integer tensor, got {index.dtype} of shape {tuple(index.shape)}"
        )
    index = index.to(torch.int64)
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            raise ValueError(f"{what} must lie in [0, {size}), got values from {low} to {high}")
        if index.unique().numel() != index.numel():
            raise ValueError(f"{what} has duplicate entries")
    return index


class Marginal(CovarianceOperator):
    """``S Σ S^T``: the coordinates ``index`` (n,) of a parent operator Σ (P x P).

    Products embed their input into the parent's P coordinates (zeros elsewhere), apply the
    parent and select ``index``; the square root is the parent's rows ``S L`` (n x r), so
    ``sqrt_cols`` is the parent's. This is the exact fallback for :meth:`marginal`/``block``
    of operators without a cheaper restriction (e.g. :class:`LowRankPrecision`).
    """

    def __init__(self, parent: CovarianceOperator, index: Tensor) -> None:
        self.parent = parent
        self.index = check_index(index, parent.num_params, "marginal index").to(parent.device)

    @property
    def num_params(self) -> int:
        return self.index.numel()

    @property
    def sqrt_cols(self) -> int:
        return self.parent.sqrt_cols

    def matmul_flops(self) -> float:
        return self.parent.matmul_flops()

    def sqrt_flops(self) -> float:
        return self.parent.sqrt_flops()

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def _embed(self, V: Tensor) -> Tensor:
        full = V.new_zeros(V.shape[0], self.parent.num_params)
        return full.index_copy(1, self.index, V)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        return self.parent._matmul_rows(self._embed(V))[:, self.index]

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return self.parent._sqrt_rows(Z)[:, self.index]

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return self.parent._sqrt_t_rows(self._embed(V))

    def quadratic_rows(self, V: Tensor) -> Tensor:
        return self.parent.quadratic_rows(self._embed(V))

    def diagonal(self) -> Tensor:
        return self.parent.diagonal()[self.index]

    def marginal(self, index: Tensor) -> CovarianceOperator:
        index = check_index(index, self.num_params, "marginal index").to(self.index.device)
        return Marginal(self.parent, self.index[index])

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> Marginal:
        out = Marginal(self.parent._apply(fn), self.index)
        out.layout = self.layout
        return out
