"""Validation and small linear-algebra helpers shared by the covariance operators."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.operator import check_finite, is_trusted

T = TypeVar("T")

__all__ = [
    "cached",
    "check_matrix",
    "check_names",
    "check_nonnegative",
    "check_symmetric",
    "common_dtype_device",
    "needs_grad",
    "psd_sqrt",
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


def check_matrix(name: str, M: Tensor) -> None:
    """``M`` must be a finite square matrix."""
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(M.shape)}")
    check_finite(name, M)


def symmetry_tol(dtype: torch.dtype) -> float:
    """Relative tolerance for symmetry and positive semi-definiteness checks."""
    return torch.finfo(dtype).eps ** 0.5


def check_symmetric(name: str, M: Tensor) -> None:
    """``M`` must equal its transpose up to ``symmetry_tol`` relative to its largest entry."""
    if is_trusted():
        return
    with torch.no_grad():
        scale = M.abs().max().item()
        asym = (M - M.T).abs().max().item()
    if asym > symmetry_tol(M.dtype) * max(scale, torch.finfo(M.dtype).tiny):
        raise ValueError(
            f"{name} is not symmetric: max |M - M^T| = {asym:.3g} (largest entry {scale:.3g})"
        )


def check_nonnegative(name: str, t: Tensor, what: str = "entries") -> None:
    """``t`` must have no negative entries."""
    if is_trusted():
        return
    with torch.no_grad():
        negative = t < 0
        if negative.any():
            raise ValueError(
                f"{name} has {int(negative.sum())} negative {what} (smallest {t.min().item():.3g}); "
                "a covariance needs them >= 0"
            )


def psd_sqrt(M: Tensor, name: str) -> Tensor:
    """A square factor ``L`` with ``L L^T = M`` for a symmetric PSD ``M`` (n, n).

    The lower Cholesky factor when ``M`` is numerically positive definite; otherwise the
    symmetric square root ``Q diag(sqrt(max(λ, 0))) Q^T`` of its eigendecomposition, after
    checking that no eigenvalue is clearly negative.
    """
    if M.shape[0] == 0:
        return M
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return L
    evals, evecs = torch.linalg.eigh(M)
    with torch.no_grad():
        top = evals.abs().max().item()
        low = evals.min().item()
    if low < -symmetry_tol(M.dtype) * max(top, torch.finfo(M.dtype).tiny):
        raise ValueError(
            f"{name} is not positive semi-definite: smallest eigenvalue {low:.3g} "
            f"(largest magnitude {top:.3g})"
        )
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd would record an operation on any of ``tensors`` right now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cached(store: dict[str, Any], key: str, fn: Callable[[], T], *inputs: Tensor) -> T:
    """``fn()``, kept in ``store`` unless it would be part of an autograd graph (a cached
    graph could be backpropagated only once)."""
    if needs_grad(*inputs):
        return fn()
    if key not in store:
        store[key] = fn()
    return store[key]


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
