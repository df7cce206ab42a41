"""Rows of a joint covariance's factor for one batch: ``J L`` (or ``J``), by forward JVPs.

The joint covariance of examples held by different ranks, ``J S J^T`` across all of them, needs
something of every example on one rank. With ``S = L L^T`` (``r = cov.sqrt_cols`` columns),
``A = J L`` has ``r`` numbers per output and ``J S J^T = A A^T``; when ``r`` exceeds the number
of parameters ``P`` (a low rank plus a diagonal, say), ``J`` itself is smaller and the product is
``J (S J^T)``. Either way the columns are the forward strategy's
(:func:`pushforward.engine.pushed_columns`): one JVP per column for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.core.cost import ChunkPlan, tangent_bytes
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.options import Options
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine import Problem, pushed_columns

__all__ = ["joint_plan", "joint_rows", "row_width"]


def row_width(problem: Problem) -> tuple[int, bool]:
    """``(w, by_factor)``: the numbers per output row, and whether they are ``J L``'s."""
    by_factor = problem.cov.sqrt_cols <= problem.P
    return (problem.cov.sqrt_cols if by_factor else problem.P), by_factor


def joint_plan(problem: Problem) -> ChunkPlan:
    """The chunks of columns.

    The rows ``(B, E, w)`` and the outputs are held; one column is the forward strategy's tangent
    through the batch (its unit row and tangent, ``w + P`` numbers) and the covariance's
    temporaries.
    """
    width, _ = row_width(problem)
    B, E = problem.B, problem.cost.output_numel
    held = (B * E * width + B * E) * problem.itemsize
    per = tangent_bytes(problem.cost, B, outputs=2, extra_numbers=width + problem.P)
    per += problem.cov.workspace_bytes(1)
    return problem.budget.plan(per, held, width, f"{width:,} JVPs through {B:,} examples")


def joint_rows(
    fm: FunctionalModel,
    x: Any,
    cov: CovarianceOperator,
    *,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The outputs and the rows of ``J L`` (or of ``J``) of every example and output.

    Returns:
        ``(f (B, ...), A (B, E, w))``: per example and output (``E`` outputs per example), the
        row of ``J L`` (``w = r``) or of ``J`` (``w = P`` when ``r > P``).

    Raises:
        ValueError: ``strategy`` other than ``"auto"`` (the rows are always pushed forward).
    """
    if strategy != "auto":
        raise ValueError(
            f"a joint covariance gathered across ranks is pushed by JVPs; strategy={strategy!r} "
            "does not apply (use 'auto')"
        )
    options = Options(memory_budget=memory_budget, chunk_size=chunk_size, progress=progress)
    inputs = fm.prepare(x).detach()
    problem = Problem.build(fm, inputs, cov, "joint", options)
    B, E = problem.B, problem.cost.output_numel
    width, by_factor = row_width(problem)
    plan = joint_plan(problem)
    out = torch.empty(B, E, width, dtype=problem.dtype, device=inputs.device)
    f: Tensor | None = None
    with torch.no_grad():
        for cols, outputs, JT in pushed_columns(problem, plan.chunk, by_factor):
            out[:, :, cols] = JT.reshape(cols.stop - cols.start, B, E).permute(1, 2, 0)
            f = outputs
    assert f is not None  # width >= 1
    return f, out
