"""Rows of a joint covariance's factor for one batch: ``J L`` (or ``J``), by forward-mode JVPs.

The joint covariance of examples held by different ranks, ``J S J^T`` across all of them, needs
something of every example on one rank. With ``S = L L^T`` (``r = cov.sqrt_cols`` columns),
``A = J L`` has ``r`` numbers per output and ``J S J^T = A A^T``; when ``r`` exceeds the number
of parameters ``P`` (a low rank plus a diagonal, say), ``J`` itself is smaller and the product is
``J (S J^T)``. Either way the columns are pushed in chunks: ``J T^T`` for tangent rows ``T`` —
``L e_j`` (:meth:`~pushforward.covariance.CovarianceOperator.sqrt_rows` of unit rows) or unit
vectors — one JVP per column for the whole batch (:func:`~pushforward.products.jvp.push_tangents`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.core.cost import Budget, measure_cost, tangent_bytes
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.options import Options
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.problem import bind_covariance
from pushforward.products.jvp import push_tangents

__all__ = ["joint_rows"]


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
    """``(f (B, ...), A (B, E, w))``: the outputs and, per example and output (``E`` outputs
    per example), the row of ``J L`` (``w = r``) or of ``J`` (``w = P`` when ``r > P``).
    ``strategy`` must be ``"auto"`` (the rows are always pushed forward); ``progress`` is
    accepted for the signature's sake of :func:`~pushforward.functional_covariance`."""
    if strategy != "auto":
        raise ValueError(
            f"a joint covariance gathered across ranks is pushed by JVPs; strategy={strategy!r} "
            "does not apply (use 'auto')"
        )
    options = Options(memory_budget=memory_budget, chunk_size=chunk_size, progress=progress)
    inputs = fm.prepare(x).detach()
    cost = measure_cost(fm, inputs)
    S = bind_covariance(fm, cov, cost.output_dtype, inputs.device)
    P, B = fm.num_params, inputs.batch_size
    E = cost.output_numel
    width = min(S.sqrt_cols, P)
    by_factor = S.sqrt_cols <= P
    budget = Budget.of(options.budget_bytes(inputs.device), options.chunk_size)
    held = (B * E * width + B * E) * cost.itemsize
    per = tangent_bytes(cost, B, outputs=2, extra_numbers=width + P) + S.workspace_bytes(1)
    chunk = budget.chunk(per, held, at_most=width)
    budget.require(budget.peak(held, chunk, per), f"{width:,} JVPs through {B:,} examples")
    params = fm.params(False)
    out = torch.empty(B, E, width, dtype=cost.output_dtype, device=inputs.device)
    f: Tensor | None = None
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        unit = torch.zeros(stop - start, width, dtype=cost.output_dtype, device=inputs.device)
        unit[torch.arange(stop - start), torch.arange(start, stop)] = 1
        tangents = S.sqrt_rows(unit) if by_factor else unit  # (c, P)
        f, JT = push_tangents(fm, params, inputs, fm.unflatten(tangents))  # (c, B, *f_b)
        out[:, :, start:stop] = JT.reshape(stop - start, B, E).permute(1, 2, 0)
    assert f is not None  # width >= 1
    return f, out
