"""The output directions of a curvature pass, per example.

Rows of the loss Hessian's factor, sampled gradients or the loss gradient. Every curvature here
is a sum over examples ``n`` and cotangent rows ``u_nr`` in output space of outer products of
``J_n^T u_nr``:

* exact GGN: ``u_n`` are the rows of a factor of the loss Hessian, position by position
  (:meth:`~pushforward.curvature.likelihoods.Likelihood.factor`);
* Monte Carlo GGN: ``mc`` sampled gradients per example, over ``sqrt(mc)``;
* empirical Fisher: the loss gradient, one row per example.

:class:`LikelihoodRows` gives them to the producer of layer pieces
(:func:`pushforward.layers.produce`) as its :class:`~pushforward.layers.Directions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from pushforward.core.chunking import RowChunk
from pushforward.curvature.likelihoods import Likelihood
from pushforward.layers import Directions

__all__ = ["LikelihoodRows", "RowKind"]


@dataclass(frozen=True)
class RowKind:
    """Which cotangent rows each example gets.

    Attributes:
        kind: ``"exact"`` (loss-Hessian factor rows, ``positions * r``), ``"mc"`` (``mc_samples``
            sampled gradients over ``sqrt(mc_samples)``) or ``"ef"`` (the loss gradient).
        mc_samples: samples per example for ``"mc"``.
        seed: seeds the samples (the same per batch on every pass over the data).
    """

    kind: str
    mc_samples: int = 1
    seed: int = 0

    def count(self, likelihood: Likelihood, positions: int, K: int) -> int:
        """Rows per example."""
        if self.kind == "exact":
            return positions * likelihood.rows_per_position(K)
        return self.mc_samples if self.kind == "mc" else 1


class LikelihoodRows(Directions):
    """The cotangent rows of one batch, from ``likelihood`` and ``kind`` at targets ``y``.

    The targets are prepared for outputs ``(B, n, K)``; ``noise`` holds the batch's random numbers
    for ``"mc"``.

    Args:
        likelihood: the loss.
        kind: which rows.
        y: the batch's targets, as :meth:`Likelihood.prepare_targets` gives them.
        noise: ``(B, mc, *noise_shape)`` for ``"mc"`` (see :func:`draw_noise`), else ``None``.
        shape: one example's output shape ``f_b`` (``n * K`` entries).
        n: positions per example.
        K: outputs per position.
    """

    def __init__(
        self,
        likelihood: Likelihood,
        kind: RowKind,
        y: Tensor,
        noise: Tensor | None,
        shape: torch.Size,
        n: int,
        K: int,
    ) -> None:
        self.likelihood, self.kind, self.y, self.noise = likelihood, kind, y, noise
        self.shape, self.n, self.K = torch.Size(shape), n, K
        self.rows = kind.count(likelihood, n, K)

    def per_example(self, chunk: RowChunk) -> tuple[Tensor, ...]:
        """The chunk's examples' targets and, for ``"mc"``, their rows' random numbers."""
        y = self.y[chunk.samples]
        if self.noise is None:
            return (y,)
        return y, self.noise[chunk.samples, chunk.rows]

    def dense(self, f: Tensor, rows: slice, *per: Tensor) -> Tensor:
        """``(b, r, *f_b)``: the cotangent rows ``rows`` of examples with outputs ``f (b, *f_b)``.

        ``per`` are the chunk's tensors from :meth:`per_example`; a likelihood that is not batched
        runs under ``vmap``, one example at a time.
        """
        y, noise = per[0], (per[1] if len(per) > 1 else None)
        b = f.shape[0]
        f = f.reshape(b, self.n, self.K)
        if self.likelihood.batched:
            cot = self.cotangents(f, y, noise, rows)
        else:
            in_dims = (0, 0, None if noise is None else 0)
            cot = vmap(lambda f_b, y_b, z_b: self.cotangents(f_b, y_b, z_b, rows), in_dims=in_dims)(
                f, y, noise
            )
        return cot.reshape(b, -1, *self.shape).contiguous()

    def cotangents(self, f: Tensor, y: Tensor, noise: Tensor | None, rows: slice) -> Tensor:
        """``(..., r, n, K)``: the rows ``rows`` of examples ``f (..., n, K)``.

        One example (under ``vmap``), or leading example dimensions for a batched likelihood;
        ``noise`` holds those rows' random numbers already.
        """
        lik, kind = self.likelihood, self.kind.kind
        if kind == "ef":
            return lik.gradient(f, y).unsqueeze(-3)
        if kind == "mc":
            scale = 1 / math.sqrt(self.kind.mc_samples)
            lead = f.dim() - 2
            if lik.batched:
                return lik.sampled_gradient(f.unsqueeze(-3), y.unsqueeze(lead), noise) * scale
            return vmap(lambda z: lik.sampled_gradient(f, y, z))(noise) * scale
        factor = lik.factor(f, y)  # (..., n, r, K)
        n, r = factor.shape[-3:-1]
        if n == 1:  # one position: the rows are the factor's
            return factor[..., 0, rows, :].unsqueeze(-2)
        index = torch.arange(rows.start, rows.stop, device=f.device)
        t, k = index // r, index % r
        onehot = (t.unsqueeze(-1) == torch.arange(n, device=f.device)).to(f.dtype)  # (c, n)
        return onehot.unsqueeze(-1) * factor[..., t, k, :].unsqueeze(-2)


def draw_noise(
    likelihood: Likelihood, kind: RowKind, index: int, B: int, n: int, K: int, dtype, device
) -> Tensor | None:
    """The random numbers of batch ``index``'s sampled targets ``(B, mc, ...)``.

    The same on every pass over the data; ``None`` unless ``kind`` is ``"mc"``.
    """
    if kind.kind != "mc":
        return None
    generator = torch.Generator(device=device).manual_seed(
        hash((kind.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF
    )
    shape = (B, kind.mc_samples, *likelihood.noise_shape(n, K))
    return likelihood.draw_noise(shape, generator, dtype, device)
