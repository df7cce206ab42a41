"""Likelihoods: what the curvature needs from the loss, in output space, per example.

A likelihood is the negative log-likelihood (NLL) of one example's outputs ``f`` given its
target ``y``, summed over the example's *positions* (a classifier's ``(B, K)`` output has one
position per example, a language model's ``(B, T, V)`` has ``T``). Every method takes one
example — ``f`` of shape ``(n, K)`` (``n`` positions, ``K`` outputs) and that example's target —
and is written so that ``torch.func.vmap`` runs it over the examples of a batch:

* :meth:`Likelihood.factor` — rows ``F`` ``(n, r, K)`` with ``F_t^T F_t`` the Hessian of the NLL
  w.r.t. position ``t``'s outputs (exact GGN);
* :meth:`Likelihood.hessian_product` — that Hessian times vectors (matrix-free GGN products);
* :meth:`Likelihood.gradient` — the NLL's gradient w.r.t. ``f`` (empirical Fisher);
* :meth:`Likelihood.sampled_gradient` — the gradient at a target drawn from the model's own
  predictive with the given noise (Monte Carlo GGN / Fisher: its expected outer product is the
  Hessian);
* :meth:`Likelihood.loss` — the batch's summed NLL in laplace-torch's convention.

The built-in likelihoods also take leading dimensions (``f (..., n, K)``, one example per
leading index; ``batched = True``), so a whole chunk of examples is handled without ``vmap``.

Built in: :class:`CrossEntropy` (``"classification"``: softmax cross-entropy, with an ignored
target index for padded tokens), :class:`Gaussian` (``"regression"``: unit noise variance —
σ² enters the posterior and the marginal likelihood as ``sigma_noise``, as in laplace-torch, so
σ can be tuned without recomputing the curvature) and :class:`OutputHessian` (a user function
for the output-space Hessian, optionally with an NLL for the gradient and the loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pushforward.core.softmax import softmax

__all__ = ["CrossEntropy", "Gaussian", "Likelihood", "OutputHessian", "as_likelihood"]


class Likelihood:
    """The base class of likelihoods: what the curvature needs from the loss, per example.

    A likelihood is the negative log-likelihood (NLL) of one example's outputs ``f (n, K)``
    (``n`` positions, ``K`` outputs per position) given that example's target, summed over the
    positions. Every method takes one example and is written so that ``torch.func.vmap`` runs it
    over a batch; a likelihood with ``batched = True`` also takes leading example dimensions.
    """

    #: ``"classification"``, ``"regression"`` or ``"custom"``.
    kind = "custom"
    #: The methods take leading (example) dimensions before ``(n, K)`` (else ``vmap`` is used).
    batched = False

    def rows_per_position(self, K: int) -> int:
        """``r``, the rows of :meth:`factor` per position."""
        return K

    def factor(self, f: Tensor, y: Tensor) -> Tensor:
        """``(n, r, K)``: per position, rows whose outer products sum to the NLL's Hessian."""
        raise NotImplementedError

    def hessian_product(self, f: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``(m, n, K)``: the NLL's Hessian times ``v (m, n, K)``.

        The Hessian is block diagonal over positions; the default applies :meth:`factor`'s rows.
        """
        Fr = self.factor(f, y)  # (n, r, K)
        return torch.einsum("trk,trl,mtl->mtk", Fr, Fr, v)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``(n, K)``: the gradient of the NLL w.r.t. ``f`` at the target ``y``."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient (pass an nll)")

    def noise_shape(self, n: int, K: int) -> tuple[int, ...]:
        """Shape of the random numbers one sampled target of one example needs."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot sample targets: Monte Carlo curvature is not available"
        )

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator, dtype, device):
        """The random numbers of :meth:`noise_shape` for many targets (leading dims first)."""
        raise NotImplementedError

    def sampled_gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """``(n, K)``: the NLL's gradient at a target drawn from the model with ``noise``.

        ``y`` only says which positions count.
        """
        raise NotImplementedError

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The batch's summed NLL (laplace-torch's ``factor * lossfunc``), from ``(B, n, K)``."""
        raise NotImplementedError(f"{type(self).__name__} has no loss (pass an nll)")

    def num_outputs(self, f: Tensor, y: Tensor) -> int:
        """Observed output scalars of a batch ``(B, n, K)`` (the Gaussian normalizer's count)."""
        return f.numel()

    def prepare_targets(self, y: Tensor, f_shape: torch.Size) -> Tensor:
        """``y`` of a batch, shaped for outputs ``f (B, n, K)``.

        One value per position gives ``(B, n)``, one per output ``(B, n, K)``; anything else is
        returned as given (its first dimension is the batch).
        """
        B, n, K = f_shape
        if y.numel() == B * n:
            return y.reshape(B, n)
        if y.numel() == B * n * K:
            return y.reshape(B, n, K)
        return y


class CrossEntropy(Likelihood):
    """Softmax cross-entropy: ``NLL = -sum_t log softmax(f_t)[y_t]``.

    Args:
        ignore_index: targets equal to it contribute nothing (padding tokens), as in
            ``torch.nn.functional.cross_entropy``.

    Targets are class indices of the output's shape without the class dimension: ``(B,)`` for
    ``(B, K)`` outputs, ``(B, T)`` for a language model's ``(B, T, V)`` (aligned with the
    outputs: shift them yourself for next-token prediction), each in ``[0, K)`` or the ignore
    index; or *soft* targets, class probabilities of the output's shape (floating point, as
    ``torch.nn.functional.cross_entropy`` takes them): the GGN does not depend on the targets,
    the gradient is ``softmax(f) - y`` and the loss ``-sum y log softmax(f)``.

    The Hessian ``diag(p) - p p^T`` has rank ``K - 1`` (its null vector is the ones vector):
    :meth:`factor` gives ``K - 1`` rows, the rows ``sqrt(p_r)(e_r - p)`` rotated by a Householder
    reflection that maps their one linear dependency onto a zero row, which is dropped.
    """

    kind = "classification"
    batched = True

    def __init__(self, ignore_index: int = -100) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def rows_per_position(self, K: int) -> int:
        """``K - 1`` (at least 1): the Hessian's rank."""
        return max(K - 1, 1)

    def _mask(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """``(..., n)``: 1 where a position's target counts (soft targets: everywhere)."""
        if y.is_floating_point():
            return torch.ones(y.shape[:-1], dtype=dtype, device=y.device)
        return (y != self.ignore_index).to(dtype)

    def factor(self, f: Tensor, y: Tensor) -> Tensor:
        """``(..., n, K - 1, K)``: per position, rows whose outer products sum to the Hessian.

        The rows ``sqrt(p_r)(e_r - p)`` rotated by a Householder reflection that maps their one
        linear dependency onto a zero row, which is dropped (see the class docstring); zero rows for
        ignored targets. One row of zeros for ``K = 1``.
        """
        p = softmax(f)  # (..., n, K)
        if f.shape[-1] == 1:
            return torch.zeros_like(f).unsqueeze(-1)  # the Hessian p - p^2 = 0
        # C = diag(s) - s p^T (rows r) with s = sqrt(p); the Householder H = I - v v^T / (1 + s_0)
        # with v = s + e_0 maps s to -e_0 and s^T C = 0, so row 0 of H C is zero and its rows
        # 1.. are s_r (e_r - w)^T with w = (p + s_0 e_0) / (1 + s_0), that is w_0 = s_0 and
        # w_k = p_k / (1 + s_0); s_r = 0 at ignored positions makes their rows zero
        s = p.sqrt()
        if not y.is_floating_point():
            s = s * (y != self.ignore_index).unsqueeze(-1)
        s0 = s[..., :1]
        minus_w = p / (-1.0 - s0)
        minus_w[..., :1] = -s0
        C = s[..., 1:, None] * minus_w.unsqueeze(-2)  # (..., n, K - 1, K)
        C.diagonal(offset=1, dim1=-2, dim2=-1).add_(s[..., 1:])
        return C

    def hessian_product(self, f: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``(m, n, K)``: ``(diag(p) - p p^T) v`` per position, zero for ignored targets."""
        p = softmax(f)  # (n, K)
        Hv = p * v - p * (v * p).sum(-1, keepdim=True)
        return Hv * self._mask(y, f.dtype)[:, None]

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``(..., n, K)``: ``softmax(f) - onehot(y)`` (soft targets: ``softmax(f) - y``).

        Zero at positions whose target is the ignore index.
        """
        p = softmax(f)
        if y.is_floating_point():
            return p - y
        mask = self._mask(y, f.dtype)
        onehot = F.one_hot(y.clamp_min(0).long(), f.shape[-1]).to(f.dtype)
        return (p - onehot) * mask[..., None]

    def noise_shape(self, n: int, K: int) -> tuple[int, ...]:
        """``(n,)``: one uniform number per position (one drawn class each)."""
        return (n,)

    def draw_noise(self, shape, generator, dtype, device):
        """Uniform random numbers in ``[0, 1)`` of ``shape``, from ``generator``."""
        return torch.rand(shape, generator=generator, dtype=dtype, device=device)

    def sampled_gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """``(..., n, K)``: ``softmax(f) - onehot(c)`` for classes ``c`` drawn from ``softmax(f)``.

        Each class is drawn by the inverse CDF of its position's uniform ``noise``; zero at ignored
        positions.
        """
        p = softmax(f)
        # inverse CDF: the first class whose cumulative probability exceeds the uniform draw
        drawn = (p.cumsum(-1) < noise.unsqueeze(-1)).sum(-1).clamp_max(f.shape[-1] - 1)
        return (p - F.one_hot(drawn, f.shape[-1]).to(f.dtype)) * self._mask(y, f.dtype)[..., None]

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The batch's summed cross-entropy (ignored targets left out), from ``(B, n, K)``."""
        K = f.shape[-1]
        if y.is_floating_point():
            return F.cross_entropy(f.reshape(-1, K), y.reshape(-1, K), reduction="sum")
        return F.cross_entropy(
            f.reshape(-1, K), y.reshape(-1).long(), reduction="sum", ignore_index=self.ignore_index
        )

    def num_outputs(self, f: Tensor, y: Tensor) -> int:
        """``K`` times the number of positions whose target counts."""
        return int(self._mask(y, f.dtype).sum()) * f.shape[-1]

    def prepare_targets(self, y: Tensor, f_shape: torch.Size) -> Tensor:
        """Class indices ``(B, n)`` (int64), or soft targets ``(B, n, K)`` as given.

        Raises:
            ValueError: the targets are neither ``B * n`` class indices nor ``B * n * K``
                probabilities, or an index is outside ``[0, K)`` and not the ignore index.
        """
        B, n, K = f_shape
        if y.is_floating_point() and y.numel() == B * n * K:
            return y.reshape(B, n, K)  # soft targets: class probabilities
        if y.is_floating_point() or y.numel() != B * n:
            raise ValueError(
                f"classification targets must be {B * n} class indices (the output's shape "
                f"without its class dimension) or {B * n * K} class probabilities (the "
                f"output's shape), got a {y.dtype} tensor of shape {tuple(y.shape)}"
            )
        y = y.reshape(B, n).long()
        if y.numel() == 0:
            return y
        # one reduction and one read to the host: all in range is the common case
        low, high = torch.stack(torch.aminmax(y)).tolist()
        if low >= 0 and high < K:
            return y
        bad = ((y < 0) | (y >= K)) & (y != self.ignore_index)
        if bool(bad.any()):
            values = y[bad].unique()[:5].tolist()
            raise ValueError(
                f"classification targets must be class indices in [0, {K}) or the ignore index "
                f"{self.ignore_index}; got {values}"
            )
        return y

    def __repr__(self) -> str:
        return f"CrossEntropy(ignore_index={self.ignore_index})"


class Gaussian(Likelihood):
    """Gaussian NLL with unit noise variance, ``NLL = 1/2 sum_t ||f_t - y_t||^2`` (+ const).

    The curvature is that of unit noise (laplace-torch's convention: its Hessian is the
    identity); the noise variance σ² divides the curvature in the posterior and enters the
    marginal likelihood (``sigma_noise=``), so σ can be tuned without recomputing anything.
    Targets have the output's shape.
    """

    kind = "regression"
    batched = True

    def factor(self, f: Tensor, y: Tensor) -> Tensor:
        """``(..., n, K, K)``: identity rows (the unit-noise Hessian is the identity)."""
        K = f.shape[-1]
        return torch.eye(K, dtype=f.dtype, device=f.device).expand(*f.shape, K)

    def hessian_product(self, f: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``v`` itself: the Hessian is the identity."""
        return v

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``f - y``."""
        return f - y

    def noise_shape(self, n: int, K: int) -> tuple[int, ...]:
        """``(n, K)``: one standard normal number per output."""
        return (n, K)

    def draw_noise(self, shape, generator, dtype, device):
        """Standard normal random numbers of ``shape``, from ``generator``."""
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def sampled_gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """``-noise``: the gradient ``f - (f + noise)`` at the target ``f + noise``."""
        return -noise  # f - (f + noise)

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """``1/2 sum ||f - y||^2`` over the batch (the normalizer left out)."""
        return 0.5 * (f - y).square().sum()

    def prepare_targets(self, y: Tensor, f_shape: torch.Size) -> Tensor:
        """``y`` reshaped to the outputs' shape ``f_shape``.

        Raises:
            ValueError: ``y`` does not have as many entries as the outputs.
        """
        if y.numel() != math.prod(f_shape):
            raise ValueError(
                f"regression targets must have the output's {math.prod(f_shape)} entries "
                f"(shape {tuple(f_shape)}), got shape {tuple(y.shape)}"
            )
        return y.reshape(f_shape)

    def __repr__(self) -> str:
        return "Gaussian()"


class OutputHessian(Likelihood):
    """A likelihood given by its output-space Hessian.

    Args:
        hessian: ``(f, y) -> (n, K, K)`` for one example's outputs ``f (n, K)`` and target ``y``
            (``(n,)`` when the targets hold one value per position, ``(n, K)`` one per output,
            else the example's slice of the batch's targets; ``vmap``-able: tensor operations
            only), symmetric positive semi-definite (negative eigenvalues are clamped to zero in
            :meth:`factor`).
        nll: optional ``(f, y) -> scalar``, one example's NLL: gives the gradient (empirical
            Fisher) and the loss (marginal likelihood).
    """

    kind = "custom"

    def __init__(
        self,
        hessian: Callable[[Tensor, Tensor], Tensor],
        nll: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(hessian):
            raise TypeError(f"hessian must be callable, got {type(hessian).__name__}")
        if nll is not None and not callable(nll):
            raise TypeError(f"nll must be callable or None, got {type(nll).__name__}")
        self.hessian, self.nll = hessian, nll

    def factor(self, f: Tensor, y: Tensor) -> Tensor:
        """``(n, K, K)``: rows ``sqrt(λ) q`` of the Hessian's eigendecomposition.

        Negative eigenvalues are clamped to zero.
        """
        H = self.hessian(f, y)
        lam, Q = torch.linalg.eigh(H)  # (n, K), (n, K, K)
        return (Q * lam.clamp_min(0).sqrt().unsqueeze(-2)).transpose(-1, -2)

    def hessian_product(self, f: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``(m, n, K)``: the user's Hessian ``(n, K, K)`` times ``v (m, n, K)`` per position."""
        return torch.einsum("tkl,mtl->mtk", self.hessian(f, y), v)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``(n, K)``: the gradient of ``nll`` w.r.t. ``f`` (``torch.func.grad``).

        Raises:
            NotImplementedError: no ``nll`` was given.
        """
        if self.nll is None:
            return super().gradient(f, y)
        return torch.func.grad(self.nll)(f, y)

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The batch's summed ``nll``, one example at a time.

        Raises:
            NotImplementedError: no ``nll`` was given.
        """
        if self.nll is None:
            return super().loss(f, y)
        return sum(self.nll(f[b], y[b]) for b in range(f.shape[0]))

    def __repr__(self) -> str:
        return f"OutputHessian({getattr(self.hessian, '__name__', 'hessian')})"


def as_likelihood(likelihood: str | Likelihood | Callable) -> Likelihood:
    """A :class:`Likelihood` from its name, a likelihood, or an output-space Hessian.

    ``"classification"`` -> :class:`CrossEntropy`, ``"regression"`` -> :class:`Gaussian`, a
    :class:`Likelihood` as is, a callable as the output-space Hessian (:class:`OutputHessian`).

    Raises:
        ValueError: an unknown name.
        TypeError: anything else.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "classification":
        return CrossEntropy()
    if likelihood == "regression":
        return Gaussian()
    if isinstance(likelihood, str):
        raise ValueError(
            f"likelihood must be 'classification', 'regression', a Likelihood or a callable "
            f"returning the output-space Hessian, got {likelihood!r}"
        )
    if callable(likelihood):
        return OutputHessian(likelihood)
    raise TypeError(
        f"likelihood must be 'classification', 'regression', a Likelihood or a callable, got "
        f"{type(likelihood).__name__}"
    )
