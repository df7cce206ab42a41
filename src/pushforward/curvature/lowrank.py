"""Leading eigenpairs of a symmetric PSD operator from its products: Lanczos and randomized.

* :func:`lanczos` — Lanczos with full reorthogonalization, one product per step; the Ritz pairs
  of the tridiagonal matrix. With ``iterations`` it runs exactly that many steps (what laplax's
  ``lanczos`` does); otherwise until the ``k`` leading Ritz values have converged (residual
  ``|beta_m s_mi| <= tol * theta_max``) or ``max_iterations`` steps.
* :func:`randomized` — randomized subspace iteration (Halko, Martinsson, Tropp 2011): a Gaussian
  sketch with ``k + oversample`` columns, ``power_iterations`` products with orthonormalization,
  then Rayleigh-Ritz; every product is one ``matmat`` with all columns.

Both return ``(eigenvalues (k,), eigenvectors (P, k))``, largest first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["lanczos", "lanczos_bytes", "randomized", "randomized_bytes"]


def lanczos_bytes(size: int, steps: int, itemsize: int) -> int:
    """Bytes of :func:`lanczos`' basis of ``steps`` vectors of ``size`` and its temporaries."""
    return (steps + 4) * size * itemsize


def randomized_bytes(size: int, width: int, itemsize: int) -> int:
    """Bytes of :func:`randomized`'s sketch of ``width`` columns and its factorizations."""
    return 5 * width * size * itemsize


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    size: int,
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    iterations: int | None = None,
    max_iterations: int | None = None,
    tol: float = 1e-6,
    check_every: int = 5,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of the ``size x size`` operator ``matvec`` by Lanczos.

    The stopping rule is the module docstring's.

    Returns:
        ``(eigenvalues, eigenvectors)``, ``(k',)`` and ``(size, k')``, largest first, with
        ``k' = min(k, steps)``: fewer than ``k`` when an invariant subspace of smaller dimension
        ends the iteration early.
    """
    limit = iterations if iterations is not None else max_iterations or min(size, 10 * k + 20)
    limit = min(limit, size)
    Q = torch.zeros(size, limit + 1, dtype=dtype, device=device)
    q = torch.randn(size, generator=generator, dtype=dtype, device=device)
    Q[:, 0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    steps = 0
    for j in range(limit):
        w = matvec(Q[:, j])
        alpha = torch.dot(Q[:, j], w)
        w = w - alpha * Q[:, j]
        if j > 0:
            w = w - betas[-1] * Q[:, j - 1]
        basis = Q[:, : j + 1]
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - basis @ (basis.T @ w)
        beta = w.norm()
        alphas.append(float(alpha))
        steps = j + 1
        scale = max(abs(a) for a in alphas)
        if float(beta) <= 1e-12 * max(scale, 1e-300) or steps == limit:
            betas.append(float(beta))
            break
        betas.append(float(beta))
        Q[:, j + 1] = w / beta
        checkpoint = iterations is None and steps >= k and steps % check_every == 0
        if checkpoint and _converged(alphas, betas, k, tol):
            break
    theta, S = _ritz(alphas, betas)
    top = min(k, steps)
    vectors = Q[:, :steps] @ S[:, :top].to(dtype)
    return theta[:top].to(dtype), vectors


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the tridiagonal matrix, largest first (float64)."""
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta.flip(0), S.flip(1)


def _converged(alphas: list[float], betas: list[float], k: int, tol: float) -> bool:
    theta, S = _ritz(alphas, betas)
    residual = (betas[-1] * S[-1, :k]).abs()
    return bool((residual <= tol * theta[0].abs().clamp_min(1e-300)).all())


def randomized(
    matmat: Callable[[Tensor], Tensor],
    size: int,
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    oversample: int = 10,
    power_iterations: int = 4,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs by randomized subspace iteration (see the module docstring).

    ``power_iterations + 2`` products with ``k + oversample`` columns.

    Returns:
        ``(eigenvalues, eigenvectors)``, ``(k,)`` and ``(size, k)``, largest first.
    """
    width = min(size, k + oversample)
    Y = matmat(torch.randn(size, width, generator=generator, dtype=dtype, device=device))
    for _ in range(power_iterations):
        Q, _ = torch.linalg.qr(Y)
        Y = matmat(Q)
    Q, _ = torch.linalg.qr(Y)
    T = Q.T @ matmat(Q)
    theta, S = torch.linalg.eigh((T + T.T) / 2)
    top = min(k, width)
    theta, S = theta.flip(0)[:top], S.flip(1)[:, :top]
    return theta, Q @ S
