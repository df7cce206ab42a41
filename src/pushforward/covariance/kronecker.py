"""Kronecker-factored covariance: one B ⊗ A block per weight tensor (K-FAC style)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.checks import (
    cached,
    check_matrix,
    check_names,
    check_nonnegative,
    check_symmetric,
    common_dtype_device,
    psd_sqrt,
)
from pushforward.covariance.dense import Dense
from pushforward.covariance.operator import CovarianceOperator, ParamGroup, check_finite

__all__ = ["Kronecker", "KroneckerEigen", "KroneckerFactors"]


@dataclass(frozen=True)
class KroneckerFactors:
    """The covariance block of one weight ``W`` of shape ``(out, *in_shape)`` flattened row-major:
    Σ_W = B ⊗ A exactly, i.e. ``Cov(W[o, i], W[o', i']) = B[o, o'] A[i, i']`` with ``i`` the
    row-major index over ``in_shape``.

    Attributes:
        out_factor: B, ``(out, out)``, symmetric PSD.
        in_factor: A, ``(in_flat, in_flat)``, symmetric PSD, ``in_flat = prod(in_shape)``.
    """

    out_factor: Tensor
    in_factor: Tensor


@dataclass(frozen=True)
class KroneckerEigen:
    """The covariance block of one weight in eigen form:
    Σ_W = (Q_out ⊗ Q_in) diag(vec(eigvals)) (Q_out ⊗ Q_in)^T (row-major ``vec``).

    Attributes:
        out_eigvecs: Q_out, ``(out, out)``, orthogonal.
        in_eigvecs: Q_in, ``(in_flat, in_flat)``, orthogonal.
        eigvals: ``(out, in_flat)``, the non-negative covariance eigenvalues (prior, scale and
            inversion already applied).
    """

    out_eigvecs: Tensor
    in_eigvecs: Tensor
    eigvals: Tensor


#: A per-parameter block: a factor pair, an eigen form, or one dense covariance (n, n).
Block = KroneckerFactors | KroneckerEigen | Dense
#: What a user may give for one parameter.
BlockSpec = KroneckerFactors | KroneckerEigen | Dense | Tensor | Sequence[Tensor]


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
              the parameter's ``n`` entries (a bias, or any tensor).

    laplace-torch's eigendecomposed *precision* (``KronDecomposed``) is read by
    :meth:`from_kron_decomposed` / :meth:`from_precision_eigen`.

    Products cost O(out² in + out in²) per row and block; factors are never eigendecomposed
    (the square root of a factor pair is ``chol(B) ⊗ chol(A)``, with the clamped eigen square
    root only as the fallback for singular factors). ``sqrt_cols = P``. :meth:`factors` gives one
    parameter's block for the layer-structured path.
    """

    def __init__(self, factors: Mapping[str, BlockSpec] | Sequence[BlockSpec]) -> None:
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
            _as_block(s, f"Kronecker factors for {label}")
            for s, label in zip(specs, labels, strict=True)
        )
        self._init(blocks, names)

    def _init(self, blocks: tuple[Block, ...], names: tuple[str, ...] | None) -> None:
        self._blocks = blocks
        self._names = names
        self._sizes = [_block_size(b) for b in blocks]
        dtypes = {_block_dtype_device(b) for b in blocks}
        if len(dtypes) > 1:
            raise ValueError(
                f"Kronecker blocks have different dtypes/devices {sorted(map(str, dtypes))}"
            )
        self._dtype, self._device = dtypes.pop()
        self._cache: dict[str, Any] = {}

    @classmethod
    def _from_blocks(cls, blocks: tuple[Block, ...], names: tuple[str, ...] | None) -> Kronecker:
        out = cls.__new__(cls)
        out._init(blocks, names)
        return out

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
        """The covariance whose per-parameter *precision* is given in eigen form, exactly as
        laplace-torch's ``KronDecomposed`` interprets it (parameters in the model's order).

        Args:
            eigenvectors: per parameter ``[Q1, Q2]`` (weight: Q1 ``(out, out)``, Q2
                ``(in_flat, in_flat)``) or ``[Q]`` (one factor ``(n, n)``).
            eigenvalues: per parameter ``[l1, l2]`` (``(out,)``, ``(in_flat,)``) or ``[l]``.
            deltas: the additive prior precision: a scalar, or one value per parameter.
            damping: laplace-torch's damped form for factor pairs.
            scale: multiplies the curvature like ``KronDecomposed * scale``: each of a
                block's ``m`` eigenvalue vectors is scaled by ``scale ** (1/m)``.

        A factor pair's precision eigenvalues are ``l1 ⊗ l2 + δ``, or with damping
        ``(l1 + sqrt(δ)) ⊗ (l2 + sqrt(δ))``; a single factor's are ``l + δ``. The covariance
        block is ``(Q1 ⊗ Q2) diag(1 / precision eigenvalues) (Q1 ⊗ Q2)^T`` (a
        :class:`KroneckerEigen`), or ``Q diag(1/(l + δ)) Q^T`` for a single factor (a
        :class:`Dense` with square root ``Q diag((l + δ)^{-1/2})``).
        """
        if len(eigenvectors) != len(eigenvalues) or not eigenvectors:
            raise ValueError(
                f"Kronecker.from_precision_eigen: got {len(eigenvectors)} eigenvector and "
                f"{len(eigenvalues)} eigenvalue groups; they must match and be non-empty"
            )
        ref = eigenvectors[0][0]
        deltas = torch.as_tensor(deltas, dtype=ref.dtype, device=ref.device)
        if deltas.dim() > 1 or deltas.numel() not in (1, len(eigenvalues)):
            raise ValueError(
                f"Kronecker deltas must be a scalar or have one value per parameter "
                f"({len(eigenvalues)}), got shape {tuple(deltas.shape)}"
            )
        check_finite("Kronecker deltas", deltas)
        check_nonnegative("Kronecker deltas (prior precision)", deltas)
        deltas = deltas.reshape(-1).expand(len(eigenvalues))
        blocks = []
        for i, (Qs, ls) in enumerate(zip(eigenvectors, eigenvalues, strict=True)):
            label = f"Kronecker precision block #{i}"
            if len(Qs) != len(ls) or len(ls) not in (1, 2):
                raise ValueError(
                    f"{label}: expected 1 or 2 eigenvector/eigenvalue pairs, got "
                    f"{len(Qs)} eigenvector and {len(ls)} eigenvalue tensors"
                )
            for j, (Q, lam) in enumerate(zip(Qs, ls, strict=True)):
                common_dtype_device(label, {f"eigenvectors[{j}]": Q, f"eigenvalues[{j}]": lam})
                check_matrix(f"{label} eigenvectors[{j}]", Q)
                if lam.shape != (Q.shape[0],):
                    raise ValueError(
                        f"{label}: eigenvalues[{j}] has shape {tuple(lam.shape)}, expected "
                        f"({Q.shape[0]},) to match eigenvectors[{j}]"
                    )
                check_finite(f"{label} eigenvalues[{j}]", lam)
            factor = scale ** (1 / len(ls))
            ls = [factor * lam for lam in ls]
            delta = deltas[i]
            if len(ls) == 1:
                precision = ls[0] + delta
            elif damping:
                root = delta.sqrt()
                precision = torch.outer(ls[0] + root, ls[1] + root)
            else:
                precision = torch.outer(ls[0], ls[1]) + delta
            if bool((precision <= 0).any()):
                raise ValueError(
                    f"{label} has {int((precision <= 0).sum())} precision eigenvalues <= 0 "
                    f"(smallest {precision.min().item():.3g}); it is not invertible — add a "
                    "positive prior precision (deltas)"
                )
            if len(ls) == 1:
                blocks.append(Dense.from_factor(Qs[0] * precision.rsqrt()))
            else:
                blocks.append(KroneckerEigen(Qs[0], Qs[1], precision.reciprocal()))
        return cls(blocks)

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

    # -- sizes -----------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    @property
    def sqrt_cols(self) -> int:
        return self.num_params

    def matmul_flops(self) -> float:
        return float(sum(_block_flops(b) for b in self._blocks))

    def sqrt_flops(self) -> float:
        return self.matmul_flops() / 2

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    # -- per-block products ---------------------------------------------------------------
    def _chol(self, i: int) -> tuple[Tensor, Tensor]:
        b = self._blocks[i]
        return cached(
            self._cache,
            f"chol{i}",
            lambda: (
                psd_sqrt(b.out_factor, f"Kronecker out_factor of block #{i}"),
                psd_sqrt(b.in_factor, f"Kronecker in_factor of block #{i}"),
            ),
            b.out_factor,
            b.in_factor,
        )

    def _rows(self, V: Tensor, op: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Apply ``op(block index, that block's columns)`` and concatenate."""
        parts = torch.split(V, self._sizes, dim=-1)
        return torch.cat([op(i, X) for i, X in enumerate(parts)], dim=-1)

    def _block_matmul(self, i: int, X: Tensor) -> Tensor:
        b = self._blocks[i]
        if isinstance(b, Dense):
            return b._matmul_rows(X)
        n = X.shape[0]
        if isinstance(b, KroneckerFactors):
            B, A = b.out_factor, b.in_factor
            return (B @ X.reshape(n, B.shape[0], A.shape[0]) @ A.T).reshape(n, -1)
        Qo, Qi = b.out_eigvecs, b.in_eigvecs
        Y = Qo.T @ X.reshape(n, Qo.shape[0], Qi.shape[0]) @ Qi
        return (Qo @ (Y * b.eigvals) @ Qi.T).reshape(n, -1)

    def _block_sqrt(self, i: int, Z: Tensor) -> Tensor:
        b = self._blocks[i]
        if isinstance(b, Dense):
            return b._sqrt_rows(Z)
        n = Z.shape[0]
        if isinstance(b, KroneckerFactors):
            LB, LA = self._chol(i)
            return (LB @ Z.reshape(n, LB.shape[0], LA.shape[0]) @ LA.T).reshape(n, -1)
        Qo, Qi = b.out_eigvecs, b.in_eigvecs
        Zr = Z.reshape(n, Qo.shape[0], Qi.shape[0])
        return (Qo @ (Zr * b.eigvals.sqrt()) @ Qi.T).reshape(n, -1)

    def _block_sqrt_t(self, i: int, X: Tensor) -> Tensor:
        b = self._blocks[i]
        if isinstance(b, Dense):
            return b._sqrt_t_rows(X)
        n = X.shape[0]
        if isinstance(b, KroneckerFactors):
            LB, LA = self._chol(i)
            return (LB.T @ X.reshape(n, LB.shape[0], LA.shape[0]) @ LA).reshape(n, -1)
        Qo, Qi = b.out_eigvecs, b.in_eigvecs
        Y = Qo.T @ X.reshape(n, Qo.shape[0], Qi.shape[0]) @ Qi
        return (Y * b.eigvals.sqrt()).reshape(n, -1)

    def _block_quadratic(self, i: int, X: Tensor) -> Tensor:
        b = self._blocks[i]
        if isinstance(b, Dense):
            return b.quadratic_rows(X)
        n = X.shape[0]
        if isinstance(b, KroneckerFactors):
            B, A = b.out_factor, b.in_factor
            Xr = X.reshape(n, B.shape[0], A.shape[0])
            return (Xr * (B @ Xr @ A.T)).sum((-2, -1))
        Qo, Qi = b.out_eigvecs, b.in_eigvecs
        Y = Qo.T @ X.reshape(n, Qo.shape[0], Qi.shape[0]) @ Qi
        return (Y.square() * b.eigvals).sum((-2, -1))

    def _block_diagonal(self, i: int) -> Tensor:
        b = self._blocks[i]
        if isinstance(b, Dense):
            return b.diagonal()
        if isinstance(b, KroneckerFactors):
            return torch.outer(b.out_factor.diagonal(), b.in_factor.diagonal()).reshape(-1)
        return (b.out_eigvecs.square() @ b.eigvals @ b.in_eigvecs.square().T).reshape(-1)

    # -- row forms ----------------------------------------------------------------------------
    def _matmul_rows(self, V: Tensor) -> Tensor:
        return self._rows(V, self._block_matmul)

    def _sqrt_rows(self, Z: Tensor) -> Tensor:
        return self._rows(Z, self._block_sqrt)

    def _sqrt_t_rows(self, V: Tensor) -> Tensor:
        return self._rows(V, self._block_sqrt_t)

    def quadratic_rows(self, V: Tensor) -> Tensor:
        parts = torch.split(V, self._sizes, dim=-1)
        return sum(self._block_quadratic(i, X) for i, X in enumerate(parts))

    def diagonal(self) -> Tensor:
        return torch.cat([self._block_diagonal(i) for i in range(len(self._blocks))])

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
        out = Kronecker._from_blocks(blocks, layout.names)
        out.layout = layout
        return out

    def factors(self, name: str) -> KroneckerFactors | KroneckerEigen | Tensor:
        """The block of parameter ``name``: :class:`KroneckerFactors`, :class:`KroneckerEigen`,
        or for a single-factor parameter its dense covariance ``(n, n)``."""
        if self._names is None:
            raise ValueError(
                "Kronecker was given its factors by position; call .bind(functional_model.layout) "
                "to name them"
            )
        if name not in self._names:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(self._names)}")
        b = self._blocks[self._names.index(name)]
        return b.to_dense() if isinstance(b, Dense) else b

    def param_groups(self) -> list[ParamGroup]:
        layout = self._require_layout()
        return [ParamGroup((n,), self.block(n)) for n in layout.names]

    def block(self, name: str) -> Kronecker:
        layout = self._require_layout()
        if name not in layout.shapes:
            raise KeyError(f"unknown parameter {name!r}; parameters: {list(layout.names)}")
        out = Kronecker._from_blocks((self._blocks[layout.names.index(name)],), (name,))
        out.layout = layout.sub([name])
        return out

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> Kronecker:
        out = Kronecker._from_blocks(tuple(_apply_block(b, fn) for b in self._blocks), self._names)
        out.layout = self.layout
        return out


# -- block helpers ------------------------------------------------------------------------------
def _as_block(spec: BlockSpec, label: str) -> Block:
    if isinstance(spec, KroneckerFactors):
        tensors = {"out_factor": spec.out_factor, "in_factor": spec.in_factor}
        common_dtype_device(label, tensors)
        for name, F in tensors.items():
            check_matrix(f"{label}: {name}", F)
            check_symmetric(f"{label}: {name}", F)
            check_nonnegative(f"{label}: {name}", F.diagonal(), "diagonal entries")
        return spec
    if isinstance(spec, KroneckerEigen):
        Qo, Qi, E = spec.out_eigvecs, spec.in_eigvecs, spec.eigvals
        common_dtype_device(label, {"out_eigvecs": Qo, "in_eigvecs": Qi, "eigvals": E})
        check_matrix(f"{label}: out_eigvecs", Qo)
        check_matrix(f"{label}: in_eigvecs", Qi)
        if E.shape != (Qo.shape[0], Qi.shape[0]):
            raise ValueError(
                f"{label}: eigvals must have shape (out, in_flat) = ({Qo.shape[0]}, {Qi.shape[0]}) "
                f"to match the eigenvectors, got {tuple(E.shape)}"
            )
        check_finite(f"{label}: eigvals", E)
        check_nonnegative(f"{label}: eigvals", E, "eigenvalues")
        return spec
    if isinstance(spec, Dense):
        return spec
    if isinstance(spec, Tensor):
        return _dense(spec, label)
    if isinstance(spec, (tuple, list)):
        if len(spec) == 2:
            return _as_block(KroneckerFactors(spec[0], spec[1]), label)
        if len(spec) == 1:
            return _dense(spec[0], label)
    raise TypeError(
        f"{label}: expected (B, A), (C,), a tensor C, KroneckerFactors, KroneckerEigen or Dense; "
        f"got {type(spec).__name__}{f' of length {len(spec)}' if isinstance(spec, (tuple, list)) else ''}"
    )


def _dense(C: Tensor, label: str) -> Dense:
    try:
        return Dense(C)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{label}: {err}") from err


def _block_flops(b: Block) -> float:
    """Floating-point operations of one block applied to one vector."""
    if isinstance(b, Dense):
        return 2.0 * b.num_params**2
    out, inn = (
        (b.out_factor, b.in_factor)
        if isinstance(b, KroneckerFactors)
        else (b.out_eigvecs, b.in_eigvecs)
    )
    n, m = out.shape[0], inn.shape[0]
    return 4.0 * (n * n * m + n * m * m)


def _block_size(b: Block) -> int:
    if isinstance(b, Dense):
        return b.num_params
    if isinstance(b, KroneckerFactors):
        return b.out_factor.shape[0] * b.in_factor.shape[0]
    return b.out_eigvecs.shape[0] * b.in_eigvecs.shape[0]


def _block_dtype_device(b: Block) -> tuple[torch.dtype, torch.device]:
    if isinstance(b, Dense):
        return b.dtype, b.device
    t = b.out_factor if isinstance(b, KroneckerFactors) else b.out_eigvecs
    return t.dtype, t.device


def _check_block_shape(name: str, b: Block, shape: torch.Size) -> None:
    numel = math.prod(shape)
    if isinstance(b, Dense):
        if b.num_params != numel:
            raise ValueError(
                f"Kronecker covariance for {name!r} is {b.num_params}x{b.num_params}, but the "
                f"parameter of shape {tuple(shape)} has {numel} entries"
            )
        return
    if isinstance(b, KroneckerFactors):
        out, inn, what = b.out_factor.shape[0], b.in_factor.shape[0], "out_factor/in_factor"
    else:
        out, inn, what = b.out_eigvecs.shape[0], b.in_eigvecs.shape[0], "out_eigvecs/in_eigvecs"
    if len(shape) < 2:
        raise ValueError(
            f"Kronecker factor pair given for {name!r} of shape {tuple(shape)}; a pair needs a "
            f"weight with at least 2 dimensions (give one ({numel}, {numel}) covariance instead)"
        )
    expected = (shape[0], numel // shape[0])
    if (out, inn) != expected:
        raise ValueError(
            f"Kronecker {what} for {name!r} have sides ({out}, {inn}), but a weight of shape "
            f"{tuple(shape)} needs (out, in_flat) = {expected}"
        )


def _apply_block(b: Block, fn: Callable[[Tensor], Tensor]) -> Block:
    if isinstance(b, Dense):
        return b._apply(fn)
    if isinstance(b, KroneckerFactors):
        return KroneckerFactors(fn(b.out_factor), fn(b.in_factor))
    return KroneckerEigen(fn(b.out_eigvecs), fn(b.in_eigvecs), fn(b.eigvals))
