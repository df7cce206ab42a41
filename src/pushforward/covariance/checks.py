"""Validation and small linear-algebra helpers shared by the covariance operators.

The value checks run when an operator is constructed with ``check=True`` (the default); every
one of them raises ``ValueError`` naming the offending tensor.

**Half precision.** PyTorch has no Cholesky factorization or eigendecomposition for float16 or
bfloat16 (on CPU): every factorization here runs in float32 (:func:`factor_dtype`) and its
result is rounded to the operator's dtype, so a half-precision operator is as accurate as its
dtype allows; its products run in its own dtype.

**Caches.** What an operator derives from its defining tensors (a square-root factor, a
Woodbury core) is kept by :func:`cached` under the identity and in-place version of those
tensors: an in-place change of a defining tensor recomputes it. Copies and pickles of an
operator start without caches (:meth:`CovarianceOperator.__getstate__`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout

T = TypeVar("T")

__all__ = [
    "all_finite",
    "cached",
    "check_finite",
    "check_index",
    "check_lowrank",
    "check_matrix",
    "check_names",
    "check_nonnegative",
    "check_psd",
    "check_symmetric",
    "common_dtype_device",
    "factor_dtype",
    "inv_sqrt_update",
    "inv_sqrt_update_rows",
    "needs_grad",
    "psd_sqrt",
    "remember",
    "symmetry_tol",
]


def common_dtype_device(
    owner: str, tensors: Mapping[str, Tensor]
) -> tuple[torch.dtype, torch.device]:
    """The dtype and device shared by ``tensors`` (a clear error naming them if they differ)."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{owner}: {name} must be a floating-point tensor, got {t.dtype}")
    dtypes = {n: t.dtype for n, t in tensors.items()}
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{owner}: defining tensors have different dtypes {dtypes}")
    if len(set(devices.values())) > 1:
        raise ValueError(f"{owner}: defining tensors are on different devices {devices}")
    first = next(iter(tensors.values()))
    return first.dtype, first.device


#: Elements per piece when :func:`all_finite` has to look entry by entry.
_FINITE_PIECE = 2**16


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, without a temporary of ``t``'s size.

    NaN and ±inf propagate into a sum, so a finite ``t.sum()`` (a reduction, no copy even of a
    strided view) proves it; only a non-finite sum — a non-finite entry, or finite entries that
    overflow — is settled entry by entry, in pieces of at most 65,536 elements.
    """
    with torch.no_grad():
        if t.numel() == 0 or bool(torch.isfinite(t.sum())):
            return True
        return _pieces_finite(t)


def _pieces_finite(t: Tensor) -> bool:
    if t.numel() <= _FINITE_PIECE:
        return bool(torch.isfinite(t).all())
    if t.dim() == 1:
        return all(bool(torch.isfinite(p).all()) for p in t.split(_FINITE_PIECE))
    rows = _FINITE_PIECE // max(t[0].numel(), 1)
    pieces = t.split(rows) if rows > 1 else t.unbind(0)
    return all(_pieces_finite(p) for p in pieces)


def check_finite(name: str, t: Tensor) -> None:
    """``t`` must have no NaN or infinite entries."""
    if not all_finite(t):
        with torch.no_grad():
            bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} has {bad} non-finite entries (NaN or inf)")


def check_matrix(name: str, M: Tensor) -> None:
    """``M`` must be a square matrix (shape only)."""
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")


def symmetry_tol(dtype: torch.dtype) -> float:
    """Relative tolerance for symmetry and positive semi-definiteness checks."""
    return torch.finfo(dtype).eps ** 0.5


def check_symmetric(name: str, M: Tensor) -> None:
    """``M`` must equal its transpose up to ``symmetry_tol`` relative to its largest entry."""
    with torch.no_grad():
        scale = M.abs().max().item() if M.numel() else 0.0
        asym = (M - M.T).abs().max().item() if M.numel() else 0.0
    if asym > symmetry_tol(M.dtype) * max(scale, torch.finfo(M.dtype).tiny):
        raise ValueError(
            f"{name} is not symmetric: max |M - M^T| = {asym:.3g} (largest entry {scale:.3g})"
        )


def check_nonnegative(name: str, t: Tensor, what: str = "entries") -> None:
    """``t`` must have no negative entries."""
    with torch.no_grad():
        negative = t < 0
        if negative.any():
            raise ValueError(
                f"{name} has {int(negative.sum())} negative {what} (smallest {t.min().item():.3g}); "
                "a covariance needs them >= 0"
            )


def _psd_error(name: str, low: float, top: float) -> ValueError:
    return ValueError(
        f"{name} is not positive semi-definite: smallest eigenvalue {low:.3g} "
        f"(largest magnitude {top:.3g}); a covariance needs every eigenvalue >= 0 "
        "(pass check=False to skip this check for a huge operator)"
    )


def check_psd(name: str, M: Tensor) -> Tensor | None:
    """``M`` (symmetric) must be positive semi-definite up to ``symmetry_tol``.

    The tolerance is relative to its largest eigenvalue. Returns its lower Cholesky factor when it
    is numerically positive definite (a by-product the caller may keep), else ``None``.
    """
    if M.shape[0] == 0:
        return M
    with torch.no_grad():
        work = M.to(factor_dtype(M.dtype))
        L, info = torch.linalg.cholesky_ex(work)
        if int(info) == 0:
            return L.to(M.dtype)
        evals = torch.linalg.eigvalsh(work)
        top, low = evals.abs().max().item(), evals.min().item()
    if low < -symmetry_tol(M.dtype) * max(top, torch.finfo(M.dtype).tiny):
        raise _psd_error(name, low, top)
    return None


def psd_sqrt(M: Tensor, name: str) -> Tensor:
    """A square factor ``L`` with ``L L^T = M`` for a symmetric PSD ``M`` (n, n).

    The lower Cholesky factor when ``M`` is numerically positive definite; otherwise the
    symmetric square root ``Q diag(sqrt(max(λ, 0))) Q^T`` of its eigendecomposition, after
    checking that no eigenvalue is clearly negative. Differentiable. A half-precision ``M`` is
    factorized in float32 and the factor rounded to its dtype.
    """
    if M.shape[0] == 0:
        return M
    work = M.to(factor_dtype(M.dtype))
    L, info = torch.linalg.cholesky_ex(work)
    if int(info) == 0:
        return L.to(M.dtype)
    evals, evecs = torch.linalg.eigh(work)
    with torch.no_grad():
        top = evals.abs().max().item()
        low = evals.min().item()
    if low < -symmetry_tol(M.dtype) * max(top, torch.finfo(M.dtype).tiny):
        raise _psd_error(name, low, top)
    return ((evecs * evals.clamp_min(0).sqrt()) @ evecs.T).to(M.dtype)


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factorizations of an operator of ``dtype`` run in.

    float32 for float16 and bfloat16 (PyTorch has no half-precision Cholesky or
    eigendecomposition), else ``dtype``.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def inv_sqrt_update(B: Tensor) -> tuple[Tensor, Tensor]:
    """The symmetric inverse square root ``(I + B B^T)^{-1/2} = I + (B Q) diag(c) (B Q)^T``.

    The Woodbury form of the square-root factors of :class:`~pushforward.LowRankPrecision` and
    ``PrecisionUpdate``: from the eigendecomposition ``B^T B = Q diag(s) Q^T`` (``k x k``),
    ``c = ((1 + s)^{-1/2} - 1) / s``, computed as ``-1 / (r (1 + r))`` with ``r = sqrt(1 + s)``
    (no division by a zero ``s``; negative rounding of ``s`` clamped to 0). Factorized in
    :func:`factor_dtype` (float32 for half precision), the results cast back to ``B``'s dtype.
    Like any ``eigh`` gradient, its gradient is undefined when ``s`` has repeated values.

    Args:
        B: ``(m, k)``.

    Returns:
        ``(B Q (m, k), c (k,))``; :func:`inv_sqrt_update_rows` applies the factor.
    """
    work = B.to(factor_dtype(B.dtype))
    s, Q = torch.linalg.eigh(work.T @ work)
    root = (1 + s.clamp_min(0)).sqrt()
    return (work @ Q).to(B.dtype), (-1 / (root * (1 + root))).to(B.dtype)


def inv_sqrt_update_rows(X: Tensor, BQ: Tensor, c: Tensor) -> Tensor:
    """Rows of ``X (I + B B^T)^{-1/2}`` for ``X (n, m)``, from :func:`inv_sqrt_update`'s pieces.

    The factor is symmetric: these are also its products with the columns ``X^T``.
    """
    return X + ((X @ BQ) * c) @ BQ.T


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd would record an operation on any of ``tensors`` right now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _stamp(inputs: Sequence[Tensor]) -> tuple[int, ...] | None:
    """Identity and in-place version of each tensor.

    ``None`` for inference tensors, which keep no version counter: nothing derived from them is
    cached.
    """
    if any(t.is_inference() for t in inputs):
        return None
    return tuple(v for t in inputs for v in (id(t), t._version))


def cached(store: dict[str, Any], key: str, fn: Callable[[], T], *inputs: Tensor) -> T:
    """``fn()``, a value derived from the tensors ``inputs``, kept in ``store``.

    Kept under the inputs' identities and in-place versions: recomputed after an in-place change of
    any of them, and never kept when it would be part of an autograd graph (a cached graph could be
    backpropagated only once).
    """
    if needs_grad(*inputs):
        return fn()
    stamp = _stamp(inputs)
    hit = store.get(key)
    if stamp is None or hit is None or hit[0] != stamp:
        with torch.no_grad():
            value = fn()
        if stamp is None:
            return value
        hit = store[key] = (stamp, value)
    return hit[1]


def remember(store: dict[str, Any], key: str, value: Any, *inputs: Tensor) -> None:
    """Put ``value``, derived from ``inputs`` as they are now, into ``store`` for :func:`cached`.

    E.g. a factor computed by a constructor's check.
    """
    stamp = _stamp(inputs)
    if stamp is not None:
        store[key] = (stamp, value)


def check_lowrank(
    owner: str, U: Tensor, eigvals: Tensor, diag: Tensor | None, check: bool
) -> tuple[int, int]:
    """``(P, k)`` of a low-rank-plus-diagonal form ``U diag(eigvals) U^T + diag(diag)``.

    Checks the shapes always, and with ``check`` finite values and non-negative ``eigvals``.
    """
    tensors = {"U": U, "eigvals": eigvals} | ({} if diag is None else {"diag": diag})
    common_dtype_device(owner, tensors)
    if U.dim() != 2:
        raise ValueError(f"{owner} U must have shape (P, k), got {tuple(U.shape)}")
    P, k = U.shape
    for name, t, shape in (("eigvals", eigvals, (k,)), ("diag", diag, (P,))):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{owner} {name} must have shape {shape} to match U (P={P}, k={k}), got "
                f"{tuple(t.shape)}"
            )
    if check:
        for name, t in tensors.items():
            check_finite(f"{owner} {name}", t)
        check_nonnegative(f"{owner} eigvals", eigvals)
    return P, k


def check_names(owner: str, names: Sequence[str], layout: ParamLayout) -> None:
    """Per-name entries ``names`` given by the user must be exactly ``layout``'s parameters."""
    unknown = [n for n in names if n not in layout.shapes]
    missing = [n for n in layout.names if n not in set(names)]
    if unknown:
        raise ValueError(
            f"{owner} has entries for parameters the model does not select: {unknown}; "
            f"selected parameters: {list(layout.names)}"
        )
    if missing:
        raise ValueError(f"{owner} has no entries for the selected parameters {missing}")


def check_index(index: Any, size: int, what: str) -> Tensor:
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
