"""Contracting Jacobian pieces with the covariance into canonical results.

Two kinds of pieces arrive:

* **rows** ``J^T e`` (one P-vector per (batch element, position, output)), from reverse mode:
  :class:`RowAccumulator` turns them into ``e^T J S J^T e'`` with the covariance operator,
  group by group of the covariance's uncorrelated parameter groups;
* **columns** ``J L z`` (the Jacobian times columns of the covariance's square-root factor), from
  forward mode: :class:`ColumnAccumulator` sums their outer products, since
  ``J S J^T = sum_j (J L e_j)(J L e_j)^T``.

A joint covariance within groups of ``q`` batch elements (see ``pushforward.engine.problem``)
needs the rows of a whole group together: :class:`GroupRows` keeps the pieces of a group that
arrive over several chunks (each row multiplied by the square-root factor once) until the group
is complete.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk
from pushforward.core.einsum import einsum
from pushforward.core.precision import upcast
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.problem import Problem

__all__ = ["ChunkedResult", "ColumnAccumulator", "GroupRows", "RowAccumulator", "gram"]


def gram(cov: CovarianceOperator, A: Tensor) -> Tensor:
    """``A S A^T`` batched: ``A (..., m, P)`` -> ``(..., m, m)``.

    Each row is multiplied by the covariance once (through the square-root factor when it is
    thinner than P).
    """
    P = A.shape[-1]
    flat = A.reshape(-1, P)
    if cov.sqrt_cols <= P:
        W = cov.sqrt_t_rows(flat).reshape(*A.shape[:-1], -1)
        return W @ W.transpose(-1, -2)
    SA = cov.matmul_rows(flat).reshape(A.shape)
    return A @ SA.transpose(-1, -2)


class ChunkedResult:
    """Outputs ``f`` and canonical results gathered chunk by chunk of (example, row) pairs.

    Subclasses contract their chunks into ``(b, r)`` variances, ``(b, positions, S, S)``
    covariances or per-group joint blocks, and :meth:`put` them.
    """

    def __init__(self, problem: Problem) -> None:
        p = self.problem = problem
        self.f: Tensor | None = None
        shape = {
            "variance": (p.B, p.rows_per_sample),
            "covariance": (p.B, p.T, p.S, p.S),
            "joint": (p.groups, p.group_size * p.rows_per_sample, p.group_size * p.rows_per_sample),
        }[p.kind]
        self.out = torch.zeros(shape, dtype=p.compute_dtype, device=p.inputs.device)

    def store_outputs(self, chunk: RowChunk, f: Tensor) -> None:
        """Keep the chunk's outputs ``f`` ``(b, *f_b)`` (once per example)."""
        if chunk.rows.start == 0:
            if self.f is None:
                self.f = f.new_zeros(self.problem.B, *f.shape[1:])
            self.f[chunk.samples] = f

    def positions(self, chunk: RowChunk) -> slice:
        """The chunk's positions; a covariance chunk must hold whole positions (all S rows)."""
        S = self.problem.S
        if chunk.rows.start % S or chunk.rows.stop % S:
            raise AssertionError("a chunk of a per-example covariance splits a position")
        return slice(chunk.rows.start // S, chunk.rows.stop // S)

    def put(self, chunk: RowChunk, values: Tensor) -> None:
        """Store the chunk's variances ``(b, r)`` or covariances ``(b, positions, S, S)``."""
        if self.problem.kind == "variance":
            self.out[chunk.samples, chunk.rows] = values
        else:
            self.out[chunk.samples, self.positions(chunk)] = values

    def outputs(self) -> Tensor:
        """The outputs ``f`` gathered so far, ``(B, *sample_shape)``.

        Raises:
            ValueError: no chunk stored outputs (the batch is empty).
        """
        if self.f is None:
            raise ValueError("no outputs were computed: the batch is empty")
        return self.f.reshape(self.problem.B, *self.problem.sample_shape)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(f, canonical result)``."""
        p = self.problem
        out = self.out.reshape(p.B, p.T, p.S) if p.kind == "variance" else self.out
        return self.outputs(), out


class GroupRows:
    """Rows of the groups of a joint covariance, contracted when a group is complete.

    :meth:`add` takes a chunk's transformed rows ``W`` ``(b, r, w)`` (rows already multiplied by
    a square-root factor, so the group's block is ``W W^T``); chunks holding whole groups are
    contracted at once, a group split over several chunks is kept until its last chunk.
    """

    def __init__(self, problem: Problem, store: Callable[[int, Tensor], None]) -> None:
        self.problem = problem
        self.store = store
        self.pending: list[tuple[RowChunk, Tensor]] = []

    def add(self, chunk: RowChunk, W: Tensor) -> None:
        """Take a chunk's transformed rows ``W (b, r, w)``; store the blocks of completed groups.

        Each complete group's block ``G G^T`` ``(q*R, q*R)`` (``G`` the group's rows,
        ``(q*R, w)``) is passed to ``store`` with the group's index.
        """
        p = self.problem
        q, R = p.group_size, p.rows_per_sample
        start, stop = chunk.samples.start, chunk.samples.stop
        whole = start % q == 0 and (stop - start) % q == 0 and chunk.rows == slice(0, R)
        if whole and not self.pending:
            G = W.reshape((stop - start) // q, q * R, W.shape[-1])
            self.store(start // q, G @ G.transpose(-1, -2))
            return
        self.pending.append((chunk, W))
        if stop % q == 0 and chunk.rows.stop == R:  # the group's last chunk
            group = start // q
            full = W.new_zeros(q, R, W.shape[-1])
            for c, piece in self.pending:
                full[c.samples.start - group * q : c.samples.stop - group * q, c.rows] = piece
            self.pending.clear()
            G = full.reshape(1, q * R, -1)
            self.store(group, G @ G.transpose(-1, -2))


class RowAccumulator(ChunkedResult):
    """Collects reverse-mode rows chunk by chunk into the canonical result.

    Rows arrive per parameter, ``{name: (b, r, *shape)}``, and are contracted group by group of
    the covariance's uncorrelated parameter groups (no concatenation into P-vectors unless a
    group spans several tensors). For ``covariance`` every chunk must hold whole positions (all
    S rows of a position); for ``joint`` each row is multiplied by the square-root factor once
    and the group blocks are formed as their groups complete.
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.groups = problem.cov.param_groups()
        self.joint = [GroupRows(problem, self._add_blocks) for _ in self.groups]

    def _add_blocks(self, first: int, blocks: Tensor) -> None:
        self.out[first : first + blocks.shape[0]] += blocks

    def _group_rows(self, rows: dict[str, Tensor], b: int, r: int):
        for group in self.groups:
            dtype = self.problem.compute_dtype
            parts = [upcast(rows[name].reshape(b, r, -1), dtype) for name in group.names]
            yield group.operator, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def add(self, chunk: RowChunk, f: Tensor, rows: dict[str, Tensor]) -> None:
        """Contract a chunk's reverse-mode rows into the result.

        Args:
            chunk: the chunk's examples and rows.
            f: the chunk's outputs ``(b, *f_b)``.
            rows: the rows ``J^T e`` per parameter, ``{name: (b, r, *shape)}``.
        """
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
            for acc, (op, X) in zip(self.joint, self._group_rows(rows, b, r), strict=True):
                acc.add(chunk, op.sqrt_t_rows(X.reshape(b * r, -1)).reshape(b, r, -1))


class ColumnAccumulator:
    """Sums outer products of pushed columns ``W = J L Z`` of shape ``(n, B, T, S)``."""

    def __init__(self, problem: Problem) -> None:
        p = self.problem = problem
        q = p.group_size * p.rows_per_sample
        shape = {
            "variance": (p.B, p.T, p.S),
            "covariance": (p.B, p.T, p.S, p.S),
            "joint": (p.groups, q, q),
        }[p.kind]
        self.out = torch.zeros(shape, dtype=p.compute_dtype, device=p.inputs.device)

    def add(self, W: Tensor) -> None:
        """Add the outer products of the pushed columns ``W (n, B, T, S)`` to the result."""
        p = self.problem
        W = upcast(W, p.compute_dtype)
        if p.kind == "variance":
            part = (W * W).sum(0)
        elif p.kind == "covariance":
            part = einsum("nbts,nbtu->btsu", W, W)
        else:
            grouped = W.reshape(W.shape[0], p.groups, -1).transpose(0, 1)  # (G, n, q*R)
            if not torch.is_grad_enabled():  # accumulate in place: no (G, q*R, q*R) temporary
                self.out.baddbmm_(grouped.transpose(1, 2), grouped)
                return
            part = grouped.transpose(1, 2) @ grouped
        self.out = self.out + part if torch.is_grad_enabled() else self.out.add_(part)

    def result(self) -> Tensor:
        """The canonical result summed so far.

        ``(B, T, S)`` variances, ``(B, T, S, S)`` covariances or ``(groups, q*R, q*R)`` joint
        blocks.
        """
        return self.out
