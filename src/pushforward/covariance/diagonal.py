"""A diagonal covariance: independent variances per scalar parameter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.checks import (
    cached,
    check_finite,
    check_index,
    check_names,
    check_nonnegative,
    common_dtype_device,
)
from pushforward.covariance.operator import CovarianceOperator, ParamGroup

__all__ = ["Diagonal"]


class Diagonal(CovarianceOperator):
    """Σ = diag(v).

    Args:
        variances: a flat ``(P,)`` tensor in the model's flat order, or a mapping
            ``{name: tensor of that parameter's shape}``. A mapping fixes the operator's layout
            (its insertion order until :meth:`bind` puts it in the model's order).
        check: check the variances are finite and non-negative.

    ``sqrt_cols = P`` (the factor is diag(sqrt(v))). :meth:`param_groups` gives one group per
    parameter tensor and :meth:`variances` one parameter's variances in its natural shape.
    """

    def __init__(self, variances: Tensor | Mapping[str, Tensor], *, check: bool = True) -> None:
        if isinstance(variances, Mapping):
            if not variances:
                raise ValueError("Diagonal: the variances mapping is empty")
            common_dtype_device("Diagonal", {f"variances[{n!r}]": t for n, t in variances.items()})
            layout = ParamLayout.from_tensors(variances)
            flat = torch.cat([t.reshape(-1) for t in variances.values()])
        else:
            common_dtype_device("Diagonal", {"variances": variances})
            if variances.dim() != 1:
                raise ValueError(
                    f"Diagonal variances must be flat (P,) or a dict of per-parameter tensors, "
                    f"got shape {tuple(variances.shape)}"
                )
            layout, flat = None, variances
        if check:
            check_finite("Diagonal variances", flat)
            check_nonnegative("Diagonal variances", flat)
        super().__init__(flat.shape[0])
        self._var = flat
        self._named = layout is not None
        self.layout = layout
        self._cache: dict[str, Tensor] = {}

    def _fields(self) -> dict[str, Any]:
        return {"variances": self.layout.split(self._var) if self._named else self._var}

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: P."""
        return float(self.num_params)

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of the cached standard deviations ``(P,)`` (any number of rows)."""
        return self.num_params * self.dtype.itemsize  # the cached standard deviations

    def _matmul_rows(self, V: Tensor) -> Tensor:
        return V * self._var

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return Z * self._sqrt()

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return V * self._sqrt()

    def sqrt_rows_into(self, Z: Tensor, out: Tensor) -> None:
        """``out[:] = Z diag(sqrt(v))`` for rows ``Z (n, P)``, in place.

        ``Z`` may be ``out`` itself; no temporary is made.
        """
        torch.mul(Z, self._sqrt(), out=out)

    def _sqrt(self) -> Tensor:
        """Standard deviations ``(P,)`` (cached unless autograd records them)."""
        return cached(self._cache, "sqrt", self._var.sqrt, self._var)

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        return V.square() @ self._var

    def diagonal(self) -> Tensor:
        """``(P,)``: the variances ``v`` (the defining tensor itself, not a copy)."""
        return self._var

    def to_dense(self) -> Tensor:
        """``diag(v)``, ``(P, P)``."""
        return torch.diag(self._var)

    def variances(self, name: str) -> Tensor:
        """The variances of parameter ``name`` in its natural shape (needs a layout)."""
        layout = self._require_layout()
        if name not in layout.shapes:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(layout.names)}")
        return self._var[layout.slices[name]].reshape(layout.shapes[name])

    def bind(self, layout: ParamLayout) -> Diagonal:
        """Checked against ``layout``; a per-name operator is reordered to the layout's order."""
        if not self._named:
            return super().bind(layout)
        check_names("Diagonal", self.layout.names, layout)
        for n in layout.names:
            if self.layout.shapes[n] != layout.shapes[n]:
                raise ValueError(
                    f"Diagonal variances for {n!r} have shape {tuple(self.layout.shapes[n])}, but "
                    f"the parameter has shape {tuple(layout.shapes[n])}"
                )
        if self.layout == layout:
            return self
        own = self.layout.split(self._var)
        return Diagonal({n: own[n] for n in layout.names}, check=False)

    def param_groups(self) -> list[ParamGroup]:
        """One group per parameter tensor, each a :class:`Diagonal` (needs a bound layout)."""
        layout = self._require_layout()
        return [ParamGroup((n,), self.block(n)) for n in layout.names]

    def block(self, name: str) -> Diagonal:
        """The variances of parameter ``name``: a :class:`Diagonal` bound to ``layout.sub([name])``.

        Raises:
            KeyError: ``name`` is not a parameter of the layout.
        """
        layout = self._require_layout()
        out = Diagonal(self.variances(name).reshape(-1), check=False)
        out.layout = layout.sub([name])
        return out

    def marginal(self, index: Tensor) -> Diagonal:
        """The variances of the flat coordinates ``index`` ``(n,)``: unbound :class:`Diagonal`."""
        index = check_index(index, self.num_params, "marginal index").to(self.device)
        return Diagonal(self._var[index], check=False)
