"""The diagonal of a curvature, ``sum_n sum_r (J_n^T u_nr)^2``, from the layer pieces of a pass.

Per layer call (see :mod:`pushforward.layers`):

* an affine weight applied once per example (``z = W x``): its gradient rows are ``G_r x^T``,
  so the diagonal is ``sum_n (sum_r G_nr^2)^T x_n^2`` — one ``(out, B) x (B, in)`` product per
  chunk, no per-example row;
* a bias: its rows are ``G`` summed over the positions it is broadcast to, squared;
* anything else (weight sharing over positions, convolutions, embeddings): the layer's own
  per-example weight-gradient rows (``G ⊗ x`` summed over positions,
  :meth:`~pushforward.layers.LayerCall.weight_rows`), squared.

The rows of parameters on no layer call come from the pass and are squared.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pushforward.core.cost import ModelCost
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.precision import accumulation_dtype
from pushforward.layers import (
    LayerCall,
    LayerStructure,
    OneHot,
    Pieces,
    RowSquares,
    add_row_squares,
    dense,
)

__all__ = ["DiagonalSums"]


class DiagonalSums:
    """The running diagonal of a pass (a :class:`~pushforward.curvature.passes.Consumer`).

    Args:
        fm: the model; one sum per selected parameter.
        what: names the computation in plans and errors.
    """

    structured = True
    allow_unstructured = True  # per-example rows of every parameter give the same diagonal
    squares = True  # a layer applied once needs only its directions' squares summed over rows

    def __init__(self, fm: FunctionalModel, what: str = "the curvature's diagonal") -> None:
        self.fm, self.what = fm, what
        self.params = fm.params(False)
        dtype = accumulation_dtype(fm.dtype)
        devices = {p.device for p in self.params.values()}
        #: ``(P,)``: the sums side by side, or ``None`` when the parameters are on several devices
        self.flat: Tensor | None = None
        if len(devices) == 1:
            self.flat = torch.zeros(fm.num_params, dtype=dtype, device=devices.pop())
            self.sums = fm.unflatten(self.flat)  # views into it
        else:
            self.sums = {n: torch.zeros_like(p, dtype=dtype) for n, p in self.params.items()}

    def held_bytes(self) -> int:
        """The sums (and their flat copy at the end, for parameters on several devices)."""
        copies = 1 if self.flat is not None else 2
        return copies * self.fm.num_params * accumulation_dtype(self.fm.dtype).itemsize

    def total(self) -> Tensor:
        """``(P,)``: the sums as one vector, in the parameters' order."""
        return self.flat if self.flat is not None else self.fm.flatten(self.sums)

    def row_bytes(self, structure: LayerStructure | None, cost: ModelCost) -> int:
        """The gradient rows formed where no closed form applies (twice: formed and squared).

        A layer applied once per example forms none: its weight's and bias's sums come from its
        directions' row squares.
        """
        if structure is None:
            return 0
        shapes = self.fm.param_shapes
        size = sum(
            math.prod(shapes[n]) for c in structure.calls if not c.geometry.once for n in c.names
        )
        return 2 * size * cost.itemsize

    def add(self, pieces: Pieces) -> None:
        """Add the squares of one chunk's rows to each parameter's sum.

        Closed forms per layer where the layer structure gives them, the per-example rows of every
        other parameter.
        """
        for call, a, G in pieces.layers():
            self._layer(call, a, G)
        for name, rows in pieces.rows.items():
            self.sums[name] += rows.square().sum((0, 1))

    def _layer(self, call: LayerCall, a: Tensor, G: Tensor | OneHot | RowSquares) -> None:
        geometry, sums = call.geometry, self.sums
        if geometry.once:
            g2 = G.values if isinstance(G, RowSquares) else add_row_squares(dense(G))
            g2 = g2.reshape(g2.shape[0], -1)  # (b, out)
            if call.weight_name is not None:
                x2 = geometry.inputs(a)[:, 0].square()  # (b, in)
                geometry.matrix(sums[call.weight_name]).addmm_(g2.T, x2)  # a view: in place
            if call.bias_name is not None:
                sums[call.bias_name] += g2.sum(0)
            return
        if isinstance(G, RowSquares):  # a rung gives them only for layers applied once
            raise RuntimeError(
                f"layer call {call.index} applies its weight at several positions: its diagonal "
                "needs the directions themselves, not their row squares"
            )
        G = dense(G)
        for name in call.names:
            if name == call.bias_name:
                rows = geometry.bias_rows(G)
            else:
                rows = call.weight_rows(a, G, self.params)
            sums[name] += rows.square().sum((0, 1)).reshape(sums[name].shape)
