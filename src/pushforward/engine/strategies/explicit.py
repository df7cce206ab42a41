"""``explicit``: materialize each chunk of examples' Jacobian with forward mode, then contract.

The Jacobian block ``J`` of ``b`` examples, ``(b, T, K, P)``, is built column by column from P
Jacobian-vector products with unit tangents (each one serves all b examples), and contracted
with the covariance in one batched product. The cost is ``P`` forward passes, independent of
the number of outputs: the right choice when P is tiny and K is not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pushforward.core.budget import chunk_budget
from pushforward.core.chunking import RowChunk, progress_bar
from pushforward.engine.contraction import RowAccumulator
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.reverse import fixed_bytes
from pushforward.engine.strategies.strategy import TRAFFIC, Estimate, Strategy
from pushforward.products.jvp import push_tangents

__all__ = ["ExplicitStrategy"]


def _tangent_bytes(p: Problem, examples: int) -> int:
    return (
        examples * (2 * p.cost.activation_bytes + p.cost.output_numel * p.itemsize)
        + 2 * p.P * p.itemsize
    )


class ExplicitStrategy(Strategy):
    name = "explicit"

    def estimate(self, problem: Problem) -> Estimate:
        p = problem
        per_example = 3 * p.T * p.K * p.P * p.itemsize  # J block, selected rows, Σ applied
        room = chunk_budget(p.budget, fixed_bytes(p))
        examples = int(max(1, min(p.B, room // (2 * per_example))))
        block = examples * per_example
        memory = fixed_bytes(p) + block + _tangent_bytes(p, examples)
        F = p.cost.forward_flops
        rows = p.B * p.rows_per_sample
        flops = p.B * p.P * 3 * F + rows * (p.cov.matmul_flops() + TRAFFIC * p.P)
        return Estimate(self.name, flops, memory, examples, f"{p.P:,} JVPs per example chunk")

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        p = problem
        params = p.fm.params(p.differentiable)
        examples = estimate.chunk_size
        room = max(
            1, chunk_budget(p.budget, fixed_bytes(p)) - examples * 3 * p.T * p.K * p.P * p.itemsize
        )
        tangents_at_once = int(max(1, min(p.P, room // _tangent_bytes(p, examples))))
        acc = RowAccumulator(p, chunk_rows=examples * p.rows_per_sample)
        starts = range(0, p.B, examples)
        for start in progress_bar(
            starts, p.progress, "explicit Jacobian blocks", total=len(starts)
        ):
            stop = min(start + examples, p.B)
            sub = p.inputs.slice(start, stop)
            f, J = self._block(p, params, sub, tangents_at_once)
            chunk = RowChunk(slice(start, stop), slice(0, p.rows_per_sample))
            rows = _select_rows(p, J, chunk)
            acc.add(chunk, f, p.fm.unflatten(rows))
        return acc.result()

    @staticmethod
    def _block(p: Problem, params, sub, tangents_at_once: int) -> tuple[Tensor, Tensor]:
        """``(f, J)`` for the examples of ``sub``: ``J (b, T, K, P)`` by unit-tangent JVPs."""
        columns, f = [], None
        for c0 in range(0, p.P, tangents_at_once):
            c1 = min(c0 + tangents_at_once, p.P)
            unit = torch.zeros(c1 - c0, p.P, dtype=p.dtype, device=sub.device)
            unit[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1
            f, JV = push_tangents(p.fm, params, sub, p.fm.unflatten(unit))
            columns.append(JV.reshape(c1 - c0, sub.batch_size, p.T, p.K))
        J = torch.cat(columns).permute(1, 2, 3, 0)
        return f, J


def _select_rows(p: Problem, J: Tensor, chunk: RowChunk) -> Tensor:
    """``(b, T, K, P)`` -> rows ``(b, T*S, P)`` of the asked-for outputs."""
    b = J.shape[0]
    if p.outputs is not None:
        index = p.outputs[chunk.samples].unsqueeze(-1).expand(-1, -1, -1, p.P)
        J = J.gather(2, index)
    return J.reshape(b, p.rows_per_sample, p.P)
