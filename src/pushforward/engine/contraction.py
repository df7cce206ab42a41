"""Contracting Jacobian pieces with the covariance into canonical results.

Two kinds of pieces arrive:

* **rows** ``J^T e`` (one P-vector per (batch element, position, output)), from reverse mode:
  :class:`RowAccumulator` turns them into ``e^T J S J^T e'`` with the covariance operator;
* **columns** ``J L z`` (the Jacobian times columns of the covariance's square-root factor), from
  forward mode: :class:`ColumnAccumulator` sums their outer products, since
  ``J S J^T = sum_j (J L e_j)(J L e_j)^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.problem import Problem

__all__ = ["ChunkedResult", "ColumnAccumulator", "RowAccumulator", "gram"]


def gram(cov: CovarianceOperator, A: Tensor, B: Tensor | None = None) -> Tensor:
    """``A S B^T`` batched: ``A (..., m, P)``, ``B (..., n, P)`` (default ``A``) -> ``(..., m, n)``.

    Uses the square-root factor when it has fewer columns than P (``(A L)(B L)^T``).
    """
    P = A.shape[-1]
    lead = A.shape[:-2]
    if cov.sqrt_cols < P:
        WA = cov._sqrt_t_rows(A.reshape(-1, P)).reshape(*A.shape[:-1], -1)
        WB = WA if B is None else cov._sqrt_t_rows(B.reshape(-1, P)).reshape(*B.shape[:-1], -1)
        return WA @ WB.transpose(-1, -2)
    other = A if B is None else B
    S_other = cov._matmul_rows(other.reshape(-1, P)).reshape(*lead, other.shape[-2], P)
    return A @ S_other.transpose(-1, -2)


class ChunkedResult:
    """Outputs ``f`` and per-example results gathered chunk by chunk of (example, row) pairs.

    Subclasses contract their chunks into ``(b, r)`` variances or ``(b, positions, S, S)``
    covariances and :meth:`put` them; the joint covariance is theirs to assemble.
    """

    def __init__(self, problem: Problem) -> None:
        p = self.problem = problem
        self.f: Tensor | None = None
        shape = {"variance": (p.B, p.rows_per_sample), "covariance": (p.B, p.T, p.S, p.S)}
        self.out = (
            torch.zeros(shape[p.kind], dtype=p.dtype, device=p.inputs.device)
            if p.kind in shape
            else None
        )

    def store_outputs(self, chunk: RowChunk, f: Tensor) -> None:
        """Keep the chunk's outputs ``f`` ``(b, *f_b)`` (once per example)."""
        if chunk.rows.start == 0:
            if self.f is None:
                self.f = f.new_zeros(self.problem.B, *f.shape[1:])
            self.f[chunk.samples] = f

    def positions(self, chunk: RowChunk) -> slice:
        """The chunk's positions; a covariance chunk must hold whole positions (all S rows)."""
        S = self.problem.S
        assert chunk.rows.start % S == 0 and chunk.rows.stop % S == 0, "chunk splits a position"
        return slice(chunk.rows.start // S, chunk.rows.stop // S)

    def put(self, chunk: RowChunk, values: Tensor) -> None:
        """Store the chunk's variances ``(b, r)`` or covariances ``(b, positions, S, S)``."""
        if self.problem.kind == "variance":
            self.out[chunk.samples, chunk.rows] = values
        else:
            self.out[chunk.samples, self.positions(chunk)] = values

    def outputs(self) -> Tensor:
        assert self.f is not None, "empty batch"
        return self.f.reshape(self.problem.B, *self.problem.sample_shape)

    def per_example(self) -> Tensor:
        """The canonical variance ``(B, T, S)`` or per-example covariance ``(B, T, S, S)``."""
        p = self.problem
        return self.out.reshape(p.B, p.T, p.S) if p.kind == "variance" else self.out


class RowAccumulator(ChunkedResult):
    """Collects reverse-mode rows chunk by chunk into the canonical result.

    Rows arrive per parameter, ``{name: (b, r, *shape)}``, and are contracted group by group of
    the covariance's uncorrelated parameter groups (no concatenation into P-vectors unless a
    group spans several tensors). For ``covariance`` every chunk must hold whole positions (all
    S rows of a position); for ``joint`` the rows (or ``rows L`` when the square-root factor is
    thinner than P) of all examples are kept until :meth:`result`.
    """

    def __init__(self, problem: Problem, chunk_rows: int) -> None:
        super().__init__(problem)
        p = problem
        self.chunk_rows = max(1, chunk_rows)
        self.groups = p.cov.param_groups()
        self.thin = p.cov.sqrt_cols < p.P
        self.stored: Tensor | None = None

    def _group_rows(self, rows: dict[str, Tensor], b: int, r: int):
        for group in self.groups:
            parts = [rows[name].reshape(b, r, -1) for name in group.names]
            yield group.operator, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def add(self, chunk: RowChunk, f: Tensor, rows: dict[str, Tensor]) -> None:
        p = self.problem
        self.store_outputs(chunk, f)
        b, r = chunk.samples.stop - chunk.samples.start, chunk.rows.stop - chunk.rows.start
        if p.kind == "variance":
            groups = self._group_rows(rows, b, r)
            self.put(
                chunk,
                sum(op.quadratic_rows(X.reshape(b * r, -1)) for op, X in groups).reshape(b, r),
            )
        elif p.kind == "covariance":
            n = r // p.S
            self.put(
                chunk,
                sum(gram(op, X.reshape(b, n, p.S, -1)) for op, X in self._group_rows(rows, b, r)),
            )
        else:
            flat = p.fm.flatten(rows)
            P = flat.shape[-1]
            if self.stored is None:
                width = p.cov.sqrt_cols if self.thin else P
                self.stored = flat.new_zeros(p.B, p.rows_per_sample, width)
            kept = p.cov._sqrt_t_rows(flat.reshape(-1, P)).reshape(b, r, -1) if self.thin else flat
            self.stored[chunk.samples, chunk.rows] = kept

    def result(self) -> tuple[Tensor, Tensor]:
        p = self.problem
        if p.kind != "joint":
            return self.outputs(), self.per_example()
        assert self.stored is not None
        W = self.stored.reshape(p.B * p.rows_per_sample, -1)
        if self.thin:
            return self.outputs(), W @ W.T
        parts = [
            gram(p.cov, W[i : i + self.chunk_rows], W)
            for i in range(0, W.shape[0], self.chunk_rows)
        ]
        return self.outputs(), torch.cat(parts)


class ColumnAccumulator:
    """Sums outer products of pushed columns ``W = J L Z`` of shape ``(n, B, T, S)``."""

    def __init__(self, problem: Problem) -> None:
        p = self.problem = problem
        shape = {
            "variance": (p.B, p.T, p.S),
            "covariance": (p.B, p.T, p.S, p.S),
            "joint": (p.B * p.rows_per_sample,) * 2,
        }[p.kind]
        self.out = torch.zeros(shape, dtype=p.dtype, device=p.inputs.device)

    def add(self, W: Tensor) -> None:
        kind = self.problem.kind
        if kind == "variance":
            self.out = self.out + (W * W).sum(0)
        elif kind == "covariance":
            self.out = self.out + torch.einsum("nbts,nbtu->btsu", W, W)
        else:
            flat = W.reshape(W.shape[0], -1)
            self.out = self.out + flat.T @ flat

    def result(self) -> Tensor:
        return self.out
