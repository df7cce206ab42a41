"""Different covariance structures on different, mutually uncorrelated parameter groups."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout, match_names
from pushforward.covariance.isotropic import Isotropic
from pushforward.covariance.marginal import Marginal
from pushforward.covariance.operator import CovarianceOperator, ParamGroup

__all__ = ["BlockDiagonal"]

#: A block key: a parameter name or name prefix, or a tuple of them.
BlockKey = str | tuple[str, ...]


class BlockDiagonal(CovarianceOperator):
    """Σ = blockdiag(Σ_1, ..., Σ_m) over groups of parameter tensors.

    Args:
        blocks: ``{key: operator}``; a key is a parameter name or a name prefix (``"0"``
            selects ``"0.weight"`` and ``"0.bias"``), or a tuple of them. Each operator is
            over its parameters concatenated in the model's flat order (and is bound to
            ``layout.sub(those names)``, so e.g. a :class:`Kronecker` or per-name
            :class:`Diagonal` is checked by name).
        default: the operator over all parameters no key covers (concatenated in flat
            order); without it every selected parameter must be covered.
        layout: bind right away (else call :meth:`bind`; keys need a layout to resolve).
        check: unused (the blocks were checked when they were made).

    Example: ``BlockDiagonal({"0": Kronecker(...), ("2.weight", "2.bias"): Dense(S)},
    default=Isotropic(1.0))``.

    Every selected parameter must be covered exactly once. Groups need not be contiguous in
    the flat vector. ``sqrt_cols`` is the sum of the blocks' (their square-root columns are
    concatenated in block order: the keys' order, then the default). :meth:`param_groups` is
    the union of the blocks' groups; :attr:`blocks` lists the blocks themselves.
    """

    def __init__(
        self,
        blocks: Mapping[BlockKey, CovarianceOperator],
        default: CovarianceOperator | None = None,
        layout: ParamLayout | None = None,
        *,
        check: bool = True,
    ) -> None:
        for key, op in [*blocks.items(), ("default", default)]:
            if op is not None and not isinstance(op, CovarianceOperator):
                raise TypeError(
                    f"BlockDiagonal block {key!r} must be a CovarianceOperator, got {type(op).__name__}"
                )
            if not (
                isinstance(key, str)
                or (isinstance(key, tuple) and key and all(isinstance(k, str) for k in key))
            ):
                raise TypeError(f"BlockDiagonal keys must be names or tuples of names, got {key!r}")
        if not blocks and default is None:
            raise ValueError("BlockDiagonal needs at least one block or a default")
        super().__init__(None)
        self._spec = dict(blocks)
        self._default = default
        self._groups: list[ParamGroup] | None = None
        self._perm: Tensor | None = None
        if layout is not None:
            self._resolve(layout)

    def _fields(self) -> dict[str, Any]:
        return {"blocks": self._spec, "default": self._default, "layout": self.layout}

    # -- binding ---------------------------------------------------------------------------
    def _resolve(self, layout: ParamLayout) -> None:
        owner: dict[str, BlockKey] = {}
        resolved: list[tuple[BlockKey, tuple[str, ...], CovarianceOperator]] = []
        for key, op in self._spec.items():
            wanted = [key] if isinstance(key, str) else list(key)
            hits, missing = match_names(layout.names, wanted)
            if missing:
                raise ValueError(
                    f"BlockDiagonal key {key!r}: no selected parameter is named or prefixed "
                    f"{missing[0]!r}; selected parameters: {list(layout.names)}"
                )
            names = list(hits)
            for n in names:
                if n in owner and owner[n] != key:
                    raise ValueError(
                        f"BlockDiagonal: parameter {n!r} is covered by both {owner[n]!r} and {key!r}"
                    )
                owner[n] = key
            resolved.append((key, layout.sub(names).names, op))
        rest = tuple(n for n in layout.names if n not in owner)
        if rest:
            if self._default is None:
                raise ValueError(
                    f"BlockDiagonal covers no block for the selected parameters {list(rest)}; "
                    "add keys for them or pass default=..."
                )
            resolved.append(("default", rest, self._default))
        groups = []
        for key, names, op in resolved:
            try:
                groups.append(ParamGroup(names, op.bind(layout.sub(names))))
            except ValueError as err:
                raise ValueError(f"BlockDiagonal block {key!r} ({list(names)}): {err}") from err
        self._set_groups(_common_dtype(groups), layout)

    def _set_groups(self, groups: list[ParamGroup], layout: ParamLayout) -> None:
        self._groups = groups
        self.layout = layout
        self._num_params = sum(g.operator.num_params for g in groups)
        self._sqrt_cols = sum(g.operator.sqrt_cols for g in groups)
        perm = torch.cat([layout.index(g.names) for g in groups])
        identity = bool((perm == torch.arange(perm.numel())).all())
        self._perm = None if identity else perm.to(groups[0].operator.device)

    def bind(self, layout: ParamLayout) -> BlockDiagonal:
        """Resolve the keys against ``layout`` and bind every block to its sub-layout."""
        if self.layout == layout:
            return self
        return BlockDiagonal(self._spec, self._default, layout)

    def _bound(self) -> list[ParamGroup]:
        if self._groups is None:
            raise ValueError(
                "BlockDiagonal resolves its blocks by parameter name; call "
                ".bind(functional_model.layout) first"
            )
        return self._groups

    @property
    def blocks(self) -> list[ParamGroup]:
        """The blocks as ``(names, operator)`` groups, in block order (needs a layout)."""
        return list(self._bound())

    def __repr__(self) -> str:
        if self._groups is None:
            keys = [*self._spec, *(["default"] if self._default is not None else [])]
            return f"BlockDiagonal(unbound, blocks={keys})"
        inner = ", ".join(f"{list(g.names)}: {g.operator!r}" for g in self._groups)
        return f"BlockDiagonal(P={self.num_params}, {{{inner}}})"

    # -- sizes, dtype, costs ---------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """The blocks' floating-point defining tensors.

        An unbound operator prefers blocks with a dtype of their own (an :class:`Isotropic` from a
        Python number has none until it is cast).
        """
        return [t for op in self._operators() for t in op.tensors()]

    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: the sum over the blocks."""
        return sum(g.operator.matmul_flops() for g in self._bound())

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` for one vector: the sum over the blocks."""
        return sum(g.operator.sqrt_flops() for g in self._bound())

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of temporaries for ``rows`` rows.

        The blocks' own, plus the rows gathered into block order and scattered back (two
        ``(rows, P)`` tensors).
        """
        parts = sum(g.operator.workspace_bytes(rows) for g in self._bound())
        return parts + 2 * rows * self.num_params * self.dtype.itemsize

    def _operators(self) -> list[CovarianceOperator]:
        if self._groups is not None:
            return [g.operator for g in self._groups]
        ops = [*self._spec.values(), *([self._default] if self._default is not None else [])]
        return [op for op in ops if not _from_number(op)] or ops

    # -- products ------------------------------------------------------------------------------
    def _gather(self, V: Tensor) -> list[Tensor]:
        """``(n, P)`` -> each block's columns, in block order."""
        if self._perm is not None:
            V = V[:, self._perm]
        return list(torch.split(V, [g.operator.num_params for g in self._bound()], dim=-1))

    def _scatter(self, parts: list[Tensor]) -> Tensor:
        """Each block's ``(n, p_b)`` columns -> ``(n, P)`` in flat order."""
        out = torch.cat(parts, dim=-1)
        if self._perm is None:
            return out
        return out.new_zeros(out.shape).index_copy(1, self._perm, out)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        parts = self._gather(V)
        return self._scatter(
            [g.operator.matmul_rows(X) for g, X in zip(self._bound(), parts, strict=True)]
        )

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        parts = torch.split(Z, [g.operator.sqrt_cols for g in self._bound()], dim=-1)
        return self._scatter(
            [g.operator.sqrt_rows(X) for g, X in zip(self._bound(), parts, strict=True)]
        )

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        parts = self._gather(V)
        return torch.cat(
            [g.operator.sqrt_t_rows(X) for g, X in zip(self._bound(), parts, strict=True)], dim=-1
        )

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        parts = self._gather(V)
        return sum(g.operator.quadratic_rows(X) for g, X in zip(self._bound(), parts, strict=True))

    def diagonal(self) -> Tensor:
        """``(P,)``: the blocks' variances, each at its parameters' flat positions."""
        return self._scatter([g.operator.diagonal().unsqueeze(0) for g in self._bound()]).squeeze(0)

    # -- structure -----------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        """The union of the blocks' parameter groups, in block order (needs a bound layout)."""
        return [sub for g in self._bound() for sub in g.operator.param_groups()]

    def block(self, name: str) -> CovarianceOperator:
        """The covariance of parameter ``name`` alone: the ``block(name)`` of the block covering it.

        Raises:
            KeyError: ``name`` is not a selected parameter.
        """
        for g in self._bound():
            if name in g.names:
                return g.operator.block(name)
        raise KeyError(
            f"unknown parameter {name!r}; parameters: {list(self._require_layout().names)}"
        )

    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The covariance of the flat coordinates ``index`` ``(n,)``.

        A :class:`Marginal` of this operator (blocks may straddle the selection), unbound.
        """
        return Marginal(self, index)


def _common_dtype(groups: list[ParamGroup]) -> list[ParamGroup]:
    """Cast blocks made from Python numbers (:class:`Isotropic`) to the others' dtype/device.

    The other blocks must agree on dtype and device.
    """
    fixed = [g for g in groups if not _from_number(g.operator)]
    kinds = {(str(g.operator.dtype), str(g.operator.device)) for g in fixed}
    if len(kinds) > 1:
        detail = {g.names: (g.operator.dtype, str(g.operator.device)) for g in fixed}
        raise ValueError(
            f"BlockDiagonal blocks have different dtypes/devices: {detail}; cast them with .to(...)"
        )
    if not fixed:
        return groups
    dtype, device = fixed[0].operator.dtype, fixed[0].operator.device
    return [
        ParamGroup(g.names, g.operator.to(dtype=dtype, device=device))
        if _from_number(g.operator)
        else g
        for g in groups
    ]


def _from_number(op: CovarianceOperator) -> bool:
    """An :class:`Isotropic` whose variance was a Python number (no dtype/device of its own)."""
    return isinstance(op, Isotropic) and op.from_number
