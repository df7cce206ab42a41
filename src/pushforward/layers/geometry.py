"""The geometry of a traced layer call, normalized once: how its weight maps inputs to outputs.

Every layer the tracer recognizes (``pushforward.layers.tracing``) is one of two shapes of
computation, whatever op ran it:

* **affine**: at each of ``T`` positions of an example, ``z_t = W x_t + b`` with ``W`` an
  ``out x in`` matrix (per group of a grouped convolution) and ``x_t`` the input at that
  position — a linear layer's features (``T`` = every leading dimension of one example), a
  convolution's unfolded input patches (``T`` = output locations), Hugging Face ``Conv1D`` with
  its weight stored transposed;
* **lookup**: an embedding, ``z_t = W[id_t]`` (a padding index's row gets no gradient).

:class:`LayerGeometry` holds what differs between ops (storage order of the weight, where the
features sit in the output, the patch extraction, groups, the padding index) and offers the
normalized views every closed form is written against: inputs at positions ``(b, T, in)``,
output directions at positions ``(b, r, T, out)``, the weight as an ``(out, in)`` matrix and
back, a Kronecker pair in storage order, per-example weight and bias gradient rows. A closed
form (a functional variance contraction, a curvature diagonal, K-FAC) therefore never asks
which op a layer was: adding a layer type touches the tracer (which fills this in) and the
formulas that want to treat it specially, nothing else.

Shapes: ``a`` is a chunk's layer input ``(b, *a_n)`` and ``G`` its output directions
``(b, r, *z_n)`` for ``b`` examples and ``r`` directions, ``a_n``/``z_n`` one example's shapes
inside the model (with the example's own batch dimension of size 1 when the model keeps one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pushforward.core.einsum import einsum

__all__ = ["LayerGeometry", "Patches"]


@dataclass(frozen=True)
class Patches:
    """A convolution's input patch extraction (1-d or 2-d).

    ``(b, C, *spatial)`` -> ``(b, C * prod(kernel), L)`` in the weight's ``(C, *kernel)`` order,
    after the convolution's own zero padding, at its ``L`` output locations.

    Attributes:
        kernel: the kernel's spatial size.
        stride: the convolution's stride per spatial dimension.
        dilation: the convolution's dilation per spatial dimension.
        padding: ``(before, after)`` zero padding per spatial dimension.
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]

    def __call__(self, x: Tensor) -> Tensor:
        """The patches ``(b, C * prod(kernel), L)`` of inputs ``x (b, C, *spatial)``."""
        kernel, stride, dilation, pads = self.kernel, self.stride, self.dilation, self.padding
        if len(kernel) == 1:  # as a 2-d convolution of height 1
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            pads = ((0, 0), *pads)
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
        return F.unfold(x, kernel, dilation=dilation, stride=stride)


@dataclass(frozen=True)
class LayerGeometry:
    """How one traced layer call's weight maps its input to its output (module docstring).

    Attributes:
        lookup: an embedding (else affine).
        weight_shape: the weight's storage shape.
        out_features: outputs per position (all groups together); an embedding's width.
        in_features: inputs per position and group (a patch's size for a convolution); an
            embedding's vocabulary.
        groups: a grouped convolution's groups (1 otherwise).
        transposed: the weight is stored ``(in, out)`` (Hugging Face ``Conv1D``).
        feature_dim: where the features sit in one example's output ``z_n`` (``-1``: last).
        positions: ``T``, the positions of one example (output locations, tokens, ...).
        spatial: a convolution's spatial dimensions (0 for other layers).
        patches: the input patch extraction of a 1-d/2-d convolution (``None`` otherwise).
        padding_idx: an embedding's padding index (non-negative), or ``None``.
    """

    lookup: bool
    weight_shape: torch.Size
    out_features: int
    in_features: int
    groups: int
    transposed: bool
    feature_dim: int
    positions: int
    spatial: int = 0
    patches: Patches | None = None
    padding_idx: int | None = None

    # -- what the layer is ----------------------------------------------------------------
    @property
    def once(self) -> bool:
        """An ungrouped affine map applied at one position per example.

        Its Jacobian block for direction ``g`` is ``g x^T`` (no sum over positions).
        """
        return not self.lookup and self.groups == 1 and self.positions == 1 and self.unfoldable

    @property
    def unfoldable(self) -> bool:
        """The inputs at positions can be formed (every layer but a 3-d convolution)."""
        return self.lookup or self.spatial == 0 or self.patches is not None

    @property
    def plain(self) -> bool:
        """A linear layer over features stored last (no patches, no groups).

        Only such a layer can be a model's output head.
        """
        return not self.lookup and self.spatial == 0 and self.groups == 1

    # -- normalized views -------------------------------------------------------------------
    def inputs(self, a: Tensor) -> Tensor:
        """``(b, *a_n)`` -> ``(b, T, groups * in)``: the input at every position (affine)."""
        b = a.shape[0]
        if self.spatial == 0:
            return a.reshape(b, -1, a.shape[-1])
        if self.patches is None:
            raise NotImplementedError("a 3-d convolution's input patches are not formed")
        x = a.reshape(b, -1, *a.shape[a.dim() - self.spatial :])  # (b, C_in, *spatial)
        return self.patches(x).transpose(1, 2)

    def outputs(self, G: Tensor) -> Tensor:
        """``(b, r, *z_n)`` -> ``(b, r, T, out)``: the directions at every position."""
        b, r = G.shape[:2]
        if self.feature_dim == -1:
            return G.reshape(b, r, -1, G.shape[-1])
        return G.movedim(2 + self.feature_dim, -1).reshape(b, r, -1, self.out_features)

    def token_ids(self, a: Tensor) -> Tensor:
        """An embedding's ids ``(b, *a_n)`` -> ``(b, T)``."""
        return a.reshape(a.shape[0], -1)

    def kept(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """``1`` where a token's embedding row depends on the weight (not the padding index)."""
        if self.padding_idx is None:
            return torch.ones(ids.shape, dtype=dtype, device=ids.device)
        return (ids != self.padding_idx).to(dtype)

    def matrix(self, W: Tensor) -> Tensor:
        """A weight-shaped tensor (storage order) as the ``(out, in)`` matrix of the affine map.

        A convolution's is ``(out, in / groups * prod(kernel))``.
        """
        return W.T if self.transposed else W.reshape(self.weight_shape[0], -1)

    def storage(self, M: Tensor) -> Tensor:
        """The inverse of :meth:`matrix`: an ``(out, in)`` matrix in the weight's storage order."""
        return (M.T if self.transposed else M).reshape(self.weight_shape)

    def pair(self, output_side: Tensor, input_side: Tensor) -> tuple[Tensor, Tensor]:
        """A Kronecker pair in the weight's storage order.

        ``(first, second)`` with the block ``first ⊗ second`` of the row-major flattened weight
        (an embedding's rows are its tokens, a transposed weight's rows its inputs).
        """
        if self.transposed or self.lookup:
            return input_side, output_side
        return output_side, input_side

    # -- per-example gradient rows -----------------------------------------------------------
    def weight_rows(self, a: Tensor, G: Tensor) -> Tensor:
        """``(b, r, numel(W))``: per example and direction, the weight's gradient.

        The gradient is ``sum_t g_t x_t^T`` (an embedding: ``g_t`` added to its token's row), in
        storage order.
        """
        b, r = G.shape[:2]
        g = self.outputs(G)  # (b, r, T, out)
        if self.lookup:
            ids = self.token_ids(a)
            g = g * self.kept(ids, g.dtype).view(b, 1, -1, 1)
            rows = g.new_zeros(b, r, self.in_features, self.out_features)
            index = ids.view(b, 1, -1, 1).expand(b, r, -1, self.out_features)
            return rows.scatter_add_(2, index, g).reshape(b, r, -1)
        x = self.inputs(a)  # (b, T, groups * in)
        k = self.groups
        x = x.reshape(b, x.shape[1], k, -1)
        g = g.reshape(b, r, g.shape[2], k, -1)
        rows = einsum("brtgo,btgi->brgoi", g, x).reshape(b, r, self.out_features, -1)
        if self.transposed:
            rows = rows.transpose(-1, -2)
        return rows.reshape(b, r, -1)

    def bias_rows(self, G: Tensor) -> Tensor:
        """``(b, r, out)``: a bias's rows, the directions summed over the positions."""
        return self.outputs(G).sum(2)


def patches_of(weight_shape: torch.Size, static: dict, channels_first: bool) -> Patches | None:
    """The :class:`Patches` of a 1-d/2-d convolution, or ``None`` for a 3-d convolution.

    Made from ``weight_shape`` and the call's ``stride``/``padding``/``dilation`` in ``static``
    (numbers, tuples, ``"valid"`` or ``"same"``); ``None`` too for inputs not channels-first.
    """
    spatial = len(weight_shape) - 2
    if spatial not in (1, 2) or not channels_first:
        return None
    kernel = tuple(int(k) for k in weight_shape[2:])
    stride, dilation = (_ntuple(static.get(k, 1), spatial) for k in ("stride", "dilation"))
    padding = static.get("padding", 0)
    if padding == "valid":
        pads = ((0, 0),) * spatial
    elif padding == "same":  # total d*(k-1), the extra one after (as PyTorch does)
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in _ntuple(padding, spatial))
    return Patches(kernel, stride, dilation, pads)


def _ntuple(value, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


def positions_of(output_shape: torch.Size, out_features: int) -> int:
    """``T``: an example's output entries per feature."""
    return max(1, math.prod(output_shape) // max(out_features, 1))
