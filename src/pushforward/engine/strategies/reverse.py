"""``reverse``: per-example VJP rows in chunks, the covariance applied, contracted.

Every asked-for (example, output) pair is one row ``J(x_b)^T e_k``, computed by ``vmap`` over
examples of ``torch.func.vjp``; at most ``chunk_size`` rows are alive at once. Cost: one
backward per row (K per example, or S with selected outputs), whatever the covariance's rank;
each row is multiplied by the covariance once.
"""

from __future__ import annotations

from torch import Tensor

from pushforward.core.cost import row_bytes
from pushforward.engine.contraction import RowAccumulator
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import Estimate, Strategy, SubPlanner, traffic
from pushforward.products.vjp import iter_row_chunks

__all__ = ["ReverseStrategy", "held_bytes", "row_chunk"]


def held_bytes(p: Problem) -> int:
    """Bytes held for the whole run.

    The result, the outputs ``f`` and, for a joint covariance, one group's rows (multiplied by
    the square-root factor) while the group fills.
    """
    held = p.result_bytes() + p.outputs_bytes()
    if p.kind == "joint":
        held += p.group_size * p.rows_per_sample * p.cov.sqrt_cols * p.itemsize
    return held


def row_chunk(p: Problem, per_row: int, held: int) -> int:
    """Rows per chunk, within the budget for ``per_row`` bytes a row and ``held`` bytes held.

    Per-example covariances need whole positions, joint covariances whole groups or the rows of
    one group.
    """
    rows = p.B * p.rows_per_sample
    chunk = p.budget.chunk(per_row, held, at_most=rows, at_least=p.rows_per_sample)
    if p.kind == "covariance":
        chunk = max(p.S, chunk // p.S * p.S)
    return chunk


class ReverseStrategy(Strategy):
    """Per-example VJP rows ``J(x_b)^T e_k`` in chunks, each multiplied by the covariance once."""

    name = "reverse"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """Cost and memory of one VJP row per (example, position, selected output), chunked.

        The chunk size is the number of rows alive at once.
        """
        p = problem
        rows = p.B * p.rows_per_sample
        per_row = row_bytes(p.cost, p.cov.workspace_bytes(1) + p.cov.sqrt_cols * p.itemsize)
        held = held_bytes(p)
        chunk = row_chunk(p, per_row, held)
        F = p.cost.forward_flops
        flops = p.B * F + rows * (2 * F + p.cov.matmul_flops() + traffic() * p.P)
        if p.kind == "joint":
            flops += rows * p.group_size * p.rows_per_sample * min(p.cov.sqrt_cols, p.P) * 2
        return Estimate(
            self.name, flops, p.budget.peak(held, chunk, per_row), chunk, f"{rows:,} VJP rows"
        )

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        """``(f, result)``: the rows of each chunk contracted with the covariance.

        The rows ``{name: (b, r, *shape)}`` go to a ``RowAccumulator``; the result is in
        canonical layout.
        """
        p = problem
        params = p.fm.params(p.differentiable)
        acc = RowAccumulator(p)
        for chunk, f, rows in iter_row_chunks(
            p.fm,
            params,
            p.inputs,
            p.rows_per_sample,
            p.cotangents,
            estimate.chunk_size,
            p.progress,
            "reverse rows",
            flat=False,
            group_size=p.group_size if p.kind == "joint" else 1,
        ):
            acc.add(chunk, f, rows)
        return acc.result()
