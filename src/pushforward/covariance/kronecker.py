"""Kronecker-factored covariance: one block per parameter tensor, B ⊗ A per weight (K-FAC)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.checks import (
    check_finite,
    check_matrix,
    check_names,
    check_nonnegative,
    common_dtype_device,
)
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker_blocks import KroneckerBlock, KroneckerEigen, KroneckerFactors
from pushforward.covariance.marginal import Marginal
from pushforward.covariance.operator import CovarianceOperator, ParamGroup

__all__ = ["Kronecker"]

#: What a user may give for one parameter: a factor pair ``(B, A)``, one covariance ``(C,)`` or
#: ``C``, or any covariance operator over the parameter's entries (KroneckerFactors,
#: KroneckerEigen, Dense, Diagonal, ...).
BlockSpec = CovarianceOperator | Tensor | Sequence[Tensor]


class Kronecker(CovarianceOperator):
    """Block-diagonal over parameter tensors with a Kronecker-factored block per weight.

    Args:
        factors: per parameter, in the model's order as a sequence or by name as a mapping
            (insertion order until :meth:`bind`), each one of

            * ``(B, A)`` or :class:`KroneckerFactors`: Σ_W = B ⊗ A for a weight of shape
              ``(out, in...)`` flattened row-major, B ``(out, out)``, A ``(in_flat, in_flat)``
              with ``in_flat = prod(shape[1:])`` (a conv weight ``(out, in, kh, kw)`` has
              ``in_flat = in*kh*kw``);
            * :class:`KroneckerEigen`: the same block in eigen form;
            * ``(C,)``, a tensor ``C`` or a :class:`Dense`: one full covariance ``(n, n)`` over
              the parameter's ``n`` entries (a bias, or any tensor); or any other operator of
              that size.
        check: check the tensors given as such (operators were checked when they were made).

    laplace-torch's eigendecomposed *precision* (``KronDecomposed``) is read by
    :meth:`from_kron_decomposed` / :meth:`from_precision_eigen`.

    Every product is the blocks' products side by side: O(out² in + out in²) per row and
    weight. ``sqrt_cols = P``. :attr:`blocks` gives the block operators by name (after
    :meth:`bind`).
    """

    def __init__(
        self, factors: Mapping[str, BlockSpec] | Sequence[BlockSpec], *, check: bool = True
    ) -> None:
        if isinstance(factors, Mapping):
            names: tuple[str, ...] | None = tuple(factors)
            specs = list(factors.values())
            labels = [repr(n) for n in factors]
        else:
            names, specs = None, list(factors)
            labels = [f"#{i}" for i in range(len(specs))]
        if not specs:
            raise ValueError("Kronecker needs the factors of at least one parameter")
        blocks = tuple(
            _as_block(s, f"Kronecker factors for {label}", check)
            for s, label in zip(specs, labels, strict=True)
        )
        kinds = {(str(b.dtype), str(b.device)) for b in blocks}
        if len(kinds) > 1:
            raise ValueError(f"Kronecker blocks have different dtypes/devices {sorted(kinds)}")
        super().__init__(sum(b.num_params for b in blocks))
        self._blocks = blocks
        self._names = names

    def _fields(self) -> dict[str, Any]:
        if self._names is None:
            return {"factors": list(self._blocks)}
        return {"factors": dict(zip(self._names, self._blocks, strict=True))}

    # -- laplace-torch's eigendecomposed precision ---------------------------------------
    @classmethod
    def from_precision_eigen(
        cls,
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: float | Tensor = 0.0,
        damping: bool = False,
        scale: float | Tensor = 1.0,
    ) -> Kronecker:
        """The covariance whose per-parameter *precision* is given in eigen form.

        Read exactly as laplace-torch's ``KronDecomposed`` interprets it (parameters in the model's
        order).

        Args:
            eigenvectors: per parameter ``[Q1, Q2]`` (weight: Q1 ``(out, out)``, Q2
                ``(in_flat, in_flat)``), ``[Q]`` (one factor ``(n, n)``) or ``[]`` (a diagonal
                precision: no eigenvectors).
            eigenvalues: per parameter ``[l1, l2]`` (``(out,)``, ``(in_flat,)``) or ``[l]``.
            deltas: the additive prior precision: a scalar, or one value per parameter.
            damping: laplace-torch's damped form for factor pairs.
            scale: multiplies the curvature like ``KronDecomposed * scale``: each of a
                block's ``m`` eigenvalue vectors is scaled by ``scale ** (1/m)``.

        Returns:
            A :class:`Kronecker` with one block per parameter, unbound.

        Raises:
            ValueError: the groups do not match, shapes disagree, values are not finite, or a
                block's precision has an eigenvalue <= 0 (not invertible).

        A factor pair's precision eigenvalues are ``l1 ⊗ l2 + δ``, or with damping
        ``(l1 + sqrt(δ)) ⊗ (l2 + sqrt(δ))``; a single factor's are ``l + δ``
        (:meth:`precision_eigenvalues`). The covariance block is ``(Q1 ⊗ Q2) diag(1 / precision
        eigenvalues) (Q1 ⊗ Q2)^T`` (a :class:`KroneckerEigen`), ``Q diag(1/(l + δ)) Q^T`` for a
        single factor (a :class:`Dense` with square root ``Q diag((l + δ)^{-1/2})``), or
        ``diag(1/(l + δ))`` without eigenvectors (a :class:`Diagonal`).
        """
        if len(eigenvectors) != len(eigenvalues) or not eigenvalues:
            raise ValueError(
                f"Kronecker.from_precision_eigen: got {len(eigenvectors)} eigenvector and "
                f"{len(eigenvalues)} eigenvalue groups; they must match and be non-empty"
            )
        ref = eigenvalues[0][0]
        deltas = torch.as_tensor(deltas, dtype=ref.dtype, device=ref.device)
        if deltas.dim() > 1 or deltas.numel() not in (1, len(eigenvalues)):
            raise ValueError(
                f"Kronecker deltas must be a scalar or have one value per parameter "
                f"({len(eigenvalues)}), got shape {tuple(deltas.shape)}"
            )
        check_finite("Kronecker deltas", deltas)
        check_nonnegative("Kronecker deltas (prior precision)", deltas)
        deltas = deltas.reshape(-1).expand(len(eigenvalues))
        blocks: list[CovarianceOperator] = []
        for i, (Qs, ls) in enumerate(zip(eigenvectors, eigenvalues, strict=True)):
            label = f"Kronecker precision block #{i}"
            diagonal = len(Qs) == 0 and len(ls) == 1
            if not diagonal and (len(Qs) != len(ls) or len(ls) not in (1, 2)):
                raise ValueError(
                    f"{label}: expected 1 or 2 eigenvector/eigenvalue pairs (or one eigenvalue "
                    f"vector alone), got {len(Qs)} eigenvector and {len(ls)} eigenvalue tensors"
                )
            for j, (Q, lam) in enumerate(zip(Qs, ls, strict=False)):
                common_dtype_device(label, {f"eigenvectors[{j}]": Q, f"eigenvalues[{j}]": lam})
                check_matrix(f"{label} eigenvectors[{j}]", Q)
                check_finite(f"{label} eigenvectors[{j}]", Q)
                if lam.shape != (Q.shape[0],):
                    raise ValueError(
                        f"{label}: eigenvalues[{j}] has shape {tuple(lam.shape)}, expected "
                        f"({Q.shape[0]},) to match eigenvectors[{j}]"
                    )
            for j, lam in enumerate(ls):
                check_finite(f"{label} eigenvalues[{j}]", lam)
            precision = cls.precision_eigenvalues(ls, deltas[i], damping, scale)
            if bool((precision <= 0).any()):
                raise ValueError(
                    f"{label} has {int((precision <= 0).sum())} precision eigenvalues <= 0 "
                    f"(smallest {precision.min().item():.3g}); it is not invertible — add a "
                    "positive prior precision (deltas)"
                )
            if diagonal:
                blocks.append(Diagonal(precision.reciprocal(), check=False))
            elif len(ls) == 1:
                blocks.append(Dense.from_factor(Qs[0] * precision.rsqrt(), check=False))
            else:
                blocks.append(KroneckerEigen(Qs[0], Qs[1], precision.reciprocal(), check=False))
        return cls(blocks, check=False)

    @staticmethod
    def precision_eigenvalues(
        eigenvalues: Sequence[Tensor],
        delta: Tensor,
        damping: bool = False,
        scale: float | Tensor = 1.0,
    ) -> Tensor:
        """A block's precision eigenvalues from its curvature's (see :meth:`from_precision_eigen`).

        Args:
            eigenvalues: the curvature's eigenvalue vectors ``[l1, l2]`` (a factor pair) or ``[l]``
                (one factor, or a diagonal).
            delta: the prior precision δ, a scalar tensor.
            damping: laplace-torch's damped form for a factor pair.
            scale: the curvature's scale.

        Returns:
            ``scale l1 ⊗ l2 + δ`` ``(out, in_flat)`` for a factor pair (damped:
            ``(sqrt(scale) l1 + sqrt(δ)) ⊗ (sqrt(scale) l2 + sqrt(δ))``), ``scale l + δ`` ``(n,)``
            for one factor or a diagonal. Differentiable in ``delta`` and ``scale``.
        """
        factor = scale ** (1 / len(eigenvalues))
        ls = [factor * lam for lam in eigenvalues]
        if len(ls) == 1:
            return ls[0] + delta
        if damping:
            root = delta.sqrt()
            return torch.outer(ls[0] + root, ls[1] + root)
        return torch.outer(ls[0], ls[1]) + delta

    @classmethod
    def from_kron_decomposed(
        cls, kd: Any, prior_precision: float | Tensor | None = None, scale: float | Tensor = 1.0
    ) -> Kronecker:
        """The covariance of laplace-torch's ``KronDecomposed`` precision ``kd``.

        ``kd.eigenvectors``, ``kd.eigenvalues``, ``kd.deltas`` and ``kd.damping`` are read as
        in :meth:`from_precision_eigen`. With ``scale``/``prior_precision`` the precision is
        ``kd * scale + prior_precision`` in laplace-torch's arithmetic, except that
        ``kd.damping`` is kept (laplace-torch 0.3's ``*`` and ``+`` reset it to False). For a
        fitted ``KronLaplace`` pass ``la.posterior_precision`` as is (see ``from_laplace``).
        """
        deltas = kd.deltas
        if prior_precision is not None:
            deltas = deltas + torch.as_tensor(
                prior_precision, dtype=deltas.dtype, device=deltas.device
            )
        return cls.from_precision_eigen(
            kd.eigenvectors, kd.eigenvalues, deltas=deltas, damping=bool(kd.damping), scale=scale
        )

    # -- costs -----------------------------------------------------------------------------
    def matmul_flops(self) -> float:
        """Floating-point operations of ``Σ v`` for one vector: the sum over the blocks."""
        return float(sum(b.matmul_flops() for b in self._blocks))

    def sqrt_flops(self) -> float:
        """Floating-point operations of ``L z`` for one vector: the sum over the blocks."""
        return float(sum(b.sqrt_flops() for b in self._blocks))

    def workspace_bytes(self, rows: int) -> int:
        """Bytes of temporaries for ``rows`` rows.

        The blocks' own, plus the rows split into blocks and concatenated back (two ``(rows, P)``
        tensors).
        """
        parts = sum(b.workspace_bytes(rows) for b in self._blocks)
        return parts + 2 * rows * self.num_params * self.dtype.itemsize  # split and concatenated

    # -- products ---------------------------------------------------------------------------
    def _split(self, V: Tensor) -> tuple[Tensor, ...]:
        return torch.split(V, [b.num_params for b in self._blocks], dim=-1)

    def _matmul_rows(self, V: Tensor) -> Tensor:
        parts = self._split(V)
        return torch.cat([b.matmul_rows(X) for b, X in zip(self._blocks, parts, strict=True)], -1)

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        parts = self._split(Z)
        return torch.cat([b.sqrt_rows(X) for b, X in zip(self._blocks, parts, strict=True)], -1)

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        parts = self._split(V)
        return torch.cat([b.sqrt_t_rows(X) for b, X in zip(self._blocks, parts, strict=True)], -1)

    def _quadratic_rows(self, V: Tensor) -> Tensor:
        parts = self._split(V)
        return sum(b.quadratic_rows(X) for b, X in zip(self._blocks, parts, strict=True))

    def diagonal(self) -> Tensor:
        """``(P,)``: the blocks' variances, concatenated in parameter order."""
        return torch.cat([b.diagonal() for b in self._blocks])

    # -- structure ----------------------------------------------------------------------------
    def bind(self, layout: ParamLayout) -> Kronecker:
        """Checked against ``layout`` (one block per parameter, shapes matching), in its order."""
        if self.layout == layout:
            return self
        if self._names is None:
            if len(self._blocks) != len(layout.names):
                raise ValueError(
                    f"Kronecker has {len(self._blocks)} parameter blocks, but the model selects "
                    f"{len(layout.names)} parameters {list(layout.names)}"
                )
            blocks = self._blocks
        else:
            check_names("Kronecker", self._names, layout)
            by_name = dict(zip(self._names, self._blocks, strict=True))
            blocks = tuple(by_name[n] for n in layout.names)
        for name, b in zip(layout.names, blocks, strict=True):
            _check_block_shape(name, b, layout.shapes[name])
        out = type(self)(dict(zip(layout.names, blocks, strict=True)), check=False)
        out.layout = layout
        return out

    @property
    def blocks(self) -> dict[str, CovarianceOperator]:
        """The block operator of every parameter, by name (after :meth:`bind` has named them)."""
        return dict(zip(self._require_names(), self._blocks, strict=True))

    def factors(self, name: str) -> KroneckerFactors | KroneckerEigen | Tensor:
        """The block of parameter ``name``, in its Kronecker form where it has one.

        Returns:
            Its :class:`KroneckerFactors` or :class:`KroneckerEigen`, or for any other block its
            dense covariance ``(n, n)`` over the parameter's ``n`` entries.

        Raises:
            KeyError: ``name`` is not one of the named parameters.
        """
        b = self._block_of(name)
        return b if isinstance(b, KroneckerBlock) else b.to_dense()

    def _require_names(self) -> tuple[str, ...]:
        if self._names is None:
            raise ValueError(
                "Kronecker was given its factors by position; call .bind(functional_model.layout) "
                "to name them"
            )
        return self._names

    def _block_of(self, name: str) -> CovarianceOperator:
        names = self._require_names()
        if name not in names:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(names)}")
        return self._blocks[names.index(name)]

    def param_groups(self) -> list[ParamGroup]:
        """One group per parameter tensor: its block, bound to ``layout.sub([name])``.

        Needs a bound layout (:meth:`bind`).
        """
        layout = self._require_layout()
        return [ParamGroup((n,), self._block_of(n).bind(layout.sub([n]))) for n in layout.names]

    def block(self, name: str) -> Kronecker:
        """The covariance of parameter ``name`` alone: a one-block :class:`Kronecker`.

        It is bound to ``layout.sub([name])``.

        Raises:
            KeyError: ``name`` is not a parameter of the layout.
        """
        layout = self._require_layout()
        if name not in layout.shapes:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(layout.names)}")
        out = Kronecker({name: self._block_of(name)}, check=False)
        out.layout = layout.sub([name])
        return out

    def marginal(self, index: Tensor) -> CovarianceOperator:
        """The covariance of the flat coordinates ``index`` ``(n,)``.

        A :class:`Marginal` of this operator (the selection may cut through Kronecker blocks),
        unbound.
        """
        return Marginal(self, index)


def _as_block(spec: BlockSpec, label: str, check: bool) -> CovarianceOperator:
    try:
        if isinstance(spec, CovarianceOperator):
            return spec
        if isinstance(spec, Tensor):
            return Dense(spec, check=check)
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            return KroneckerFactors(spec[0], spec[1], check=check)
        if isinstance(spec, (tuple, list)) and len(spec) == 1:
            return Dense(spec[0], check=check)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{label}: {err}") from err
    length = f" of length {len(spec)}" if isinstance(spec, (tuple, list)) else ""
    raise TypeError(
        f"{label}: expected (B, A), (C,), a tensor C or a covariance operator (KroneckerFactors, "
        f"KroneckerEigen, Dense, ...); got {type(spec).__name__}{length}"
    )


def _check_block_shape(name: str, b: CovarianceOperator, shape: torch.Size) -> None:
    if isinstance(b, KroneckerBlock):
        b.check_weight(name, shape)
        return
    numel = math.prod(shape)
    if b.num_params != numel:
        raise ValueError(
            f"Kronecker covariance for {name!r} is {b.num_params}x{b.num_params}, but the "
            f"parameter of shape {tuple(shape)} has {numel} entries"
        )
