"""``reverse``: per-example VJP rows in chunks, the covariance applied, contracted.

Every asked-for (example, output) pair is one row ``J(x_b)^T e_k``, computed by ``vmap`` over
examples of ``torch.func.vjp``; at most ``chunk_size`` rows are alive at once. Cost: one
backward per row (K per example, or S with selected outputs), whatever the covariance's rank.
"""

from __future__ import annotations

from torch import Tensor

from pushforward.core.budget import chunk_budget
from pushforward.engine.contraction import RowAccumulator
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import TRAFFIC, Estimate, Strategy
from pushforward.products.vjp import iter_row_chunks

__all__ = ["ReverseStrategy", "row_bytes"]


def row_bytes(problem: Problem) -> int:
    """Working bytes of one row: its P-vector (gradient dict, flat copy, the covariance applied),
    a backward through one example's activations, and its one-hot cotangent."""
    p = problem
    return 3 * p.P * p.itemsize + 2 * p.cost.activation_bytes + p.cost.output_numel * p.itemsize


def fixed_bytes(problem: Problem) -> int:
    """Bytes held for the whole run: the result, outputs ``f`` and (joint) the kept rows."""
    p = problem
    held = p.result_bytes() + p.B * p.cost.output_numel * p.itemsize
    if p.kind == "joint":
        held += p.B * p.rows_per_sample * min(p.cov.sqrt_cols, p.P) * p.itemsize
    return held


class ReverseStrategy(Strategy):
    name = "reverse"

    def estimate(self, problem: Problem) -> Estimate:
        p = problem
        rows = p.B * p.rows_per_sample
        per_row = row_bytes(p)
        fixed = fixed_bytes(p)
        chunk = max(1, chunk_budget(p.budget, fixed) // per_row)
        if p.kind == "covariance":  # whole positions per chunk
            chunk = max(p.S, chunk // p.S * p.S)
        chunk = min(chunk, rows)
        F = p.cost.forward_flops
        flops = p.B * F + rows * (2 * F + p.cov.matmul_flops() + TRAFFIC * p.P)
        if p.kind == "joint":
            flops += rows * rows * min(p.cov.sqrt_cols, p.P) * 2
        return Estimate(self.name, flops, fixed + chunk * per_row, int(chunk), f"{rows:,} VJP rows")

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        p = problem
        params = p.fm.params(p.differentiable)
        acc = RowAccumulator(p, estimate.chunk_size)
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
        ):
            acc.add(chunk, f, rows)
        return acc.result()
