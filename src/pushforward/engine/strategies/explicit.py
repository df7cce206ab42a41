"""``explicit``: materialize each chunk of examples' Jacobian with forward mode, then contract.

The Jacobian block ``J`` of ``b`` examples, ``(b, T, K, P)``, is built column by column from P
Jacobian-vector products with unit tangents (each one serves all b examples), and contracted
with the covariance in one batched product. The cost is ``P`` forward passes, independent of
the number of outputs: the right choice when P is tiny and K is not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk, progress_bar, row_chunks, spans
from pushforward.core.cost import tangent_bytes
from pushforward.engine.contraction import RowAccumulator
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.reverse import held_bytes
from pushforward.engine.strategies.strategy import Estimate, Strategy, SubPlanner, traffic
from pushforward.products.jvp import push_tangents

__all__ = ["ExplicitStrategy"]


def _block_bytes(p: Problem) -> int:
    """One example's Jacobian block, its selected rows and the contraction's temporaries."""
    return (p.T * p.K + 2 * p.rows_per_sample) * p.P * p.itemsize + p.cov.workspace_bytes(
        p.rows_per_sample
    )


def _tangents_at_once(p: Problem, examples: int, held: int) -> int:
    per = tangent_bytes(p.cost, examples, outputs=2)  # unit tangent, its output and its column
    return p.budget.chunk(per, held, at_most=p.P)


class ExplicitStrategy(Strategy):
    """Materialize the Jacobian of blocks of examples by unit-tangent JVPs, then contract it."""

    name = "explicit"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """Cost and memory of ``P`` unit-tangent JVPs per block of examples.

        Chunks: ``chunk_size`` unit tangents pushed at once through blocks of ``state``
        examples (the blocks take at most half the room).
        """
        p = problem
        held = held_bytes(p)
        per_example = _block_bytes(p) + tangent_bytes(p.cost, 1, outputs=2)
        examples = p.budget.chunk(2 * per_example, held, at_most=p.B)
        blocks = held + examples * _block_bytes(p)
        tangents = _tangents_at_once(p, examples, blocks)
        memory = blocks + tangents * tangent_bytes(p.cost, examples, outputs=2)
        F = p.cost.forward_flops
        rows = p.B * p.rows_per_sample
        flops = p.B * p.P * 3 * F + rows * (p.cov.matmul_flops() + traffic() * p.P)
        passes = f"{p.P:,} JVPs per block of {examples:,} examples"
        return Estimate(self.name, flops, memory, tangents, passes, state=examples)

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        """``(f, result)``: each block's Jacobian ``(b, T, K, P)``, its selected rows contracted.

        The rows ``(b, T*S, P)`` go to a ``RowAccumulator``; the result is in canonical layout.
        """
        p = problem
        params = p.fm.params(p.differentiable)
        examples, tangents_at_once = estimate.state, estimate.chunk_size
        acc = RowAccumulator(p)
        q = p.group_size if p.kind == "joint" else 1
        chunks = row_chunks(p.B, p.rows_per_sample, examples * p.rows_per_sample, q)
        for chunk in progress_bar(
            chunks, p.progress, "explicit Jacobian blocks", total=len(chunks)
        ):
            sub = p.inputs.slice(chunk.samples.start, chunk.samples.stop)
            f, J = self._block(p, params, sub, tangents_at_once)
            whole = RowChunk(chunk.samples, slice(0, p.rows_per_sample))
            acc.add(whole, f, p.fm.unflatten(_select_rows(p, J, whole)))
        return acc.result()

    @staticmethod
    def _block(p: Problem, params, sub, tangents_at_once: int) -> tuple[Tensor, Tensor]:
        """``(f, J)`` for the examples of ``sub``: ``J (b, T, K, P)`` by unit-tangent JVPs."""
        J, f = None, None
        for cols in spans(p.P, tangents_at_once):
            n = cols.stop - cols.start
            unit = torch.zeros(n, p.P, dtype=p.fm.dtype, device=sub.device)
            unit[torch.arange(n), torch.arange(cols.start, cols.stop)] = 1
            f, JV = push_tangents(p.fm, params, sub, p.fm.unflatten(unit))
            column = JV.reshape(n, sub.batch_size, p.T, p.K).permute(1, 2, 3, 0)
            if p.differentiable:
                J = column if J is None else torch.cat([J, column], dim=-1)
                continue
            if J is None:
                J = column.new_empty(sub.batch_size, p.T, p.K, p.P)
            J[..., cols] = column
        return f, J


def _select_rows(p: Problem, J: Tensor, chunk: RowChunk) -> Tensor:
    """``(b, T, K, P)`` -> rows ``(b, T*S, P)`` of the asked-for outputs."""
    b = J.shape[0]
    if p.outputs is not None:
        index = p.outputs[chunk.samples].unsqueeze(-1).expand(-1, -1, -1, p.P)
        J = J.gather(2, index)
    return J.reshape(b, p.rows_per_sample, p.P)
