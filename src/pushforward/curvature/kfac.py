"""K-FAC: one Kronecker-factored block per layer weight, from the layer pieces of a pass.

For a layer ``z = W x`` applied at ``T`` positions per example, with output gradients
``g_ntr = J_z^T u_nr`` (``u_nr`` the rows of the curvature, see
:mod:`pushforward.curvature.directions`) — curvlinops' ``KFACLinearOperator`` conventions, which
laplace-torch's ``KronLaplace`` uses:

* ``"expand"``: ``A = 1/(N T) sum_nt x_nt x_nt^T``, ``G = sum_ntr g_ntr g_ntr^T``;
* ``"reduce"``: ``A = 1/N sum_n xbar_n xbar_n^T`` with ``xbar_n = mean_t x_nt``,
  ``G = sum_nr (sum_t g_ntr)(sum_t g_ntr)^T``;

``N`` the number of examples; ``G`` is divided by ``N`` for ``reduction="mean"`` (``A`` is always
an average). The weight's block is ``G ⊗ A`` in its storage order (``A ⊗ G`` for a weight stored
``(in, out)`` such as Hugging Face ``Conv1D``'s, see
:meth:`~pushforward.layers.LayerGeometry.pair`), a bias's block is ``G``.

Layers: affine maps over any number of positions (linear layers, ``Conv1D``, 1-d and 2-d
convolutions with ``groups=1``: ``x`` their unfolded input patches, positions the output
locations); embeddings (the vocabulary side's factor is the diagonal matrix of token
frequencies, ``V x V``; padding tokens left out). Other parameters — not a layer's weight or
bias, grouped or 3-d convolutions — get a diagonal block (the exact diagonal of their
curvature) or, with ``generic="dense"``, a dense one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pushforward.core.cost import ModelCost
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.gram import add_gram, gram, mirror_upper, rows_of
from pushforward.core.precision import accumulation_dtype
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker_blocks import KroneckerFactors
from pushforward.covariance.operator import CovarianceOperator
from pushforward.layers import LayerCall, LayerStructure, Pieces, dense

__all__ = ["APPROXIMATIONS", "KFACFactors", "KFACSums", "kfac_blocks", "kfac_supported"]

APPROXIMATIONS = ("expand", "reduce")


def kfac_supported(call: LayerCall) -> bool:
    """The layer call gets Kronecker factors (else its parameters get generic blocks)."""
    g = call.geometry
    return g.lookup or (g.unfoldable and g.groups == 1)


@dataclass
class LayerFactors:
    """Running sums of one layer call's factors."""

    call: LayerCall
    A: Tensor | None = None  # input side (in x in), or token counts (V x V) for an embedding
    G: Tensor | None = None  # output side (out x out)
    #: the sides summed by :func:`~pushforward.core.gram.add_gram` (their lower blocks stale
    #: until :meth:`finish`)
    grams: set[str] = field(default_factory=set)

    def add(self, side: str, part: Tensor) -> None:
        """Add a ready-made sum ``part`` to side ``"A"`` or ``"G"``."""
        total = getattr(self, side)
        setattr(self, side, part if total is None else _summed(total, part))

    def add_rows(self, side: str, X: Tensor, alpha: float = 1.0) -> None:
        """Add ``alpha X^T X`` of rows ``X (n, d)`` to side ``"A"`` or ``"G"``."""
        setattr(self, side, add_gram(getattr(self, side), X, alpha))
        self.grams.add(side)

    def finish(self) -> None:
        """Complete the sums of Gram matrices (their blocks below the diagonal)."""
        for side in self.grams:
            setattr(self, side, mirror_upper(getattr(self, side)))
        self.grams.clear()


def _scaled(total: Tensor, scale: float) -> Tensor:
    """``total * scale``, in place in a spent sum where no gradient flows."""
    if scale == 1.0:
        return total
    return total * scale if total.requires_grad else total.mul_(scale)


def _summed(total: Tensor, part: Tensor) -> Tensor:
    """``total + part``, in place in the running sum where no gradient flows."""
    if total.requires_grad or part.requires_grad:
        return total + part
    return total.add_(part)


@dataclass
class KFACFactors:
    """The summed factors of every layer and the generic blocks' sums (see the module docstring).

    Attributes:
        layers: per layer call (by index), its factors.
        generic: per parameter with a generic block, the diagonal sum (its shape) or the dense
            sum ``(n, n)``.
        examples: N, the number of examples seen.
    """

    layers: dict[int, LayerFactors] = field(default_factory=dict)
    generic: dict[str, Tensor] = field(default_factory=dict)
    examples: int = 0

    def tensors(self) -> list[Tensor]:
        """Every sum, in a fixed order (layers by index, then generic blocks by name)."""
        values = [t for _, f in sorted(self.layers.items()) for t in (f.A, f.G) if t is not None]
        return values + [self.generic[n] for n in sorted(self.generic)]

    def replace_tensors(self, values: list[Tensor]) -> None:
        """Put ``values`` (as :meth:`tensors` lists them, e.g. summed over ranks) back."""
        parts = iter(values)
        for _, factors in sorted(self.layers.items()):
            factors.A = None if factors.A is None else next(parts)
            factors.G = None if factors.G is None else next(parts)
        self.generic = {n: next(parts) for n in sorted(self.generic)}


class KFACSums:
    """K-FAC's running factor sums over a pass (a :class:`~pushforward.curvature.passes.Consumer`).

    Args:
        fm: the model.
        approx: ``"expand"`` or ``"reduce"``.
        generic: ``"diagonal"`` or ``"dense"`` blocks for the parameters without factors.
        what: names the computation in plans and errors.
    """

    structured = True
    allow_unstructured = False  # the blocks are the layers'
    squares = False  # the directions themselves are needed

    def __init__(self, fm: FunctionalModel, approx: str, generic: str, what: str = "K-FAC") -> None:
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
        if generic not in ("diagonal", "dense"):
            raise ValueError(f"generic must be 'diagonal' or 'dense', got {generic!r}")
        self.fm, self.approx, self.generic, self.what = fm, approx, generic, what
        self.params = fm.params(False)
        self.factors = KFACFactors()

    def result(self) -> KFACFactors:
        """The factors summed over the pass, their Gram matrices completed."""
        for factors in self.factors.layers.values():
            factors.finish()
        return self.factors

    def held_bytes(self) -> int:
        """Bytes of the factors and generic blocks.

        An upper bound: every tensor's ``out^2 + in^2``, or ``numel^2`` / ``numel`` for a generic
        block.
        """
        held = 0
        for shape in self.fm.param_shapes.values():
            n = math.prod(shape)
            sides = shape[0] ** 2 + (n // shape[0]) ** 2 if len(shape) > 1 else n * n
            held += sides if self.generic == "dense" or len(shape) > 1 else n
        return held * accumulation_dtype(self.fm.dtype).itemsize

    def row_bytes(self, structure: LayerStructure | None, cost: ModelCost) -> int:
        """Bytes the factors form per row (an upper bound).

        The directions at positions, unfolded patches, and the generic layers' rows.
        """
        shapes = self.fm.param_shapes
        z = 0 if structure is None else structure.z_numel()
        rows = 0
        if structure is not None:
            rows = sum(
                math.prod(shapes[n])
                for c in structure.calls
                if not kfac_supported(c)
                for n in c.names
            )
        return 2 * (z + rows) * cost.itemsize

    def add(self, pieces: Pieces) -> None:
        """Fold one chunk's layer pieces into the factor sums and the generic blocks.

        The input-side factors and the example count are added on a chunk's first rows of its
        examples only (later row chunks repeat the same inputs).
        """
        result = self.factors
        if pieces.first:
            result.examples += pieces.examples
        for call, a, G in pieces.layers():
            G = dense(G)
            if kfac_supported(call):
                factors = result.layers.setdefault(call.index, LayerFactors(call))
                self._layer(call, a, G, pieces.first, factors)
                continue
            for name in call.names:
                if name == call.bias_name:
                    rows = call.geometry.bias_rows(G)
                else:
                    rows = call.weight_rows(a, G, self.params)
                self._add_generic(name, rows.reshape(-1, rows.shape[-1]))
        for name, rows in pieces.rows.items():
            self._add_generic(name, rows.reshape(-1, rows[0, 0].numel()))

    def _layer(
        self, call: LayerCall, a: Tensor, G: Tensor, first: bool, factors: LayerFactors
    ) -> None:
        """Add one chunk's factor sums to ``factors``.

        ``A`` only where ``first``: a chunk of later rows repeats its examples' inputs.
        """
        geometry = call.geometry
        g = geometry.outputs(G)  # (b, r, T, out)
        b = g.shape[0]
        if geometry.lookup:
            ids = geometry.token_ids(a)  # (b, T)
            keep = geometry.kept(ids, G.dtype)
            # a padding token's row gets no gradient: its positions are left out of both factors
            g = g * keep.view(b, 1, -1, 1)
            if first:
                vocab = geometry.in_features
                if self.approx == "expand":
                    counts = torch.zeros(vocab, dtype=G.dtype, device=G.device)
                    counts.index_add_(0, ids.reshape(-1), keep.reshape(-1))
                    factors.add("A", torch.diag(counts / ids.shape[1]))
                else:
                    mean = torch.zeros(b, vocab, dtype=keep.dtype, device=ids.device)
                    mean.scatter_add_(1, ids, keep)
                    factors.add("A", gram(mean / ids.shape[1]))
        elif first:
            x = geometry.inputs(a)  # (b, T, in)
            if self.approx == "expand":
                factors.add_rows("A", x.reshape(-1, x.shape[-1]), 1.0 / x.shape[1])
            else:
                factors.add_rows("A", x.mean(1))
        if self.approx == "reduce":
            g = g.sum(2)
        factors.add_rows("G", rows_of(g))

    def _add_generic(self, name: str, rows: Tensor) -> None:
        """Add ``(m, n)`` rows to the generic block of ``name``."""
        part = gram(rows) if self.generic == "dense" else rows.square().sum(0)
        blocks = self.factors.generic
        blocks[name] = part if name not in blocks else _summed(blocks[name], part)


def kfac_blocks(
    fm: FunctionalModel, factors: KFACFactors, input_scale: float, output_scale: float
) -> dict[str, CovarianceOperator]:
    """The block of every selected parameter (in the model's order) from summed factors.

    ``A * input_scale`` and ``G * output_scale`` (the sums are scaled in place where no gradient
    flows: ``factors`` is spent); a zero diagonal for a parameter the data never reached.
    """
    blocks: dict[str, CovarianceOperator] = {}
    shapes = fm.param_shapes
    for layer in factors.layers.values():
        call, G = layer.call, _scaled(layer.G, output_scale)
        if call.weight_name is not None:
            first, second = call.geometry.pair(G, _scaled(layer.A, input_scale))
            blocks[call.weight_name] = KroneckerFactors(first, second, check=False)
        if call.bias_name is not None:
            blocks[call.bias_name] = Dense(G, check=False)
    for name, total in factors.generic.items():
        total = _scaled(total, output_scale)
        if total.dim() == 2 and total.shape[0] == total.shape[1] == math.prod(shapes[name]):
            blocks[name] = Dense(total, check=False)
        else:
            blocks[name] = Diagonal(total.reshape(-1), check=False)
    dtype, device = accumulation_dtype(fm.dtype), fm.device
    for name in fm.param_names:
        if name not in blocks:
            zero = torch.zeros(math.prod(shapes[name]), dtype=dtype, device=device)
            blocks[name] = Diagonal(zero, check=False)
    return {n: blocks[n] for n in fm.param_names}
