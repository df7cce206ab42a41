"""Contracting one layer's covariance block with its factored per-example Jacobian.

For a layer ``z = op(a, W, b)`` the Jacobian of output direction j of example n w.r.t. the
layer's parameters is determined by the layer input ``a_n`` and ``G_nj = d f_nj / d z_n``. A
:class:`GroupContraction` turns ``(a, G)`` of a chunk into that group's share of
``J S J^T`` without per-example parameter gradients where a closed form exists:

* linear layer applied once per example (no weight sharing), diagonal S:
  ``sum_o G_o^2 (sum_i V_oi a_i^2)``;
* the same with Kronecker S_W = B ⊗ A: ``(G B G^T)(a^T A a)``, or in eigen form
  ``sum_ij M_ij (G Q_out)_i^2 (Q_in^T a)_j^2``;
* a bias: its rows are ``G`` summed over the positions it is broadcast to;
* embedding, diagonal S: tokens with the same id share a row: ``sum_{t,t'} [id_t = id_t']
  sum_d G_td V_{id_t d} G_t'd``;
* anything else (convolutions, weight sharing over positions, dense or low-rank blocks): the
  layer's per-example weight-gradient rows are formed (from the layer's normalized geometry,
  ``pushforward.layers.LayerGeometry``: any stride, padding, dilation and groups) and
  contracted with the block's operator.

Joint covariances within groups of ``q`` consecutive examples (:meth:`GroupContraction.joint`)
pair every direction of an example with every direction of the others in its group: for a
linear layer applied once, ``(G_nj B G_ml^T)(a_n^T A a_m)`` for Kronecker blocks and
``sum_o G_nj,o G_ml,o sum_i V_oi a_ni a_mi`` for diagonal ones — q² small products per group,
never a parameter-sized row; elsewhere from the rows, each multiplied by the covariance once.

Shapes: ``a`` is ``(b, *a_n)`` and ``G`` is ``(b, c, *z_n)`` for ``b`` examples and ``c``
output directions, where ``a_n``/``z_n`` are one example's shapes inside the model (they keep a
singleton batch dimension). At the model's output layer ``G`` is one-hot and is passed as a
:class:`OneHot` (the index of each direction's output) instead of a dense tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pushforward.core.einsum import einsum
from pushforward.covariance.checks import psd_sqrt
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.isotropic import Isotropic
from pushforward.covariance.kronecker_blocks import KroneckerEigen, KroneckerFactors
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.contraction import gram
from pushforward.layers import LayerCall, OneHot, dense

__all__ = ["GroupContraction", "Kernel", "QuadraticForm", "contraction_for", "fused"]

#: A layer group's variance ``(b, c)`` from its pieces ``(a, G)``.
Kernel = Callable[[Tensor, "Tensor | OneHot"], Tensor]


@dataclass(frozen=True)
class QuadraticForm:
    """A layer group's variance for directions ``G (b, c, out)`` at one position.

    It is written ``sum_j (G L)_j^2 s_j`` with ``L (out, m)`` formed once (``factor``; ``None``:
    the identity, ``m = out``) and the scales ``s (b, m)`` of the layer's input ``x (b, in)``:

    * ``s = ((x F)^2) W + c`` — ``weights`` ``W (in', m)``, ``input_factor`` ``F (in, in')``
      (``None``: the identity), ``constant`` ``c (m,)`` (``None``: zero);
    * ``s = c`` for a group whose variance does not depend on the input (a bias: no weights);
    * ``s = scales(x)`` for any other dependence.

    Groups on one layer add up by concatenating ``L`` and ``s``.
    """

    factor: Tensor | None
    weights: Tensor | None = None
    input_factor: Tensor | None = None
    constant: Tensor | None = None
    scales: Callable[[Tensor], Tensor] | None = None

    @property
    def varies(self) -> bool:
        """The scales depend on the layer's input."""
        return self.weights is not None or self.scales is not None

    def scales_of(self, x: Tensor) -> Tensor:
        """``s (b, m)`` for inputs ``x (b, in)`` (the constant included)."""
        if self.scales is not None:
            s = self.scales(x)
            return s if self.constant is None else s + self.constant
        if self.weights is None:
            return self.constant.expand(x.shape[0], -1)
        y = x if self.input_factor is None else x @ self.input_factor
        y = y * y
        return (
            y @ self.weights
            if self.constant is None
            else torch.addmm(self.constant, y, self.weights)
        )


def _grouped(x: Tensor, q: int) -> Tensor:
    """``(b, ...)`` -> ``(b / q, q, ...)``."""
    return x.reshape(x.shape[0] // q, q, *x.shape[1:])


def _pairs(cov: Tensor) -> Tensor:
    """``(g, q, c, q, c)`` -> ``(g, q*c, q*c)``."""
    g, q, c = cov.shape[:3]
    return cov.reshape(g, q * c, q * c)


def _pair_products(a: Tensor) -> Tensor:
    """``(g, q, i)`` -> ``(g, q, q, i)``: ``a_n * a_m`` for every pair of a group."""
    return a.unsqueeze(2) * a.unsqueeze(1)


def _weighted_pairs(G: Tensor, a: Tensor, M: Tensor) -> Tensor:
    """``sum_{o,i} G[g,n,j,o] M[o,i] a[g,n,i] a[g,m,i] G[g,m,l,o]`` for the examples of a group.

    ``G (g, q, c, o)``, ``a (g, q, i)``, ``M (o, i)`` -> ``(g, q c, q c)``, for every pair of
    examples ``n, m`` of each group. Only the pairs ``n <= m`` are contracted (the result is
    symmetric), each as a broadcast product, one matmul with ``M`` and one batched matmul (a
    three-operand ``einsum`` would search a contraction path at every call).
    """
    g, q, c = G.shape[:3]
    n, m = torch.triu_indices(q, q, device=G.device)
    U = (a[:, n] * a[:, m]) @ M.T  # (g, pairs, o)
    pairs = (G[:, n] * U.unsqueeze(2)) @ G[:, m].transpose(-1, -2)  # (g, pairs, c, c)
    full = pairs.new_zeros(g, q, q, c, c)
    full[:, n, m] = pairs
    full[:, m, n] = pairs.transpose(-1, -2)
    return full.transpose(2, 3).reshape(g, q * c, q * c)


def _same_output(index: Tensor) -> Tensor:
    """``(g, q, c)`` output indices -> ``(g, q, c, q, c)`` indicator of equal outputs."""
    flat = index.reshape(index.shape[0], -1)
    same = flat.unsqueeze(-1) == flat.unsqueeze(-2)
    return same.reshape(*index.shape, *index.shape[1:])


class GroupContraction:
    """Rows-based contraction: forms the group's per-example gradient rows ``(b, c, P_g)``."""

    closed_form = False

    def __init__(self, call: LayerCall, names: tuple[str, ...], op: CovarianceOperator) -> None:
        self.call, self.names, self.op = call, names, op

    # -- rows ---------------------------------------------------------------------------
    def rows(self, a: Tensor, G: Tensor | OneHot, params: dict[str, Tensor]) -> Tensor:
        """``(b, c, P_g)`` per-example gradient rows of the group's parameters (group order)."""
        G = dense(G)
        parts = [
            self.call.geometry.bias_rows(G)
            if name == self.call.bias_name
            else self.call.weight_rows(a, G, params)
            for name in self.names
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    # -- results --------------------------------------------------------------------------
    def variance(self, a: Tensor, G: Tensor | OneHot, params: dict[str, Tensor]) -> Tensor:
        """``(b, c)``: the group's share of each direction's variance."""
        R = self.rows(a, G, params)
        b, c, P = R.shape
        return self.op.quadratic_rows(R.reshape(b * c, P)).reshape(b, c)

    def covariance(
        self, a: Tensor, G: Tensor | OneHot, params: dict[str, Tensor], S: int
    ) -> Tensor:
        """``(b, c // S, S, S)``: covariance between the S directions of each position."""
        R = self.rows(a, G, params)
        b, c, P = R.shape
        return gram(self.op, R.reshape(b, c // S, S, P))

    def joint(self, a: Tensor, G: Tensor | OneHot, params: dict[str, Tensor], q: int) -> Tensor:
        """``(b / q, q c, q c)``: covariance between all directions of a group's examples.

        The groups are of ``q`` consecutive examples.
        """
        R = self.rows(a, G, params)
        b, c, P = R.shape
        return gram(self.op, R.reshape(b // q, q * c, P))

    def variance_kernel(self, params: dict[str, Tensor]) -> Kernel:
        """:meth:`variance` as a function of ``(a, G)`` alone.

        What depends only on the covariance and the parameters is formed once (for replayed
        calls: valid while neither changes).
        """
        return lambda a, G: self.variance(a, G, params)

    def quadratic_form(self) -> QuadraticForm | None:
        """The group's variance as a :class:`QuadraticForm`, or ``None`` when it has none.

        Only a layer applied at one position has one.
        """
        return None


def _diagonal_like(op: CovarianceOperator) -> bool:
    return isinstance(op, (Diagonal, Isotropic))


def _flat_pairs(M: Tensor, k: Tensor, S: int) -> Tensor:
    """``M[k_s, k_u]`` for the S directions of each position: ``(b, c // S, S, S)``."""
    b, c = k.shape
    k = k.reshape(b, c // S, S)
    return M[k.unsqueeze(-1), k.unsqueeze(-2)]


class _Bias(GroupContraction):
    """A bias with any block ``B``.

    Rows ``e_k`` give ``B_kk``, other rows (the directions summed over positions) ``r^T B r``.
    """

    closed_form = True

    def _unit(self, G: Tensor | OneHot) -> bool:
        return isinstance(G, OneHot) and self.call.geometry.feature_dim == -1  # outputs last

    def variance(self, a, G, params):
        if self._unit(G):
            v = self.op.diagonal()
            return v[G.index % v.shape[0]]
        R = self.call.geometry.bias_rows(dense(G))
        b, c, out = R.shape
        return self.op.quadratic_rows(R.reshape(b * c, out)).reshape(b, c)

    def variance_kernel(self, params):
        v, op, geometry = self.op.diagonal(), self.op, self.call.geometry

        def kernel(a: Tensor, G: Tensor | OneHot) -> Tensor:
            if self._unit(G):
                return v[G.index % v.shape[0]]
            R = geometry.bias_rows(G)
            b, c, out = R.shape
            return op.quadratic_rows(R.reshape(b * c, out)).reshape(b, c)

        return kernel

    def quadratic_form(self) -> QuadraticForm | None:
        if self.call.geometry.positions != 1 or self.call.geometry.feature_dim != -1:
            return None
        L = self.op.sqrt_dense()  # (out, r)
        return QuadraticForm(L, constant=L.new_ones(L.shape[1]))


class _BiasDiagonal(_Bias):
    """A bias with a diagonal block: ``sum_o rows_o^2 v_o``."""

    def variance(self, a, G, params):
        v = self.op.diagonal()
        if self._unit(G):
            return v[G.index % v.shape[0]]
        R = self.call.geometry.bias_rows(dense(G))
        return (R * R) @ v

    def covariance(self, a, G, params, S):
        v = self.op.diagonal()
        R = self.call.geometry.bias_rows(dense(G))
        b, c, out = R.shape
        R = R.reshape(b, c // S, S, out)
        return einsum("btso,o,btuo->btsu", R, v, R)

    def joint(self, a, G, params, q):
        v = self.op.diagonal()
        if self._unit(G):
            k = _grouped(G.index % v.shape[0], q)  # (g, q, c)
            return _pairs(_same_output(k).to(v.dtype) * v[k][..., None, None])
        R = self.call.geometry.bias_rows(dense(G))  # (b, c, out)
        R = R.reshape(R.shape[0] // q, q * R.shape[1], R.shape[2])  # (g, q c, out)
        return (R * v) @ R.transpose(-1, -2)

    def variance_kernel(self, params):
        v, geometry = self.op.diagonal(), self.call.geometry

        def kernel(a: Tensor, G: Tensor | OneHot) -> Tensor:
            if self._unit(G):
                return v[G.index % v.shape[0]]
            R = geometry.bias_rows(G)
            return (R * R) @ v

        return kernel

    def quadratic_form(self) -> QuadraticForm | None:
        if self.call.geometry.positions != 1 or self.call.geometry.feature_dim != -1:
            return None
        return QuadraticForm(None, constant=self.op.diagonal())


class _LinearDiagonal(GroupContraction):
    """An affine weight applied once per example, diagonal block.

    Its bias's diagonal block is fused in when both are asked (:func:`fused`): the directions'
    squares are formed once for both, ``sum_o G_o^2 (sum_i V_oi a_i^2 + v_o)``.
    """

    closed_form = True

    def __init__(
        self,
        call: LayerCall,
        names: tuple[str, ...],
        op: CovarianceOperator,
        bias: _BiasDiagonal | None = None,
    ) -> None:
        super().__init__(call, names + (() if bias is None else bias.names), op)
        self.bias = bias

    def _V(self) -> Tensor:
        """The variances as the ``(out, in)`` matrix of the map."""
        geometry = self.call.geometry
        return geometry.matrix(self.op.diagonal().reshape(geometry.weight_shape))

    def _weights(self, a: Tensor) -> Tensor:
        """``w_bo = sum_i V_oi a_bi^2`` (plus the bias's variance ``v_o``): ``(b, out)``."""
        a = self.call.geometry.inputs(a)[:, 0]  # (b, in)
        w = (a * a) @ self._V().T
        return w if self.bias is None else w + self.bias.op.diagonal()

    def variance(self, a, G, params):
        w = self._weights(a)
        if isinstance(G, OneHot):
            return w.gather(1, G.index)
        G = G.reshape(*G.shape[:2], -1)
        return (G * G * w.unsqueeze(1)).sum(-1)  # an elementwise pass: no batch of tiny matmuls

    def covariance(self, a, G, params, S):
        w = self._weights(a)
        if isinstance(G, OneHot):
            b, c = G.index.shape
            k = G.index.reshape(b, c // S, S)
            same = (k.unsqueeze(-1) == k.unsqueeze(-2)).to(w.dtype)
            return same * w.gather(1, G.index).reshape(b, c // S, S).unsqueeze(-1)
        b, c = G.shape[:2]
        G = G.reshape(b, c // S, S, -1)
        return einsum("btso,bo,btuo->btsu", G, w, G)

    def joint(self, a, G, params, q):
        V = self._V()  # (out, in)
        x = _grouped(self.call.geometry.inputs(a)[:, 0], q)  # (g, q, in)
        if isinstance(G, OneHot):
            W = _pair_products(x) @ V.T  # (g, q, q, out)
            k = _grouped(G.index, q)  # (g, q, c)
            picked = W.permute(0, 1, 3, 2).gather(2, k.unsqueeze(-1).expand(*k.shape, q))
            out = _pairs(_same_output(k).to(W.dtype) * picked.unsqueeze(-1))  # (g,q,c,q,c)
        else:
            out = _weighted_pairs(_grouped(G.reshape(*G.shape[:2], -1), q), x, V)
        return out if self.bias is None else out + self.bias.joint(a, G, params, q)

    def quadratic_form(self) -> QuadraticForm:
        v = None if self.bias is None else self.bias.op.diagonal()
        return QuadraticForm(None, weights=self._V().T.contiguous(), constant=v)

    def variance_kernel(self, params):
        VT = self._V().T.contiguous()
        v = None if self.bias is None else self.bias.op.diagonal()

        def kernel(a: Tensor, G: Tensor | OneHot) -> Tensor:
            x = a.reshape(a.shape[0], -1)  # one position: the input itself
            w = (x * x) @ VT
            if v is not None:
                w = w + v
            if isinstance(G, OneHot):
                return w.gather(1, G.index)
            G = G.reshape(*G.shape[:2], -1)
            return (G * G * w.unsqueeze(1)).sum(-1)

        return kernel


class _LinearKronecker(GroupContraction):
    """An affine weight applied once per example, Kronecker block (factors or eigen form)."""

    closed_form = True

    def _sides(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(output side, input side, eigenvalues (out, in) or None)`` of the block.

        The factors, or the eigenvectors and eigenvalues of the eigen form.
        """
        block, geometry = self.op, self.call.geometry
        if isinstance(block, KroneckerFactors):
            return (*geometry.pair(block.out_factor, block.in_factor), None)
        Qg, Qa = geometry.pair(block.out_eigvecs, block.in_eigvecs)
        return Qg, Qa, geometry.matrix(block.eigvals)

    def _parts(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """The output side and the per-example scales of the block for inputs ``a``.

        ``(Fg, s)`` for a factor pair: the output-side factor and ``a^T A a`` per example; or
        ``(Qg, u)`` for the eigen form: output-side eigenvectors and
        ``u_bo = sum_i M_oi (Q_a^T a_b)_i^2``.
        """
        a = self.call.geometry.inputs(a)[:, 0]  # (b, in)
        Fg, Fa, M = self._sides()
        if M is None:
            return Fg, einsum("bi,ij,bj->b", a, Fa, a)
        a_hat = a @ Fa
        return Fg, (a_hat * a_hat) @ M.T

    def _eigen(self) -> bool:
        return isinstance(self.op, KroneckerEigen)

    def variance(self, a, G, params):
        Fg, s = self._parts(a)
        if self._eigen():
            g_hat = Fg[G.index] if isinstance(G, OneHot) else G.reshape(*G.shape[:2], -1) @ Fg
            return einsum("bco,bo->bc", g_hat * g_hat, s)
        if isinstance(G, OneHot):
            return s[:, None] * Fg.diagonal()[G.index]
        G = G.reshape(*G.shape[:2], -1)
        return s[:, None] * einsum("bco,op,bcp->bc", G, Fg, G)

    def quadratic_form(self) -> QuadraticForm:
        Fg, Fa, M = self._sides()
        if M is None:  # (G B G^T)(x^T A x): L = a square root of B, the scale x^T A x
            L = psd_sqrt(Fg, "a Kronecker block's output-side factor")

            def pair_scales(x: Tensor) -> Tensor:
                return ((x @ Fa) * x).sum(-1, keepdim=True).expand(-1, L.shape[1])

            return QuadraticForm(L, scales=pair_scales)
        return QuadraticForm(Fg, weights=M.T.contiguous(), input_factor=Fa)

    def variance_kernel(self, params):
        Fg, Fa, M = self._sides()
        MT = None if M is None else M.T.contiguous()
        diag = Fg.diagonal().contiguous()

        def kernel(a: Tensor, G: Tensor | OneHot) -> Tensor:
            x = a.reshape(a.shape[0], -1)  # one position: the input itself
            unit = isinstance(G, OneHot)
            if MT is None:  # a factor pair: (G B G^T)(x^T A x)
                s = ((x @ Fa) * x).sum(-1, keepdim=True)
                if unit:
                    return s * diag[G.index]
                G = G.reshape(*G.shape[:2], -1)
                return s * ((G @ Fg) * G).sum(-1)
            x_hat = x @ Fa
            u = (x_hat * x_hat) @ MT  # (b, out)
            g_hat = Fg[G.index] if unit else G.reshape(*G.shape[:2], -1) @ Fg
            return (g_hat * g_hat * u.unsqueeze(1)).sum(-1)

        return kernel

    def covariance(self, a, G, params, S):
        Fg, s = self._parts(a)
        if self._eigen():
            g_hat = Fg[G.index] if isinstance(G, OneHot) else G.reshape(*G.shape[:2], -1) @ Fg
            b, c, out = g_hat.shape
            g_hat = g_hat.reshape(b, c // S, S, out)
            return einsum("btso,bo,btuo->btsu", g_hat, s, g_hat)
        if isinstance(G, OneHot):
            return s[:, None, None, None] * _flat_pairs(Fg, G.index, S)
        b, c = G.shape[:2]
        G = G.reshape(b, c // S, S, -1)
        return s[:, None, None, None] * einsum("btso,op,btup->btsu", G, Fg, G)

    def joint(self, a, G, params, q):
        Fg, Fa, M = self._sides()
        a = _grouped(self.call.geometry.inputs(a)[:, 0], q)  # (g, q, in)
        if M is None:
            s = (a @ Fa) @ a.transpose(-1, -2)  # (g, q, q)
            if isinstance(G, OneHot):
                k = _grouped(G.index, q)  # (g, q, c)
                flat = k.reshape(k.shape[0], -1)
                H = Fg[flat.unsqueeze(-1), flat.unsqueeze(-2)].reshape(*k.shape, *k.shape[1:])
            else:
                Gg = _grouped(G.reshape(*G.shape[:2], -1), q)  # (g, q, c, out)
                Gf = Gg.reshape(Gg.shape[0], -1, Gg.shape[-1])  # (g, q c, out)
                H = ((Gf @ Fg) @ Gf.transpose(-1, -2)).reshape(*Gg.shape[:3], *Gg.shape[1:3])
            return _pairs(H * s[:, :, None, :, None])
        if isinstance(G, OneHot):
            g_hat = Fg[_grouped(G.index, q)]  # (g, q, c, out)
        else:
            g_hat = _grouped(G.reshape(*G.shape[:2], -1), q) @ Fg
        return _weighted_pairs(g_hat, a @ Fa, M)


class _EmbeddingDiagonal(GroupContraction):
    """Embedding with diagonal S: tokens with equal ids share a parameter row."""

    closed_form = True

    def _parts(self, a: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        geometry = self.call.geometry
        ids = geometry.token_ids(a)  # (b, T)
        G = geometry.outputs(G)  # (b, c, T, d)
        kept = geometry.kept(ids, G.dtype)
        same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).to(G.dtype)
        same = same * kept.unsqueeze(-1) * kept.unsqueeze(-2)
        V = self.op.diagonal().reshape(geometry.weight_shape)
        shared = einsum("btu,bcud->bctd", same, G)
        return G, V[ids], shared

    def variance(self, a, G, params):
        G, Vsel, shared = self._parts(a, dense(G))
        return einsum("bctd,btd,bctd->bc", G, Vsel, shared)

    def covariance(self, a, G, params, S):
        G, Vsel, shared = self._parts(a, dense(G))
        b, c, T, d = G.shape
        G = G.reshape(b, c // S, S, T, d)
        shared = shared.reshape(b, c // S, S, T, d)
        return einsum("bxstd,btd,bxutd->bxsu", G, Vsel, shared)


def fused(contractions: list[GroupContraction]) -> list[GroupContraction]:
    """``contractions`` with each layer's diagonal weight and bias blocks in one contraction.

    The fused contraction forms their directions' squares once.
    """
    biases = {
        c.call.index: c
        for c in contractions
        if type(c) is _BiasDiagonal and c.call.geometry.feature_dim == -1
    }
    out: list[GroupContraction] = []
    taken: set[int] = set()
    for c in contractions:
        bias = biases.get(c.call.index)
        if type(c) is _LinearDiagonal and c.bias is None and bias is not None:
            out.append(_LinearDiagonal(c.call, c.names, c.op, bias))
            taken.add(c.call.index)
        elif not (type(c) is _BiasDiagonal and c is biases.get(c.call.index)):
            out.append(c)
    return out + [b for i, b in biases.items() if i not in taken]


def contraction_for(
    call: LayerCall, names: tuple[str, ...], op: CovarianceOperator, joint: bool
) -> GroupContraction | None:
    """The contraction for a covariance group on one layer call, or None.

    None if the group must go through the generic strategies (embeddings with a non-diagonal
    block, or any embedding in a joint covariance: their rows are vocabulary-sized).
    """
    geometry = call.geometry
    if geometry.lookup:
        if joint or not (_diagonal_like(op) and names == (call.weight_name,)):
            return None
        return _EmbeddingDiagonal(call, names, op)
    if names == (call.bias_name,):
        return _BiasDiagonal(call, names, op) if _diagonal_like(op) else _Bias(call, names, op)
    if geometry.once and names == (call.weight_name,):
        if _diagonal_like(op):
            return _LinearDiagonal(call, names, op)
        if isinstance(op, (KroneckerFactors, KroneckerEigen)):
            return _LinearKronecker(call, names, op)
    return GroupContraction(call, names, op)
