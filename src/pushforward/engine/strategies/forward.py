"""``forward``: push the columns of the covariance's square-root factor through JVPs.

With ``Σ = L L^T`` (L of shape P x r), ``J Σ J^T = (J L)(J L)^T`` and each column ``J L e_j`` is
one Jacobian-vector product that serves every example of the batch at once. Cost: r forward
passes, whatever the number of outputs — exact, and the right choice for low-rank covariances
(r = rank) or any factor with few columns.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from pushforward.core.chunking import progress_bar, spans
from pushforward.core.cost import tangent_bytes
from pushforward.engine.contraction import ColumnAccumulator
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import Estimate, Strategy, SubPlanner, traffic
from pushforward.products.jvp import push_tangents

__all__ = ["ForwardStrategy", "pushed_columns", "unit_rows"]


def unit_rows(start: int, stop: int, size: int, dtype: torch.dtype, device) -> Tensor:
    """Rows ``start:stop`` of the ``size x size`` identity (without forming it)."""
    rows = torch.zeros(stop - start, size, dtype=dtype, device=device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return rows


class ForwardStrategy(Strategy):
    """Push the covariance's square-root columns ``L e_j`` through JVPs: one per column."""

    name = "forward"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """Cost and memory of ``r`` JVPs (``r`` the square-root factor's columns), chunked.

        The chunk size is the number of columns pushed at once for the whole batch.
        """
        p = problem
        r = p.cov.sqrt_cols
        held = 2 * p.result_bytes() + p.outputs_bytes()  # the sum and its update, f
        # per column: the unit draw, its tangent, the tangent's activations and outputs
        per = tangent_bytes(p.cost, p.B, outputs=2, extra_numbers=r)
        per += p.cov.workspace_bytes(1)
        chunk = p.budget.chunk(per, held, at_most=r)
        F = p.cost.forward_flops
        flops = r * (3 * F * p.B + p.cov.sqrt_flops() + traffic() * p.P)
        n = p.B * p.rows_per_sample
        pairs = {
            "variance": n,
            "covariance": n * p.S,
            "joint": n * p.group_size * p.rows_per_sample,
        }
        flops += r * pairs[p.kind] * 2
        return Estimate(
            self.name, flops, p.budget.peak(held, chunk, per), chunk, f"{r:,} JVPs (sqrt columns)"
        )

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        """``(f, result)``: the outer products of the pushed columns ``J L e_j``, summed.

        The columns ``(c, B, T, S)`` of each chunk go to a ``ColumnAccumulator``; the result is
        in canonical layout (a zero covariance, ``r = 0``: zeros, ``f`` from one forward).
        """
        p = problem
        acc = ColumnAccumulator(p)
        f = None
        for cols, outputs, JV in pushed_columns(p, estimate.chunk_size):
            acc.add(p.select(JV.reshape(cols.stop - cols.start, p.B, p.T, p.K)))
            f = outputs
        if f is None:  # r == 0: a zero covariance
            f = p.fm.call(p.fm.params(p.differentiable), p.inputs.args, p.inputs.kwargs)
        return f, acc.result()


def pushed_columns(
    p: Problem, chunk_size: int, by_factor: bool = True
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Yield ``(columns, f, J T^T)`` chunk by chunk, one JVP per column for the whole batch.

    ``J T^T`` is the Jacobian times tangent rows ``T`` — the covariance's square-root columns
    ``L e_j`` (``by_factor``; ``r`` of them) or the unit vectors ``e_j`` (``P`` of them) —
    ``(c, *f.shape)`` for the ``c`` columns of each chunk.

    Args:
        p: the problem.
        chunk_size: columns pushed at once.
        by_factor: push the square-root columns ``L e_j`` (else the unit vectors ``e_j``).
    """
    params = p.fm.params(p.differentiable)
    width = p.cov.sqrt_cols if by_factor else p.P
    chunks = spans(width, chunk_size)
    for cols in progress_bar(chunks, p.progress, "forward columns", total=len(chunks)):
        Z = unit_rows(cols.start, cols.stop, width, p.compute_dtype, p.inputs.device)
        tangents = p.cov.sqrt_rows(Z) if by_factor else Z
        f, JV = push_tangents(p.fm, params, p.inputs, p.fm.unflatten(tangents))
        yield cols, f, JV
