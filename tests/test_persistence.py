"""Saving and loading with ``pushforward.save`` / ``pushforward.load``: every covariance operator
round trips bit for bit through a file that ``torch.load(weights_only=True)`` reads, a posterior
refuses a model it does not fit, and anything that is not an envelope of this or an older format
is refused."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import pushforward as pf
from pushforward import persistence
from pushforward.covariance import Marginal, PrecisionUpdate
from pushforward.testing import check_covariance_operator

D = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=g, dtype=D)
    return A @ A.T / n + torch.eye(n, dtype=D)


def _operators() -> dict[str, pf.CovarianceOperator]:
    """Every operator kind and form, float64, over the model's P = 26 (bound where it can be)."""
    fm = pf.FunctionalModel(_model())
    layout, P = fm.layout, fm.num_params
    g = torch.Generator().manual_seed(1)
    positive = lambda n: torch.rand(n, generator=g, dtype=D) + 0.5  # noqa: E731
    shapes = fm.param_shapes
    eigen = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0] for n in (4, 3)]
    kron_named = pf.Kronecker(
        {
            "2.bias": pf.Diagonal(positive(2)),
            "0.weight": pf.KroneckerEigen(*eigen, positive(12).reshape(4, 3)),
            "2.weight": pf.KroneckerFactors(_spd(2, g), _spd(4, g)),
            "0.bias": pf.Dense(_spd(4, g)),
        }
    )
    kron_positional = pf.Kronecker(
        [(_spd(4, g), _spd(3, g)), (_spd(4, g),), (_spd(2, g), _spd(4, g)), _spd(2, g)]
    )
    U = torch.randn(P, 3, generator=g, dtype=D)
    ops = {
        "Diagonal": pf.Diagonal(positive(P)),
        "Diagonal bound": pf.Diagonal(positive(P)).bind(layout),
        "Diagonal named": pf.Diagonal(
            {n: positive(s.numel()).reshape(s) for n, s in reversed(list(shapes.items()))}
        ).bind(layout),
        "Dense matrix": pf.Dense(_spd(P, g)),
        "Dense cholesky": pf.Dense(cholesky=torch.linalg.cholesky(_spd(P, g))).bind(layout),
        "Dense factor": pf.Dense(factor=torch.randn(P, P, generator=g, dtype=D)),
        "Isotropic": pf.Isotropic(torch.tensor(0.3, dtype=D), P),
        "Isotropic number bound": pf.Isotropic(0.7).bind(layout),
        "LowRank": pf.LowRank(U, positive(3)),
        "LowRank diag": pf.LowRank(U, positive(3), positive(P)).bind(layout),
        "LowRankPrecision": pf.LowRankPrecision(U, positive(3), positive(P)),
        "Kronecker positional": kron_positional,
        "Kronecker positional bound": kron_positional.bind(layout),
        "Kronecker named bound": kron_named.bind(layout),
        "KroneckerFactors": pf.KroneckerFactors(_spd(4, g), _spd(3, g)),
        "KroneckerEigen": pf.KroneckerEigen(*eigen, positive(12).reshape(4, 3)),
        "BlockDiagonal": pf.BlockDiagonal(
            {
                "0": pf.Dense(_spd(16, g)),
                ("2.weight", "2.bias"): pf.LowRank(
                    torch.randn(10, 2, generator=g, dtype=D), positive(2), positive(10)
                ),
            },
            layout=layout,
        ),
        "BlockDiagonal default": pf.BlockDiagonal(
            {"2.weight": pf.KroneckerFactors(_spd(2, g), _spd(4, g))},
            default=pf.Isotropic(0.05),
        ).bind(layout),
        "Subset": pf.Subset(pf.Dense(_spd(5, g)), torch.tensor([7, 1, 20, 3, 11]), P),
        "Marginal": Marginal(
            pf.LowRankPrecision(U, positive(3), positive(P)), torch.tensor([5, 0, 9, 25])
        ),
        "PrecisionUpdate": PrecisionUpdate(
            kron_named.bind(layout), torch.randn(3, P, generator=g, dtype=D), positive(3)
        ),
    }
    return ops


OPERATORS = sorted(_operators())


def _round_trip(obj, **load_kwargs):
    buffer = io.BytesIO()
    pf.save(obj, buffer)
    buffer.seek(0)
    return pf.load(buffer, **load_kwargs), buffer


def _plain(value) -> bool:
    """Only the containers and values the envelope may hold."""
    if isinstance(value, torch.Tensor) or value is None:
        return True
    if type(value) in (bool, int, float, str):
        return True
    if type(value) is dict:
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if type(value) in (list, tuple):
        return all(_plain(v) for v in value)
    return False


@pytest.mark.parametrize("name", OPERATORS)
def test_every_operator_round_trips_bit_for_bit(name):
    op = _operators()[name]
    loaded, buffer = _round_trip(op)
    assert type(loaded) is type(op)
    assert loaded.layout == op.layout
    assert (loaded._num_params, loaded._sqrt_cols) == (op._num_params, op._sqrt_cols)
    before = op.to_dense()
    after = loaded.to_dense()
    assert after.dtype == before.dtype and torch.equal(after, before)
    for a, b in zip(op.tensors(), loaded.tensors(), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    Z = torch.randn(3, op.sqrt_cols, dtype=D)
    assert torch.equal(loaded.sqrt_rows(Z), op.sqrt_rows(Z))
    check_covariance_operator(loaded, before)
    # underneath: a plain envelope that PyTorch's restricted unpickler reads
    buffer.seek(0)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(buffer) == []
    buffer.seek(0)
    raw = torch.load(buffer, weights_only=True)
    assert raw["format"] == "pushforward" and raw["format_version"] == 1
    assert raw["library_version"] == pf.__version__
    assert raw["type"] == type(op).__name__ and _plain(raw)
    layout = raw["layout"]
    if op.layout is None:
        assert layout is None
    else:
        assert layout["names"] == list(op.layout.names)
        assert layout["shapes"] == [list(op.layout.shapes[n]) for n in op.layout.names]


def test_an_unsized_isotropic_round_trips_and_binds_alike():
    op = pf.Isotropic(0.25)
    loaded, _ = _round_trip(op)
    assert loaded.from_number and loaded._num_params is None
    assert torch.equal(loaded.variance, op.variance)
    layout = pf.FunctionalModel(_model()).layout
    assert torch.equal(loaded.bind(layout).to_dense(), op.bind(layout).to_dense())
    # a Python number is cast exactly, not through the default dtype
    assert torch.equal(loaded.to(D).variance, op.to(D).variance)


def test_file_round_trip_with_weights_only(tmp_path):
    op = _operators()["Kronecker named bound"]
    path = tmp_path / "posterior.pt"
    pf.save(op, path)
    raw = torch.load(path, weights_only=True)
    assert _plain(raw)
    nested = raw["state"]["fields"]["factors"]["0.weight"]
    assert set(nested) == {"type", "state"} and nested["type"] == "KroneckerEigen"
    fm = pf.FunctionalModel(_model())
    loaded = pf.load(path, model=fm, map_location="cpu")
    assert torch.equal(loaded.to_dense(), op.to_dense())
    x = torch.randn(5, 3, dtype=D)
    assert torch.equal(
        pf.functional_variance(fm, x, loaded)[1], pf.functional_variance(fm, x, op)[1]
    )
    assert pf.load(path, model=fm.module) is not None  # an nn.Module: its trainable parameters


def test_bfloat16_and_views_are_saved_compactly():
    big = torch.rand(10_000, dtype=torch.bfloat16) + 0.5
    op = pf.Diagonal(big[10:20])  # a view of a larger storage
    loaded, buffer = _round_trip(op)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.diagonal(), op.diagonal())
    assert len(buffer.getvalue()) < 5_000  # not the 20,000 bytes of the whole storage


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Identity(), nn.Linear(4, 2)),
            r"parameter #2 is '2\.weight', the model's is '3\.weight'",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)),
            r"parameter '0\.weight' has shape \(4, 3\) in the file and \(5, 3\) in the model",
        ),
        (
            lambda: pf.FunctionalModel(_model(), params=["2"]),
            r"parameter #0 is '0\.weight', the model's is '2\.weight'",
        ),
        (
            lambda: pf.FunctionalModel(_model(), params=["0", "2.weight"]),
            r"the file has 4 parameters, the model selects 3; parameter '2\.bias' is only in the "
            "file",
        ),
    ],
    ids=["names", "shapes", "selection", "count"],
)
def test_a_posterior_refuses_a_model_it_does_not_fit(other, message):
    op = _operators()["Diagonal named"]
    buffer = io.BytesIO()
    pf.save(op, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match=message):
        pf.load(buffer, model=other().double() if isinstance(other(), nn.Module) else other())


def test_an_unbound_operator_checks_the_model_size():
    op = pf.LowRank(torch.randn(7, 2, dtype=D), torch.ones(2, dtype=D))
    state = persistence.to_state(op)
    with pytest.raises(ValueError, match=r"P=7.*P=26"):
        persistence.from_state(state, model=_model())
    assert persistence.from_state(state).num_params == 7


def test_files_that_are_not_envelopes_are_refused(tmp_path):
    cases = {
        "plain dict": {"weights": torch.ones(3)},
        "other format": {"format": "something", "format_version": 1},
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        with pytest.raises(ValueError, match="not a pushforward envelope"):
            pf.load(path)
    path = tmp_path / "module.pt"
    torch.save(_model(), path)  # a pickled module: loading it would run code
    with pytest.raises(ValueError, match=r"not a pushforward file.*unrestricted unpickler"):
        pf.load(path)
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(ValueError, match="pushforward"):
        pf.load(path)


def test_newer_formats_and_unknown_types_are_refused():
    state = persistence.to_state(pf.Isotropic(0.5, 4))
    newer = {**state, "format_version": 2, "library_version": "9.0"}
    with pytest.raises(ValueError, match=r"newer pushforward.*format_version 2.*upgrade"):
        persistence.from_state(newer)
    unknown = {**state, "type": "Mystery"}
    with pytest.raises(ValueError, match="'Mystery', which no registered class has"):
        persistence.from_state(unknown)
    with pytest.raises(ValueError, match="invalid format_version"):
        persistence.from_state({**state, "format_version": "1"})


def test_registered_classes_take_part_and_nest():
    @persistence.register("test_persistence.Posterior")
    class Posterior:
        def __init__(self, cov, meta):
            self.cov, self.meta = cov, meta
            self.layout = cov.layout

        def _to_state(self):
            return {"cov": self.cov, "meta": self.meta}

        @classmethod
        def _from_state(cls, state):
            return cls(state["cov"], state["meta"])

    cov = _operators()["BlockDiagonal default"]
    meta = {
        ("a", "b"): [1, 2.5, None, True],
        "type": "x",
        "state": (torch.arange(3),),
        "dtype": torch.bfloat16,
    }
    loaded, buffer = _round_trip(Posterior(cov, meta), model=pf.FunctionalModel(_model()))
    assert torch.equal(loaded.cov.to_dense(), cov.to_dense())
    assert loaded.meta.keys() == meta.keys() and loaded.meta[("a", "b")] == [1, 2.5, None, True]
    assert torch.equal(loaded.meta["state"][0], meta["state"][0])
    assert loaded.meta["dtype"] is torch.bfloat16
    buffer.seek(0)
    assert _plain(torch.load(buffer, weights_only=True))
    with pytest.raises(ValueError, match="already registered"):
        persistence.register(type("Posterior", (Posterior,), {}), "test_persistence.Posterior")


def test_unregistered_objects_and_values_are_refused_on_save():
    class Thing:
        pass

    with pytest.raises(TypeError, match="Thing: its class is not registered"):
        pf.save(Thing(), io.BytesIO())
    with pytest.raises(TypeError, match="must implement _to_state"):
        persistence.register(Thing)
