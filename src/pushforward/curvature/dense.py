"""The dense curvature ``sum_n sum_r (J_n^T u_nr)(J_n^T u_nr)^T`` from a pass's per-example rows.

For small P only: the result has ``P^2`` entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pushforward.core.cost import ModelCost
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.precision import accumulation_dtype
from pushforward.layers import LayerStructure, Pieces

__all__ = ["DenseSums"]


class DenseSums:
    """The running ``(S, S)`` sum of a pass's row outer products.

    A :class:`~pushforward.curvature.passes.Consumer` of every parameter's per-example rows, with no
    layer structure.

    Args:
        fm: the model.
        indices: restrict to these positions of the flat parameter vector, in this order
            (``S = len(indices)``; default all, ``S = P``).
        what: names the computation in plans and errors.
    """

    structured = False
    allow_unstructured = True
    squares = False  # the directions themselves are needed

    def __init__(
        self, fm: FunctionalModel, indices: Tensor | None = None, what: str = "the dense curvature"
    ) -> None:
        self.fm, self.indices, self.what = fm, indices, what
        size = fm.num_params if indices is None else len(indices)
        self.total = torch.zeros(size, size, dtype=accumulation_dtype(fm.dtype), device=fm.device)

    def held_bytes(self) -> int:
        """The sum (and its reduced copy at the end)."""
        return 2 * self.total.numel() * self.total.element_size()

    def row_bytes(self, structure: LayerStructure | None, cost: ModelCost) -> int:
        """A row flattened (and restricted) once more."""
        return 2 * self.total.shape[0] * cost.itemsize

    def add(self, pieces: Pieces) -> None:
        """Add the outer products of one chunk's per-example rows (restricted to ``indices``)."""
        rows = self.fm.flatten(pieces.rows)
        if self.indices is not None:
            rows = rows[..., self.indices]
        rows = rows.reshape(-1, rows.shape[-1])
        self.total.addmm_(rows.T, rows)
