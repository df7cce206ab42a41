"""Layer structure and the one producer of layer pieces (directly above ``pushforward.core``).

* ``pushforward.layers.tracing`` — which parameters are the weight or bias of a linear,
  convolution or embedding call used once (the only module that knows ops by name);
* ``pushforward.layers.geometry`` — each such call's geometry, normalized: inputs and
  directions at positions, the weight as a matrix, Kronecker factor order, gradient rows;
* ``pushforward.layers.structure`` — the structure of a model for an input signature
  (traced once, cached);
* ``pushforward.layers.directions`` — the output directions a pass takes back;
* ``pushforward.layers.pieces`` — :func:`produce`: per chunk, each layer's input and output
  directions and the other parameters' rows, by the first rung of one ladder that can (a
  hand-differentiated chain, the same for a forward read as a chain, a batched backward,
  ``vmap`` over examples, a loop);
* ``pushforward.layers.chain`` — the hand-differentiated chain of an ``nn.Sequential``;
* ``pushforward.layers.traced_chain`` — a chain read from any module's autograd graph.

The functional variance's closed forms (``pushforward.engine``), the curvature passes
(:mod:`pushforward.curvature`) and the samples all use this package through the names below.
"""

from pushforward.layers.chain import ELEMENTWISE, Chain, chain_intact, find_chain
from pushforward.layers.directions import (
    Directions,
    GivenRows,
    OneHot,
    OneHotRows,
    RowSquares,
    add_row_squares,
    dense,
)
from pushforward.layers.geometry import LayerGeometry
from pushforward.layers.pieces import (
    BY_HAND,
    RUNGS,
    SQUARES_GROUP_BYTES,
    Pieces,
    first_rung,
    produce,
    rungs,
    squares_apply,
    unit_rows,
)
from pushforward.layers.structure import LayerStructure, layer_structure
from pushforward.layers.tracing import (
    Analysis,
    LayerCall,
    LayerTap,
    StructureError,
    analyze,
    is_same_memory,
)

__all__ = [
    "BY_HAND",
    "ELEMENTWISE",
    "RUNGS",
    "SQUARES_GROUP_BYTES",
    "Analysis",
    "Chain",
    "Directions",
    "GivenRows",
    "LayerCall",
    "LayerGeometry",
    "LayerStructure",
    "LayerTap",
    "OneHot",
    "OneHotRows",
    "Pieces",
    "RowSquares",
    "StructureError",
    "add_row_squares",
    "analyze",
    "dense",
    "chain_intact",
    "find_chain",
    "first_rung",
    "is_same_memory",
    "layer_structure",
    "produce",
    "rungs",
    "squares_apply",
    "unit_rows",
]
