"""Chains of linear layers and elementwise activations (``nn.Sequential`` MLPs) take the layer
producer's hand-written rung (:mod:`pushforward.layers.chain`); everything else takes the general
ones.
Both are checked against the brute-force Jacobian in float64, and the recognition is checked to
refuse what it cannot run exactly (hooks, subclasses, other modules, other inputs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_curvature import reference, rel
from torch import Tensor, nn
from zoo import make_case

import pushforward as pf
import pushforward.layers.chain as chain_module
import pushforward.layers.pieces as pieces_module
from pushforward.core.inputs import Inputs
from pushforward.curvature import GGN, EmpiricalFisher
from pushforward.curvature.diagonal import DiagonalSums
from pushforward.layers import ELEMENTWISE, Chain, RowSquares, find_chain, layer_structure
from pushforward.testing import brute_force_jacobian

DT = torch.float64
EXACT = 1e-10


@pytest.fixture
def chain_runs(monkeypatch) -> list[int]:
    """Counts the chain path's runs (one entry per chunk)."""
    runs: list[int] = []
    original = Chain.pieces

    def counted(self, *args, **kwargs):
        runs.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Chain, "pieces", counted)
    return runs


def _chains() -> dict[str, nn.Sequential]:
    torch.manual_seed(0)
    return {
        "relu_head": nn.Sequential(
            nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)
        ),
        "nested_mixed": nn.Sequential(
            nn.Linear(5, 7),
            nn.Tanh(),
            nn.Sequential(nn.Linear(7, 6), nn.GELU(approximate="tanh")),
            nn.Dropout(0.3),
            nn.Linear(6, 4, bias=False),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Identity(),
            nn.Linear(4, 3),
            nn.Sigmoid(),  # the output is an activation's, not a linear layer's
        ),
        "activation_first": nn.Sequential(
            nn.Softplus(beta=2.0),
            nn.Linear(5, 6),
            nn.SiLU(),
            nn.Linear(6, 6),
            nn.ELU(),
            nn.Linear(6, 3),
        ),
        "linear_linear": nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)),
        # activations in a row: only the first (on a linear layer's output) may run in place
        "stacked_activations": nn.Sequential(
            nn.Linear(5, 6),
            nn.ReLU(),
            nn.Sigmoid(),
            nn.Linear(6, 4),
            nn.Tanh(),
            nn.Tanh(),
            nn.Linear(4, 3),
        ),
        "flatten_images": nn.Sequential(
            nn.Flatten(), nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)
        ),
    }


#: Parameter selections: all, a frozen first layer, a frozen weight between selected ones.
SELECTIONS = {
    "all": "all",
    "frozen_first": lambda name, p: not name.startswith("0."),
    "frozen_middle_weight": lambda name, p: name != "2.weight",
}


def _data(seed: int = 1, name: str = ""):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 5, generator=g, dtype=DT)
    if name == "flatten_images":
        x = x.reshape(9, 1, 5, 1)
    y = torch.randint(0, 3, (9,), generator=g)
    return x, y, [(x[:4], y[:4]), (x[4:], y[4:])]


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize("name", sorted(_chains()))
def test_chain_equals_brute_force(name, selection, chain_runs):
    """GGN and empirical Fisher diagonals, K-FAC (against the general path's), all exact."""
    model = _chains()[name].to(DT).eval()
    fm = pf.FunctionalModel(model, params=SELECTIONS[selection])
    x, y, data = _data(name=name)
    for kind, op_cls in (("ggn", GGN), ("ef", EmpiricalFisher)):
        H = reference(fm, x, y, "classification", kind)
        assert rel(op_cls(fm, data).diagonal(), H.diagonal()) <= EXACT, kind
        # behind a wrapper: the traced chain where it reads as one, else the general rungs
        assert rel(op_cls(_general(fm), data).diagonal(), H.diagonal()) <= EXACT, kind
    assert chain_runs, "the chain path did not run"
    kfac = GGN(fm, data).kfac().to_dense()
    chain_runs.clear()
    general = GGN(_general(fm), data).kfac().to_dense()
    assert not chain_runs
    assert rel(kfac, general) <= EXACT


def _general(fm: pf.FunctionalModel) -> pf.FunctionalModel:
    """The same model behind a wrapper module: the general (traced) path."""

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)

    names = {f"inner.{n}" for n in fm.param_names}
    return pf.FunctionalModel(Wrapped(fm.module), params=lambda name, p: name in names)


def test_regression_and_monte_carlo_on_a_chain(chain_runs):
    """Gaussian rows (an identity factor, expanded) and sampled rows take the chain path too;
    the Monte Carlo diagonal is the general path's, draw for draw."""
    model = _chains()["relu_head"].to(DT).eval()
    fm = pf.FunctionalModel(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g, dtype=DT)
    t = torch.randn(8, 3, generator=g, dtype=DT)
    H = reference(fm, x, t, "regression")
    assert rel(GGN(fm, [(x, t)], "regression").diagonal(), H.diagonal()) <= EXACT
    y = torch.randint(0, 3, (8,), generator=g)
    mc = GGN(fm, [(x[:5], y[:5]), (x[5:], y[5:])], mc_samples=4).diagonal()
    assert chain_runs
    chain_runs.clear()
    general = GGN(_general(fm), [(x[:5], y[:5]), (x[5:], y[5:])], mc_samples=4)
    assert rel(mc, general.diagonal()) <= EXACT
    assert not chain_runs


def test_chunked_rows_and_examples(chain_runs):
    """A small memory budget splits the batches into chunks of rows and examples."""
    model = _chains()["nested_mixed"].to(DT).eval()
    fm = pf.FunctionalModel(model)
    x, y, data = _data(4)
    H = reference(fm, x, y, "classification")
    with pf.settings(chunk_target=300):  # a few rows per chunk
        assert rel(GGN(fm, data).diagonal(), H.diagonal()) <= EXACT
        assert (
            rel(GGN(fm, data).kfac().to_dense(), GGN(_general(fm), data).kfac().to_dense()) <= EXACT
        )
    assert len(chain_runs) > 2 * len(data)


def _recognized(model: nn.Module, x: Tensor) -> bool:
    fm = pf.FunctionalModel(model)
    inputs = fm.prepare(x)
    structure = layer_structure(fm, inputs)
    return not structure.generic(fm.param_names) and (
        find_chain(fm, structure.calls, inputs) is not None
    )


class MyLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


def test_recognition_refuses_what_it_cannot_run_exactly():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=DT)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    assert _recognized(mlp, x)
    # a subclass (its own forward), a module outside the list, a shared layer
    assert not _recognized(nn.Sequential(MyLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT), x)
    assert not _recognized(
        nn.Sequential(
            nn.Linear(5, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 3)
        ).to(DT),
        x,
    )
    shared = nn.Linear(5, 5).to(DT)
    assert not _recognized(nn.Sequential(shared, nn.Tanh(), shared), x)
    # hooks on a layer, on the container, and global ones
    handle = mlp[0].register_forward_hook(lambda m, i, o: o * 2)
    assert not _recognized(mlp, x)
    handle.remove()
    handle = mlp.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    assert not _recognized(mlp, x)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert not _recognized(mlp, x)
    finally:
        handle.remove()
    assert _recognized(mlp, x)
    # inputs with positions (a sequence), flattened otherwise than to (B, features)
    assert not _recognized(mlp, torch.randn(4, 2, 5, dtype=DT))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(10, 3)).to(DT)
    assert _recognized(flat, torch.randn(4, 2, 5, dtype=DT))
    positions = nn.Sequential(nn.Flatten(2), nn.Linear(5, 3)).to(DT)  # (B, 2, 5): unchanged
    assert not _recognized(positions, torch.randn(4, 2, 5, dtype=DT))
    late = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(10, 3)).to(DT)
    assert not _recognized(late, torch.randn(4, 2, 5, dtype=DT))
    # dropout in training mode
    dropout = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(DT).eval()
    fm = pf.FunctionalModel(dropout)
    calls = layer_structure(fm, fm.prepare(x)).calls
    assert find_chain(fm, calls, Inputs.from_user(x)) is not None
    dropout.train()  # (the model refuses this itself too)
    assert find_chain(fm, calls, Inputs.from_user(x)) is None


def test_hooked_chain_still_exact(chain_runs):
    """A forward hook that changes a layer's output: the general path, and its numbers."""
    model = _chains()["relu_head"].to(DT).eval()
    model[2].register_forward_hook(lambda m, i, o: 0.5 * o)
    fm = pf.FunctionalModel(model)
    x, y, data = _data(5)
    H = reference(fm, x, y, "classification")
    assert rel(GGN(fm, data).diagonal(), H.diagonal()) <= EXACT
    assert not chain_runs


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    activations=st.lists(  # none, one or two in a row after each hidden layer
        st.lists(
            st.sampled_from(sorted(ELEMENTWISE, key=lambda c: c.__name__)), min_size=0, max_size=2
        ),
        min_size=3,
        max_size=3,
    ),
    outputs=st.integers(1, 4),
    batch=st.integers(1, 5),
)
def test_random_chains_equal_brute_force(widths, activations, outputs, batch):
    torch.manual_seed(len(widths) * 31 + outputs)
    layers: list[nn.Module] = []
    sizes = [3, *widths]
    for i in range(len(widths)):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), *(a() for a in activations[i])]
    model = nn.Sequential(*layers, nn.Linear(sizes[-1], outputs)).to(DT).eval()
    fm = pf.FunctionalModel(model)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, generator=g, dtype=DT)
    y = torch.randint(0, outputs, (batch,), generator=g)
    f, J = brute_force_jacobian(fm, x)  # (B, K), (B, K, P)
    H = reference(fm, x, y, "classification", jacobian=(f, J))
    assert rel(GGN(fm, [(x, y)]).diagonal(), H.diagonal()) <= EXACT
    # the same chain serves the variance: J S J^T of a diagonal S, per example
    s = torch.rand(fm.num_params, generator=g, dtype=DT) + 0.1
    expected = torch.einsum("bkp,p,bkp->bk", J, s, J)
    mean, variance = pf.functional_variance(fm, x, pf.Diagonal(s), strategy="structured")
    assert rel(mean, f) <= EXACT and rel(variance, expected) <= EXACT


@pytest.mark.parametrize("group_bytes", [1, 600, 2**20])  # 1 example, 2, all per group
def test_row_squares_in_groups_equal_brute_force(group_bytes, monkeypatch):
    """The diagonal asks only the squares of each layer's directions summed over the rows: the
    chain and the traced chain take the rows back a group of examples at a time (5 rows each,
    batches of 5 and 4: groups of 1 example, of 2, 2 and 1 and of 2 and 2, of all) and give them
    reduced (``RowSquares``), the same diagonal."""
    monkeypatch.setattr(pieces_module, "SQUARES_GROUP_BYTES", group_bytes)
    seen: list[type] = []
    layer = DiagonalSums._layer

    def recorded(self, call, a, G):
        seen.append(type(G))
        return layer(self, call, a, G)

    monkeypatch.setattr(DiagonalSums, "_layer", recorded)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 6)
    ).to(DT)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g, dtype=DT)
    y = torch.randint(0, 6, (9,), generator=g)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    for fm in (pf.FunctionalModel(model), _general(pf.FunctionalModel(model))):
        for kind, op_cls in (("ggn", GGN), ("ef", EmpiricalFisher)):
            seen.clear()
            H = reference(fm, x, y, "classification", kind)
            assert rel(op_cls(fm, data).diagonal(), H.diagonal()) <= EXACT, kind
            assert seen and set(seen) <= {RowSquares, Tensor}, seen
            assert RowSquares in seen, (kind, seen)


_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.Softplus, nn.SiLU)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_square_sums_back_equals_the_squares_of_the_rows(data):
    """``square_sums_back`` takes a first call's squares at once, writes every group's products
    into two workspaces and scales the last call's sums by its activations' squared derivative:
    the squares of what ``rows_back`` yields, summed over the rows, for any chain (frozen layers,
    activations in a row, at either end), group size and calls asked."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    b, r = data.draw(st.integers(1, 4), label="b"), data.draw(st.integers(1, 6), label="r")
    width = data.draw(st.integers(1, 6), label="in")
    h = torch.randn(b, width, generator=g, dtype=DT)
    forward: list = []  # (call, weight) or an activation's backward, in forward order
    calls = 0
    for _ in range(data.draw(st.integers(1, 4), label="layers")):
        out = data.draw(st.integers(1, 6), label="out")
        weight = torch.randn(out, width, generator=g, dtype=DT)
        traced = data.draw(st.booleans(), label="traced")
        forward.append((calls if traced else None, weight))
        calls += traced
        h, width = h @ weight.T, out
        for _ in range(data.draw(st.integers(0, 2), label="activations")):
            kind = data.draw(st.sampled_from(_ACTIVATIONS), label="activation")
            h, back = chain_module._activation(kind(), h)
            forward.append(back)
    if not calls:
        return
    steps = forward[::-1]
    left = set(data.draw(st.sets(st.integers(0, calls - 1), min_size=1), label="left"))
    rows = torch.randn(b, r, width, generator=g, dtype=DT)
    expected: dict[int, Tensor] = {}
    reached = set(left)
    for call, G in chain_module.rows_back(rows.clone(), False, steps, reached):
        expected[call] = G.square().sum(1)
    assert not reached
    group = data.draw(st.integers(1, b * r + 1), label="group")
    owned = data.draw(st.booleans(), label="owned")
    asked = set(left)
    found = chain_module.square_sums_back(rows.clone(), owned, steps, asked, group)
    assert not asked
    for call in left:
        torch.testing.assert_close(found[call], expected[call], rtol=1e-12, atol=1e-14)


def test_row_squares_refused_where_a_layer_shares_its_weight():
    """Row squares give no weight-sharing layer's diagonal (a convolution's needs the directions
    at every position): a clear error, never a wrong sum."""
    case = make_case("cnn_batchnorm_eval")
    fm, x = case.fm, case.x
    inputs = fm.prepare(x)
    conv = next(c for c in layer_structure(fm, inputs).calls if not c.geometry.once)
    b = inputs.batch_size
    a = torch.zeros(b, *conv.input_shape, dtype=DT)
    squares = RowSquares(torch.zeros(b, *conv.output_shape, dtype=DT))
    with pytest.raises(RuntimeError, match="several positions"):
        DiagonalSums(fm)._layer(conv, a, squares)
