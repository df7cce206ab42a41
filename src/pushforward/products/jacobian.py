"""Explicit per-example Jacobians, computed example by example in bounded chunks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pushforward.core.budget import parse_memory
from pushforward.core.chunking import RowChunk
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.products.vjp import (
    collect_rows,
    example_output_shape,
    iter_row_chunks,
    one_hot_cotangents,
    reverse_chunk_size,
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
    many as ``memory_budget`` allows). The result itself has ``f.numel() * P`` entries.

    Returns:
        ``(f, J)`` with ``J.shape == f.shape + (P,)``.
    """
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    shape, dtype = example_output_shape(fm, inputs)
    rows_per_sample = math.prod(shape)

    def make(chunk: RowChunk) -> Tensor:
        b = chunk.samples.stop - chunk.samples.start
        index = torch.arange(chunk.rows.start, chunk.rows.stop, device=inputs.device).expand(b, -1)
        return one_hot_cotangents(index, shape, dtype)

    if chunk_size is None:
        chunk_size = reverse_chunk_size(fm, inputs, parse_memory(memory_budget, inputs.device))
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        params = fm.params(differentiable)
        f, J = collect_rows(
            iter_row_chunks(
                fm, params, inputs, rows_per_sample, make, chunk_size, progress, "jacobian rows"
            ),
            inputs.batch_size,
            rows_per_sample,
            fm.num_params,
        )
    return f, J.reshape(*f.shape, fm.num_params)
