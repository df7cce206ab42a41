"""Explicit per-example Jacobians, computed example by example in bounded chunks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk
from pushforward.core.cost import measure_cost
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.options import Options
from pushforward.products.vjp import (
    collect_rows,
    iter_row_chunks,
    one_hot_cotangents,
    row_chunk_size,
)

__all__ = ["jacobian"]


def jacobian(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    chunk_size: int | None = None,
    *,
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-example Jacobians ``J[..., p] = d f[...] / d theta_p``.

    Each example's rows come from its own backward passes (``vmap`` over examples), so the work
    is linear in the batch size; ``chunk_size`` bounds the rows computed at once (default: as
    many as ``memory_budget`` allows). The result itself has ``f.numel() * P`` entries and
    counts against ``memory_budget``.

    Returns:
        ``(f, J)`` with ``J.shape == f.shape + (P,)``.
    """
    options = Options(
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    cost = measure_cost(fm, inputs)
    shape, dtype = cost.output_shape, cost.output_dtype
    rows_per_sample = math.prod(shape)

    def make(chunk: RowChunk) -> Tensor:
        b = chunk.samples.stop - chunk.samples.start
        index = torch.arange(chunk.rows.start, chunk.rows.stop, device=inputs.device).expand(b, -1)
        return one_hot_cotangents(index, shape, dtype)

    rows = inputs.batch_size * rows_per_sample
    chunk = row_chunk_size(
        fm, inputs, options, rows * cost.param_bytes, f"the Jacobian of {rows:,} outputs"
    )
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        params = fm.params(differentiable)
        f, J = collect_rows(
            iter_row_chunks(
                fm, params, inputs, rows_per_sample, make, chunk, progress, "jacobian rows"
            ),
            inputs.batch_size,
            rows_per_sample,
            fm.num_params,
        )
    return f, J.reshape(*f.shape, fm.num_params)
