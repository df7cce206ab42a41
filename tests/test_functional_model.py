"""FunctionalModel: parameter selection, flat layout, inputs, outputs and batch-coupling checks."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.nn.utils import parameters_to_vector
from zoo import Adapter, DictInput, SharedWeights, TiedLM, brute_force_jacobian

import pushforward as pf


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_default_selects_trainable_parameters_in_named_parameters_order():
    fm = pf.FunctionalModel(Adapter())
    assert fm.param_names == ("down.weight", "up.weight")
    assert fm.num_params == 6 * 2 + 2 * 6
    params = [p for p in fm.module.parameters() if p.requires_grad]
    assert torch.equal(fm.flatten(fm.params()), parameters_to_vector(params))


def test_all_and_names_and_prefixes_and_predicate():
    model = Adapter()
    assert len(pf.FunctionalModel(model, params="all").param_names) == 6
    assert pf.FunctionalModel(model, params=["head"]).param_names == ("head.weight", "head.bias")
    assert pf.FunctionalModel(model, params=["up.weight", "backbone"]).param_names == (
        "backbone.weight",
        "backbone.bias",
        "up.weight",
    )
    chosen = pf.FunctionalModel(model, params=lambda name, p: name.endswith("bias"))
    assert chosen.param_names == ("backbone.bias", "head.bias")
    with pytest.raises(ValueError, match="unknown parameter names or prefixes"):
        pf.FunctionalModel(model, params=["nope"])
    with pytest.raises(ValueError, match="selects no parameter"):
        pf.FunctionalModel(model, params=lambda name, p: False)


def test_last_layer_in_forward_order():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, run last
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    x = torch.randn(2, 3)
    assert pf.FunctionalModel(mlp(), params="last_layer").param_names == ("2.weight", "2.bias")
    fm = pf.FunctionalModel(HeadFirst(), params="last_layer", example_input=x)
    assert fm.param_names == ("head.weight", "head.bias")
    unverified = pf.FunctionalModel(HeadFirst(), params="last_layer")
    with pytest.raises(ValueError, match="forward order"):
        pf.jvp(unverified, x, torch.zeros(unverified.num_params))


def test_tied_parameters_appear_once_and_get_both_uses():
    model = SharedWeights().double()
    fm = pf.FunctionalModel(model)
    assert "b.weight" not in fm.param_names and "a.weight" in fm.param_names
    assert fm.num_params == sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 4, dtype=torch.float64)
    _, J_ref = brute_force_jacobian(fm, x)
    _, J = pf.jacobian(fm, x)
    assert rel_err(J, J_ref) < 1e-12
    lm = pf.FunctionalModel(TiedLM())
    assert "head.weight" not in lm.param_names


def test_flatten_unflatten_roundtrip_with_leading_dims():
    fm = pf.FunctionalModel(mlp())
    v = torch.randn(5, 7, fm.num_params, dtype=torch.float64)
    d = fm.unflatten(v)
    assert d["0.weight"].shape == (5, 7, 4, 3)
    assert torch.equal(fm.flatten(d), v)
    with pytest.raises(ValueError, match="P=26"):
        fm.unflatten(torch.zeros(21))
    with pytest.raises(KeyError, match="missing"):
        fm.flatten({"0.weight": torch.zeros(4, 3)})


def test_call_with_flat_parameters():
    model = mlp()
    fm = pf.FunctionalModel(model)
    x = torch.randn(2, 3, dtype=torch.float64)
    theta = fm.flatten(fm.params(False)) + 0.1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
        expected = model(x)
    assert torch.allclose(fm(x, theta - 0.1 + 0.1), expected)


def test_inputs_mapping_tuple_and_output_objects():
    model = DictInput().double()
    fm = pf.FunctionalModel(model)
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    f = fm({"a": a, "b": b, "scale": 0.5})
    assert torch.allclose(f, model(a, b, 0.5).logits)
    assert torch.allclose(fm((a, b)), model(a, b).logits)

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return self.l(x), "aux"

    m = TupleOut()
    x = torch.randn(4, 3)
    assert torch.equal(pf.FunctionalModel(m)(x), m(x)[0])
    picked = pf.FunctionalModel(m, output_fn=lambda out: out[0][:, :1])
    assert picked(x).shape == (4, 1)

    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return {"hidden": self.l(x)}

    with pytest.raises(TypeError, match="output_fn"):
        pf.FunctionalModel(Weird())(x)


def test_inputs_must_share_a_batch_dimension():
    fm = pf.FunctionalModel(DictInput())
    with pytest.raises(ValueError, match="same batch size"):
        pf.jvp(fm, {"a": torch.randn(3, 3), "b": torch.randn(2, 2)}, torch.zeros(fm.num_params))
    with pytest.raises(TypeError, match="inputs must be"):
        pf.jvp(fm, 3.0, torch.zeros(fm.num_params))


def test_output_dims_split_examples_and_outputs():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 6)

        def forward(self, x):  # (B, T, 3) -> (B, T, 2, 3)
            return self.l(x).unflatten(-1, (2, 3))

    fm = pf.FunctionalModel(Seq().double(), output_dims=2)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    f, J = pf.jacobian(fm, x)
    assert J.shape == (2, 4, 2, 3, fm.num_params)
    _, J_ref = brute_force_jacobian(fm, x)
    assert rel_err(J, J_ref) < 1e-12
    u = torch.randn_like(f)
    _, rows = pf.per_example_vjp(fm, x, u)
    assert rows.shape == (8, fm.num_params)


@pytest.mark.parametrize(
    "layer, fix",
    [
        (nn.BatchNorm1d(4), "model.eval()"),
        (nn.Dropout(0.2), "model.eval()"),
        (nn.MultiheadAttention(4, 2, dropout=0.1), "model.eval()"),
    ],
)
def test_batch_coupled_models_are_refused(layer, fix):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 4)
            self.extra = layer

        def forward(self, x):
            return self.l(x)

    fm = pf.FunctionalModel(M().train())
    with pytest.raises(pf.BatchCouplingError, match=r"model\.eval\(\)"):
        pf.jacobian(fm, torch.randn(2, 3))
    fm.module.eval()
    pf.jacobian(fm, torch.randn(2, 3))  # fine after eval()


def test_batchnorm_without_running_stats_is_refused_even_in_eval():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(pf.BatchCouplingError, match="track_running_stats=False"):
        pf.jvp(model, torch.randn(2, 3), torch.zeros(sum(p.numel() for p in model.parameters())))


def test_differentiable_false_detaches_results():
    fm = pf.FunctionalModel(mlp())
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    f, jv = pf.jvp(fm, x, torch.ones(fm.num_params, dtype=torch.float64))
    _, J = pf.jacobian(fm, x)
    assert not f.requires_grad and not jv.requires_grad and not J.requires_grad
    f, jv = pf.jvp(fm, x, torch.ones(fm.num_params, dtype=torch.float64), differentiable=True)
    assert f.requires_grad and jv.requires_grad


def test_pickle_and_copies_start_with_a_fresh_cache_and_lock():
    import copy
    import pickle

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fm = pf.FunctionalModel(model)
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)
    want = pf.functional_variance(fm, x, cov)[1]
    for other in (pickle.loads(pickle.dumps(fm)), copy.deepcopy(fm)):
        assert not other.cache.plans and other._lock is not fm._lock
        assert torch.allclose(pf.functional_variance(other, x, cov)[1], want)
