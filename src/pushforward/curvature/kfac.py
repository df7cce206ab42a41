"""K-FAC: one Kronecker-factored block per layer weight, from a :class:`Sweep`.

For a layer ``z = W a`` applied at ``T`` positions per example, with output gradients
``g_ntr = J_z^T u_nr`` (``u_nr`` the rows of the curvature, see
:mod:`pushforward.curvature.sweep`) — curvlinops' ``KFACLinearOperator`` conventions, which
laplace-torch's ``KronLaplace`` uses:

* ``"expand"``: ``A = 1/(N T) sum_nt a_nt a_nt^T``, ``G = sum_ntr g_ntr g_ntr^T``;
* ``"reduce"``: ``A = 1/N sum_n abar_n abar_n^T`` with ``abar_n = mean_t a_nt``,
  ``G = sum_nr (sum_t g_ntr)(sum_t g_ntr)^T``;

``N`` the number of examples; ``G`` is divided by ``N`` for ``reduction="mean"`` (``A`` is always
an average). The weight's block is ``G ⊗ A`` for its row-major flattening (``A ⊗ G`` for Hugging
Face ``Conv1D``, whose weight is stored ``(in, out)``), a bias's block is ``G``.

Layers: linear (``F.linear``, ``addmm``) over any number of positions; 1-d and 2-d convolutions
with ``groups=1`` (``a`` are the unfolded input patches, positions the output locations);
embeddings (the vocabulary side's factor is the diagonal matrix of token frequencies, ``V x V``).
Other parameters — not a layer's weight or bias, grouped or 3-d convolutions — get a diagonal
block (the exact diagonal of their curvature) or, with ``generic="dense"``, a dense one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pushforward.curvature.data import shard_total
from pushforward.curvature.sweep import Layers, Piece, Sweep
from pushforward.engine.structure.layer_contractions import GroupContraction
from pushforward.engine.structure.patches import conv_patches
from pushforward.engine.structure.tracing import LayerCall

__all__ = ["KFACFactors", "accumulate_kfac", "kfac_supported"]

APPROXIMATIONS = ("expand", "reduce")


def kfac_supported(call: LayerCall) -> bool:
    """The layer call gets Kronecker factors (else its parameters get generic blocks)."""
    if call.kind in ("linear", "addmm", "embedding"):
        return True
    return (
        call.kind == "conv"
        and len(call.weight_shape) in (3, 4)
        and call.static.get("groups", 1) == 1
    )


@dataclass
class _LayerFactors:
    """Running sums of one layer call's factors."""

    call: LayerCall
    A: Tensor | None = None  # input side (in x in), or token counts (V,) for an embedding
    G: Tensor | None = None  # output side (out x out)

    def add(self, A: Tensor | None, G: Tensor) -> None:
        if A is not None:
            self.A = A if self.A is None else self.A + A
        self.G = G if self.G is None else self.G + G


@dataclass
class KFACFactors:
    """The summed factors of every layer and the generic blocks' sums (see the module docstring).

    Attributes:
        layers: per matched layer call (by index), its factors.
        generic: per parameter with a generic block, the diagonal sum (its shape) or the dense
            sum ``(n, n)``.
        examples: N, the number of examples seen.
    """

    layers: dict[int, _LayerFactors] = field(default_factory=dict)
    generic: dict[str, Tensor] = field(default_factory=dict)
    examples: int = 0


def _positions_first(call: LayerCall, a: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``a (b, T, in)`` and ``G (b, r, T, out)`` for a linear or a convolution."""
    b, r = G.shape[:2]
    if call.kind in ("linear", "addmm"):
        inn = a.shape[-1]
        return a.reshape(b, -1, inn), G.reshape(b, r, -1, G.shape[-1])
    patches = conv_patches(call, a)  # (b, in_flat, O)
    out = call.weight_shape[0]
    g = G.reshape(b, r, out, -1)  # (b, r, out, O): channels first in a convolution's output
    return patches.transpose(1, 2), g.transpose(2, 3)


def _layer_sums(call: LayerCall, a: Tensor, G: Tensor, approx: str, first: bool):
    """``(A, G)`` sums of one chunk (``A`` None when the chunk repeats examples' inputs)."""
    b, r = G.shape[:2]
    if call.kind == "embedding":
        ids = a.reshape(b, -1)  # (b, T)
        keep = keep_ids(call, ids, G.dtype)
        # a padding token's row gets no gradient: its positions are left out of both factors
        g = G.reshape(b, r, ids.shape[1], -1) * keep.view(b, 1, -1, 1)  # (b, r, T, d)
        A = None
        if first:
            vocab = call.weight_shape[0]
            if approx == "expand":
                counts = torch.zeros(vocab, dtype=G.dtype, device=G.device)
                counts.index_add_(0, ids.reshape(-1), keep.reshape(-1))
                A = torch.diag(counts / ids.shape[1])
            else:
                A = _embedding_reduce(ids, keep, vocab)
        if approx == "reduce":
            g = g.sum(2)
        flat = g.reshape(-1, g.shape[-1])
        return A, flat.T @ flat
    a3, g4 = _positions_first(call, a, G)  # (b, T, in), (b, r, T, out)
    A = None
    if first:
        if approx == "expand":
            flat = a3.reshape(-1, a3.shape[-1])
            A = (flat.T @ flat) / a3.shape[1]
        else:
            mean = a3.mean(1)
            A = mean.T @ mean
    g = g4.sum(2) if approx == "reduce" else g4
    flat = g.reshape(-1, g.shape[-1])
    return A, flat.T @ flat


def keep_ids(call: LayerCall, ids: Tensor, dtype) -> Tensor:
    """``1`` where a token's embedding row depends on the weight (not the padding index)."""
    pad = call.static.get("padding_idx")
    if pad is None:
        return torch.ones_like(ids, dtype=dtype)
    vocab = call.weight_shape[0]
    return (ids != (pad if pad >= 0 else pad + vocab)).to(dtype)


def _embedding_reduce(ids: Tensor, keep: Tensor, vocab: int) -> Tensor:
    """``sum_n abar_n abar_n^T`` with ``abar_n`` the mean one-hot vector of example n's tokens."""
    b, T = ids.shape
    mean = torch.zeros(b, vocab, dtype=keep.dtype, device=ids.device)
    mean.scatter_add_(1, ids, keep)
    mean = mean / T
    return mean.T @ mean


def _rows_bytes(layers: Layers, sweep: Sweep, itemsize: int) -> int:
    """Per-row bytes of what the factors form: the positions' gradients, unfolded patches and
    generic layers' rows (an upper bound)."""
    shapes = sweep.fm.param_shapes
    rows = sum(math.prod(shapes[n]) for c in layers.calls if not kfac_supported(c) for n in c.names)
    return 2 * (layers.z_numel() + rows) * itemsize


def accumulate_kfac(
    sweep: Sweep, data, approx: str, generic: str, what: str = "K-FAC"
) -> KFACFactors:
    """Sum every layer's factors (and the generic blocks) over the data (over every rank's
    shard when ``data`` is sharded, see :meth:`Batches.total`)."""
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    if generic not in ("diagonal", "dense"):
        raise ValueError(f"generic must be 'diagonal' or 'dense', got {generic!r}")
    fm = sweep.fm
    params = fm.params(False)
    itemsize = next(iter(params.values())).element_size()
    shapes = fm.param_shapes
    # the factors and generic blocks (an upper bound: every tensor's out^2 + in^2 or numel^2)
    held = 0
    for shape in shapes.values():
        n = math.prod(shape)
        sides = shape[0] ** 2 + (n // shape[0]) ** 2 if len(shape) > 1 else n * n
        held += (sides if generic == "dense" or len(shape) > 1 else n) * itemsize
    result = KFACFactors()
    pieces = sweep.pieces(
        data, held, lambda layers, cost: _rows_bytes(layers, sweep, cost.itemsize), what
    )
    for piece in pieces:
        if piece.first:
            result.examples += piece.examples
        _add_piece(result, piece, params, approx, generic)
    return _total(result, data)


def _total(result: KFACFactors, data) -> KFACFactors:
    """``result`` summed over the shards (the same layers on every rank, else an error)."""
    layers = sorted(result.layers.items())
    names = sorted(result.generic)
    values = [t for _, f in layers for t in (f.A, f.G) if t is not None]
    values += [result.generic[n] for n in names]
    *totals, examples = shard_total(
        data, [*values, torch.tensor([result.examples], dtype=torch.float64)]
    )
    parts = iter(totals)
    for _, factors in layers:
        factors.A = None if factors.A is None else next(parts)
        factors.G = None if factors.G is None else next(parts)
    result.generic = {n: next(parts) for n in names}
    result.examples = int(examples)
    return result


def _add_piece(result: KFACFactors, piece: Piece, params, approx: str, generic: str) -> None:
    for index, (call, a, G) in enumerate(zip(piece.layers.calls, piece.a, piece.G, strict=True)):
        if kfac_supported(call):
            A, GG = _layer_sums(call, a, G, approx, piece.first)
            result.layers.setdefault(index, _LayerFactors(call)).add(A, GG)
            continue
        for name in call.names:
            rows = GroupContraction(call, (name,), None).rows(a, G, params)
            _add_generic(result, name, rows.reshape(-1, rows.shape[-1]), generic)
    for name, rows in piece.rows.items():
        _add_generic(result, name, rows.reshape(-1, rows[0, 0].numel()), generic)


def _add_generic(result: KFACFactors, name: str, rows: Tensor, generic: str) -> None:
    """Add ``(m, n)`` rows to the generic block of ``name``."""
    part = rows.T @ rows if generic == "dense" else rows.square().sum(0)
    result.generic[name] = part if name not in result.generic else result.generic[name] + part
