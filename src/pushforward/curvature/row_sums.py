"""Curvature sums from per-example VJP rows: GGN, Monte Carlo GGN and empirical Fisher.

All three are sums of outer products of per-example rows ``J(x_n)^T u`` for cotangents ``u`` in
output space::

    G = sum_n sum_r (J_n^T u_nr) (J_n^T u_nr)^T

* GGN: ``u_n1..u_nR`` are the rows of a factor ``C_n`` of the loss Hessian w.r.t. the outputs,
  ``L_n = C_n^T C_n``, so ``G = sum_n J_n^T L_n J_n`` (:func:`softmax_hessian_factor` gives one
  for softmax cross-entropy; the identity's rows for squared error);
* Monte Carlo GGN: ``u_ns`` are sampled output gradients scaled by ``1/sqrt(S)``;
* empirical Fisher: ``u_n`` is the loss gradient w.r.t. the outputs (one row per example).

:func:`outer_product_sum` computes ``G`` or its diagonal in chunks of at most ``chunk_size`` rows,
so neither the Jacobian (``B x K x P``) nor the cotangents of the whole batch are ever held: the
diagonal needs ``O(chunk_size * P)`` working memory, the dense sum ``P^2`` plus that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk
from pushforward.core.cost import Budget, measure_cost, row_bytes
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.options import Options
from pushforward.products.vjp import iter_row_chunks

__all__ = ["outer_product_sum", "softmax_hessian_factor"]


def softmax_hessian_factor(probs: Tensor, rows: slice | None = None) -> Tensor:
    """Rows of a factor of the softmax cross-entropy Hessian ``diag(p) - p p^T``.

    Row ``r`` is ``sqrt(p_r) (e_r - p)``; summed over all ``K`` rows their outer products give
    ``diag(p) - p p^T`` exactly (no eigendecomposition).

    Args:
        probs: ``(b, K)`` class probabilities.
        rows: which rows (default all ``K``).

    Returns:
        ``(b, r, K)``.
    """
    rows = slice(0, probs.shape[-1]) if rows is None else rows
    scale = probs[:, rows].sqrt()  # (b, r)
    factor = -scale.unsqueeze(-1) * probs.unsqueeze(1)  # (b, r, K)
    index = torch.arange(rows.start, rows.stop, device=probs.device)
    factor[:, torch.arange(len(index), device=probs.device), index] += scale
    return factor


def outer_product_sum(
    fm: FunctionalModel,
    inputs: Inputs,
    rows_per_sample: int,
    make_cotangents: Callable[[RowChunk], Tensor],
    *,
    diagonal: bool,
    indices: Tensor | None = None,
    memory_budget: int | str | None = None,
) -> Tensor:
    """``sum_n sum_r (J_n^T u_nr)(J_n^T u_nr)^T`` over the batch, or its diagonal.

    Args:
        fm: the model; rows are over its P selected parameters.
        inputs: the batch of ``B`` examples.
        rows_per_sample: R, the cotangents per example.
        make_cotangents: ``chunk -> (b, r, *f_b)``: the cotangents of the chunk's examples
            (``chunk.samples``) and rows (``chunk.rows``); called once per chunk, so the
            cotangents of the whole batch need not exist at once.
        diagonal: return the diagonal ``(S,)`` instead of the dense ``(S, S)`` sum.
        indices: restrict to these positions of the flat parameter vector, in this order
            (``S = len(indices)``; default all, ``S = P``).
        memory_budget: bounds the rows computed at once (bytes or e.g. ``"1GB"``; default half
            of the available memory), after the result's own ``S`` or ``S^2`` entries.

    Returns:
        ``(S,)`` or ``(S, S)``, detached.
    """
    params = fm.params(False)
    cost = measure_cost(fm, inputs)
    size = fm.num_params if indices is None else len(indices)
    held = (size if diagonal else size * size) * cost.itemsize
    budget = Budget.of(Options(memory_budget=memory_budget).budget_bytes(inputs.device))
    per = row_bytes(cost, 0 if diagonal else size * cost.itemsize)
    chunk_size = budget.chunk(per, held)
    budget.require(budget.peak(held, chunk_size, per), "the curvature sum")
    with torch.no_grad():
        chunks = iter_row_chunks(
            fm,
            params,
            inputs.detach(),
            rows_per_sample,
            make_cotangents,
            chunk_size,
            flat=not diagonal,
        )
        if diagonal:
            sums = {n: torch.zeros_like(p) for n, p in params.items()}
            for _, _, rows in chunks:
                for name, r in rows.items():
                    # row by row in place: a (rows, *shape) square would be one more chunk-sized
                    # allocation (and its page faults) per parameter
                    acc = sums[name]
                    for row in r.flatten(0, 1):
                        acc.addcmul_(row, row)
            flat = fm.flatten(sums)
            return flat if indices is None else flat[indices]
        total = next(iter(params.values())).new_zeros(size, size)
        for _, _, rows in chunks:
            r = rows if indices is None else rows[..., indices]
            r = r.reshape(-1, size)
            total.addmm_(r.T, r)
        return total
