"""The traced chain: a custom module whose forward reads as a chain of linear layers and
elementwise activations in its autograd graph gets its layer pieces by hand — the same pieces as
the batched backward, exact against the brute-force Jacobian — and anything else is refused by
the graph, never read as a chain."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pushforward as pf
from pushforward.core.chunking import RowChunk
from pushforward.curvature import GGN
from pushforward.layers import (
    GivenRows,
    OneHotRows,
    StructureError,
    dense,
    layer_structure,
    produce,
)
from pushforward.testing import brute_force_jacobian

DT = torch.float64

#: Activations a traced chain takes (functional forms, as a custom ``forward`` writes them).
ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "elu": lambda z: F.elu(z, 0.7),
    "softplus": lambda z: F.softplus(z, beta=2.0),
    "hardtanh": lambda z: F.hardtanh(z, -0.5, 0.5),
    "relu_inplace": lambda z: torch.relu_(z),
}


class MLP(nn.Module):
    """Three linear layers with an activation between each (its own ``forward``)."""

    def __init__(self, act=torch.relu, bias: bool = True) -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(5, 7, bias=bias)
        self.fc2 = nn.Linear(7, 6, bias=bias)
        self.head = nn.Linear(6, 4, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class NotAChain(MLP):
    """The MLP with one thing that makes it not a chain (``kind``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(7, elementwise_affine=False)
        self.frozen = nn.Linear(7, 7).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        z1 = self.fc1(x)
        kind = self.kind
        if kind == "skip":  # the first layer's output reaches the second layer twice
            h = torch.relu(z1) + z1
        elif kind == "normalized":
            h = torch.relu(self.norm(z1))
        elif kind == "frozen_between":
            h = torch.relu(self.frozen(torch.relu(z1)))
        elif kind == "changed_in_place":
            h = torch.relu(z1.mul_(2.0))
        else:
            h = torch.relu(z1)
        z2 = self.fc2(h)
        out = self.head(torch.relu(z2))
        if kind == "scaled_output":
            return out * 2.0
        if kind == "output_skip":  # a hidden activation reaches the output past the head
            return out + z2[:, :4]
        return out


def pieces_of(fm, x, rung: str, rows, force: bool = False):
    """The pieces of ``x`` by ``rung`` (``force``: as if the trace had read a chain)."""
    inputs = fm.prepare(x)
    structure = layer_structure(fm, inputs)
    if force:
        structure = dataclasses.replace(structure, traced_chain=True)
    B = inputs.batch_size
    chunk = RowChunk(slice(0, B), slice(0, rows.rows))
    with torch.no_grad():
        return produce(fm, structure, fm.params(False), inputs, chunk, rows, only=rung)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_a_custom_chain_gets_the_batched_backwards_pieces(act):
    torch.manual_seed(0)
    fm = pf.FunctionalModel(MLP(ACTIVATIONS[act]).to(DT))
    x = torch.randn(6, 5, dtype=DT)
    assert layer_structure(fm, fm.prepare(x)).traced_chain
    U = torch.randn(6, 3, 4, dtype=DT)  # dense rows, as a curvature pass gives them
    unit = OneHotRows(lambda c: torch.arange(4).expand(6, 4)[c.samples, c.rows], 4, (4,), DT)
    for rows in (GivenRows(U), unit):
        mine = pieces_of(fm, x, "traced chain", rows)
        theirs = pieces_of(fm, x, "batched", rows)
        assert mine.rung == "traced chain"
        torch.testing.assert_close(mine.f, theirs.f, rtol=0, atol=0)
        for i in range(3):
            torch.testing.assert_close(mine.a[i], theirs.a[i], rtol=0, atol=0)
            torch.testing.assert_close(dense(mine.G[i]), dense(theirs.G[i]), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("act", ["relu", "gelu", "relu_inplace"])
@pytest.mark.parametrize("bias", [True, False])
def test_traced_chain_variance_and_diagonal_are_exact(act, bias):
    torch.manual_seed(1)
    model = MLP(ACTIVATIONS[act], bias=bias).to(DT)
    fm = pf.FunctionalModel(model)
    x = torch.randn(7, 5, dtype=DT)
    f_ref, J = brute_force_jacobian(fm, x)  # (B, K, P)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        f, var = pf.functional_variance(fm, x, S, strategy="structured")
        y = torch.randint(4, (7,))
        ggn = GGN(model, [(x, y)])
        diag = ggn.diagonal()
    assert "traced chain" in str(ggn.plan("diagonal"))
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(var, torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J))
    p = torch.softmax(f_ref, -1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    want = torch.einsum("bkp,bkl,blp->p", J, H, J)
    torch.testing.assert_close(diag, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kind",
    ["skip", "normalized", "frozen_between", "changed_in_place", "scaled_output", "output_skip"],
)
def test_a_forward_that_is_not_a_chain_is_not_read_as_one(kind):
    torch.manual_seed(2)
    model = NotAChain(kind).to(DT)
    fm = pf.FunctionalModel(model)
    x = torch.randn(5, 5, dtype=DT)
    assert not layer_structure(fm, fm.prepare(x)).traced_chain
    with pytest.raises(StructureError):
        # the chunk's own forward is read too, whatever the trace said
        pieces_of(fm, x, "traced chain", GivenRows(torch.randn(5, 2, 4, dtype=DT)), force=True)
    _, J = brute_force_jacobian(fm, x)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trace saw it: no rung is tried and abandoned
        _, var = pf.functional_variance(fm, x, S, strategy="structured")
    torch.testing.assert_close(var, torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J))


def test_a_forward_that_stops_being_a_chain_falls_back_exactly():
    """The graph is read on every chunk's own forward: a model that takes another path than the
    trace did is found out, and the next rung gives the exact pieces (with a warning)."""
    torch.manual_seed(3)
    model = NotAChain("none").to(DT)
    fm = pf.FunctionalModel(model)
    x = torch.randn(5, 5, dtype=DT)
    assert layer_structure(fm, fm.prepare(x)).traced_chain
    model.kind = "skip"
    _, J = brute_force_jacobian(fm, x)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with pytest.warns(pf.PushforwardFallbackWarning, match="read as a chain"):
        _, var = pf.functional_variance(fm, x, S, strategy="structured")
    torch.testing.assert_close(var, torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J))


class WithDropout(MLP):
    """The MLP with dropout after each activation (identity in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.relu(self.fc1(x)))
        return self.head(self.drop(torch.relu(self.fc2(h))))


def test_dropout_in_eval_mode_leaves_a_chain():
    torch.manual_seed(4)
    model = WithDropout().to(DT).eval()
    fm = pf.FunctionalModel(model)
    x = torch.randn(6, 5, dtype=DT)
    assert layer_structure(fm, fm.prepare(x)).traced_chain
    _, J = brute_force_jacobian(fm, x)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, var = pf.functional_variance(fm, x, S, strategy="structured")
    torch.testing.assert_close(var, torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J))


class ViewedOutput(MLP):
    """The MLP returning its head's output through ``kind``: a view in the same element order
    (``squeeze`` of a one-output head, ``reshape``), or a detached alias of it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "squeeze":
            self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.kind == "squeeze":
            return out.squeeze(-1)
        if self.kind == "reshape":
            return out.reshape(len(x), 2, 2)
        if self.kind == "no_grad_view":
            with torch.no_grad():
                return out.reshape(len(x), 2, 2)
        return out.detach().reshape(len(x), 2, 2)


@pytest.mark.parametrize("kind", ["squeeze", "reshape"])
def test_a_view_of_the_heads_output_is_still_a_chain(kind):
    """A regression MLP returning ``head(h).squeeze(-1)`` (a BO surrogate's ``(B,)``) or a reshape
    of its head's output reads as a chain, exact."""
    torch.manual_seed(6)
    model = ViewedOutput(kind).to(DT)
    fm = pf.FunctionalModel(model, output_dims=0 if kind == "squeeze" else 2)
    x = torch.randn(6, 5, dtype=DT)
    assert layer_structure(fm, fm.prepare(x)).traced_chain
    _, J = brute_force_jacobian(fm, x)
    J = J.reshape(6, -1, J.shape[-1])
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        _, var = pf.functional_variance(fm, x, S, strategy="structured")
        ggn = GGN(fm, [(x, torch.randn(6, *var.shape[1:], dtype=DT))], likelihood="regression")
        diag = ggn.diagonal()
    assert "traced chain" in str(ggn.plan("diagonal"))
    want = torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J)
    torch.testing.assert_close(var.reshape(want.shape), want)
    torch.testing.assert_close(diag, torch.einsum("bkp,bkp->p", J, J))


def test_a_detached_alias_of_the_heads_output_is_not_a_chain():
    """The same memory as the head's output, without its derivatives: refused by the trace and by
    the chunk's own graph; every parameter's variance is zero."""
    torch.manual_seed(7)
    fm = pf.FunctionalModel(ViewedOutput("detached").to(DT), output_dims=2)
    x = torch.randn(5, 5, dtype=DT)
    assert not layer_structure(fm, fm.prepare(x)).traced_chain
    with pytest.raises(StructureError, match="last linear layer's output"):
        pieces_of(fm, x, "traced chain", GivenRows(torch.randn(5, 2, 2, 2, dtype=DT)), force=True)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pf.PushforwardFallbackWarning)
        _, var = pf.functional_variance(fm, x, S)
    assert var.abs().max() == 0


def test_a_view_made_without_gradients_is_not_a_chain():
    """A view of the head's output made under ``torch.no_grad``: the chunk's graph refuses it, and
    the public functions name the disagreement of forward and reverse mode it causes."""
    torch.manual_seed(8)
    fm = pf.FunctionalModel(ViewedOutput("no_grad_view").to(DT), output_dims=2)
    x = torch.randn(5, 5, dtype=DT)
    inputs = fm.prepare(x, check=False)  # the rung alone, without the example check
    structure = dataclasses.replace(layer_structure(fm, inputs), traced_chain=True)
    rows = GivenRows(torch.randn(5, 2, 2, 2, dtype=DT))
    with pytest.raises(StructureError, match="last linear layer's output"), torch.no_grad():
        produce(
            fm,
            structure,
            fm.params(False),
            inputs,
            RowChunk(slice(0, 5), slice(0, 2)),
            rows,
            only="traced chain",
        )
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with pytest.raises(pf.InconsistentDerivativesError):
        pf.functional_variance(fm, x, S)
