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
from pushforward.layers import LayerCall, LayerStructure, Pieces, dense

__all__ = ["DiagonalSums"]


class DiagonalSums:
    """The running diagonal of a pass (a :class:`~pushforward.curvature.passes.Consumer`).

    Args:
        fm: the model; one sum per selected parameter.
        what: names the computation in plans and errors.
    """

    structured = True
    allow_unstructured = True  # per-example rows of every parameter give the same diagonal

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
        """The gradient rows formed where no closed form applies (twice: formed and squared)."""
        if structure is None:
            return 0
        shapes = self.fm.param_shapes
        size = sum(
            math.prod(shapes[n])
            for c in structure.calls
            for n in c.names
            if not (c.geometry.once and n == c.weight_name)
        )
        return 2 * size * cost.itemsize

    def add(self, pieces: Pieces) -> None:
        """Add the squares of one chunk's rows to each parameter's sum.

        Closed forms per layer where the layer structure gives them, the per-example rows of every
        other parameter.
        """
        for call, a, G in pieces.layers():
            self._layer(call, a, dense(G))
        for name, rows in pieces.rows.items():
            self.sums[name] += rows.square().sum((0, 1))

    def _layer(self, call: LayerCall, a: Tensor, G: Tensor) -> None:
        geometry, sums = call.geometry, self.sums
        if geometry.once:
            g2 = _row_squares(G).reshape(G.shape[0], -1)  # (b, out)
            if call.weight_name is not None:
                x2 = geometry.inputs(a)[:, 0].square()  # (b, in)
                geometry.matrix(sums[call.weight_name]).addmm_(g2.T, x2)  # a view: in place
            if call.bias_name is not None:
                sums[call.bias_name] += g2.sum(0)
            return
        for name in call.names:
            if name == call.bias_name:
                rows = geometry.bias_rows(G)
            else:
                rows = call.weight_rows(a, G, self.params)
            sums[name] += rows.square().sum((0, 1)).reshape(sums[name].shape)


#: Up to this many rows per example, their squares are summed one row at a time.
_FEW_ROWS = 32


def _row_squares(G: Tensor) -> Tensor:
    """``sum_r G[:, r]^2``: ``(b, *z)`` from rows ``G (b, r, *z)``.

    With few rows, one row at a time into the sum (no squared copy of all rows: the pass's peak
    memory is the rows themselves); else squared and summed at once.
    """
    if G.shape[1] > _FEW_ROWS:
        return G.square().sum(1)
    first, *rest = G.unbind(1)  # one call for all rows' views
    total = first.square()
    for row in rest:
        total.addcmul_(row, row)
    return total
