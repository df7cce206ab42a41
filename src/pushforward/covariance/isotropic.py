"""An isotropic covariance: one variance times the identity (e.g. the prior)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.checks import (
    check_finite,
    check_index,
    check_nonnegative,
    common_dtype_device,
)
from pushforward.covariance.operator import CovarianceOperator, ParamGroup

__all__ = ["Isotropic"]


class Isotropic(CovarianceOperator):
    """Σ = σ² I.

    Args:
        variance: σ², a Python number or a one-element tensor (differentiable). A Python
            number gives a tensor of the default dtype; ``.to(...)`` rebuilds it from the exact
            number, and :class:`BlockDiagonal` casts such an operator to its other blocks'
            dtype and device.
        num_params: P; when omitted it is taken from the layout at :meth:`bind`. Products need
            no size: ``Isotropic(v).matmul(V)`` scales any ``V``.
        check: check the variance is finite and non-negative.

    ``sqrt_cols = P``; :meth:`param_groups` gives one group per parameter tensor.
    """

    def __init__(
        self, variance: float | Tensor, num_params: int | None = None, *, check: bool = True
    ) -> None:
        self._number = None if isinstance(variance, Tensor) else float(variance)
        if self._number is not None:
            variance = torch.tensor(self._number)
        common_dtype_device("Isotropic", {"variance": variance})
        if variance.numel() != 1:
            raise ValueError(
                f"Isotropic variance must be a scalar, got shape {tuple(variance.shape)}"
            )
        variance = variance.reshape(())
        if check:
            check_finite("Isotropic variance", variance)
            check_nonnegative("Isotropic variance", variance)
        if num_params is not None and (isinstance(num_params, bool) or num_params < 0):
            raise ValueError(f"Isotropic num_params must be an integer >= 0, got {num_params}")
        super().__init__(num_params)
        self.variance = variance

    @property
    def from_number(self) -> bool:
        """Whether the variance was a Python number (no dtype or device of its own)."""
        return self._number is not None

    def _fields(self) -> dict[str, Any]:
        return {"variance": self.variance, "num_params": self._num_params}

    def _to_state(self) -> dict[str, Any]:
        return {**super()._to_state(), "number": self._number}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Isotropic:
        out = super()._from_state(state)
        out._number = state["number"]
        return out

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: P."""
        return float(self.num_params)

    def workspace_bytes(self, rows: int) -> int:
        """0: the products need no temporaries and nothing is cached."""
        return 0

    def _matmul_rows(self, V: Tensor) -> Tensor:
        return V * self.variance

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return Z * self.variance.sqrt()

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return V * self.variance.sqrt()

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        return V.square().sum(-1) * self.variance

    def diagonal(self) -> Tensor:
        """``(P,)``: σ² in every entry."""
        return self.variance.expand(self.num_params).clone()

    def to_dense(self) -> Tensor:
        """σ² I, ``(P, P)``."""
        return torch.eye(self.num_params, dtype=self.dtype, device=self.device) * self.variance

    def bind(self, layout: ParamLayout) -> Isotropic:
        """Takes P from ``layout`` when it was not given (else checks it)."""
        if self._num_params is None:
            out = self._sized(layout.num_params)
            out.layout = layout
            return out
        return super().bind(layout)

    def param_groups(self) -> list[ParamGroup]:
        """One group per parameter tensor, each an :class:`Isotropic` (needs a bound layout)."""
        layout = self._require_layout()
        return [ParamGroup((n,), self.block(n)) for n in layout.names]

    def block(self, name: str) -> Isotropic:
        """σ² I over parameter ``name``'s entries, bound to ``layout.sub([name])``.

        Raises:
            KeyError: ``name`` is not a parameter of the layout.
        """
        layout = self._require_layout()
        if name not in layout.shapes:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(layout.names)}")
        sub = layout.sub([name])
        out = self._sized(sub.num_params)
        out.layout = sub
        return out

    def marginal(self, index: Tensor) -> Isotropic:
        """σ² I over the flat coordinates ``index`` ``(n,)``, unbound, of size n."""
        index = check_index(index, self.num_params, "marginal index")
        return self._sized(index.numel())

    def __repr__(self) -> str:
        size = "unbound" if self._num_params is None else f"P={self._num_params}"
        return f"Isotropic(variance={self.variance.item():.6g}, {size}, dtype={self.dtype})"

    def _sized(self, num_params: int | None) -> Isotropic:
        out = Isotropic(self.variance, num_params, check=False)
        out._number = self._number
        return out

    def _apply(
        self, fn: Callable[[Tensor], Tensor], index_fn: Callable[[Tensor], Tensor] | None = None
    ) -> Isotropic:
        variance = fn(self.variance)
        if self._number is not None:  # exact in the new dtype, not rounded through the old one
            variance = torch.tensor(self._number, dtype=variance.dtype, device=variance.device)
        out = self._sized(self._num_params)
        out.variance = variance
        out.layout = self.layout
        return out
