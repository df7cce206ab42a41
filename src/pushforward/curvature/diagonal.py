"""The diagonal of a curvature, ``sum_n sum_r (J_n^T u_nr)^2``, from a :class:`Sweep`.

Per matched layer call (see :mod:`pushforward.curvature.sweep`):

* a linear weight applied once per example (``z = W a``): its gradient rows are ``G_r a^T``, so
  the diagonal is ``sum_n (sum_r G_nr^2)^T a_n^2`` — one ``(out, B) x (B, in)`` product per chunk,
  no per-example row;
* a bias: its rows are ``G`` summed over the positions it is broadcast to, squared;
* anything else (weight sharing over positions, convolutions, embeddings): the layer's own
  per-example weight-gradient rows (``G ⊗ a`` summed over positions, by the structured strategy's
  :class:`~pushforward.engine.structure.layer_contractions.GroupContraction`), squared.

Generic parameters' rows come from the sweep and are squared.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pushforward.curvature.data import shard_total
from pushforward.curvature.sweep import Layers, Sweep
from pushforward.engine.structure.layer_contractions import GroupContraction
from pushforward.engine.structure.tracing import LayerCall

__all__ = ["accumulate_diagonal", "is_linear_once"]


def is_linear_once(call: LayerCall) -> bool:
    """A linear layer applied once per example (its output in one example is one vector)."""
    return call.kind in ("linear", "addmm") and math.prod(call.output_shape[:-1]) == 1


def _rows_bytes(layers: Layers, sweep: Sweep, itemsize: int) -> int:
    """Bytes per row of the layer rows formed where no closed form applies."""
    shapes = sweep.fm.param_shapes
    size = sum(
        math.prod(shapes[n])
        for c in layers.calls
        for n in c.names
        if not (is_linear_once(c) and n == c.weight_name)
    )
    return 2 * size * itemsize


def accumulate_diagonal(sweep: Sweep, data, what: str = "the curvature's diagonal"):
    """``({name: diagonal of the parameter's shape}, number of examples)`` over the data (over
    every rank's shard when ``data`` is sharded, see :meth:`Batches.total`)."""
    fm = sweep.fm
    params = fm.params(False)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    itemsize = next(iter(params.values())).element_size()
    held = 2 * fm.num_params * itemsize
    count = 0
    pieces = sweep.pieces(
        data, held, lambda layers, cost: _rows_bytes(layers, sweep, cost.itemsize), what
    )
    for piece in pieces:
        if piece.first:
            count += piece.examples
        for call, a, G in zip(piece.layers.calls, piece.a, piece.G, strict=True):
            _add_layer(sums, call, a, G, params)
        for name, rows in piece.rows.items():
            sums[name] += rows.square().sum((0, 1))
    *totals, examples = shard_total(
        data, [*sums.values(), torch.tensor([count], dtype=torch.float64)]
    )
    return dict(zip(sums, totals, strict=True)), int(examples)


def _add_layer(sums: dict[str, Tensor], call: LayerCall, a: Tensor, G: Tensor, params) -> None:
    b, r = G.shape[:2]
    if is_linear_once(call):
        # G is this chunk's own tensor: square it in place (no second chunk-sized allocation)
        g2 = G.square_().sum(1).reshape(b, -1)  # (b, out)
        if call.weight_name is not None:
            a2 = a.reshape(b, -1).square()  # (b, in)
            if call.kind == "addmm":  # weight (in, out)
                sums[call.weight_name].addmm_(a2.T, g2)
            else:  # weight (out, in)
                sums[call.weight_name].addmm_(g2.T, a2)
        if call.bias_name is not None:
            sums[call.bias_name] += g2.sum(0)
        return
    for name in call.names:
        if call.kind in ("linear", "addmm") and name == call.bias_name:
            rows = G.reshape(b, r, -1, G.shape[-1]).sum(2)  # summed over positions
            sums[name] += rows.square_().sum((0, 1))
        else:
            rows = GroupContraction(call, (name,), None).rows(a, G, params)
            sums[name] += rows.square_().sum((0, 1)).reshape(sums[name].shape)
