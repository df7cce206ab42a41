"""Saving and loading PushforwardModel: ``pf.save``/``pf.load(f, model=net)`` and
``state_dict``/``load_state_dict`` restore the posterior exactly (conditioning, transforms and
options included) or refuse — never another posterior with "All keys matched"."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.utils.data as du
from conftest import rel_err
from torch import nn

import pushforward as pf

pytest.importorskip("botorch")
laplace = pytest.importorskip("laplace")

from botorch.models.transforms.input import Normalize  # noqa: E402
from botorch.models.transforms.outcome import Log, Standardize  # noqa: E402
from laplace import Laplace  # noqa: E402

from pushforward.botorch import PushforwardModel  # noqa: E402

D = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(D)


def fitted_model(
    seed: int = 0, subset: str = "all", **kwargs
) -> tuple[nn.Module, PushforwardModel]:
    """A Kronecker Laplace posterior of a 3-6-2 network, with transforms."""
    net = make_net(seed)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.rand(12, 3, generator=g, dtype=D)
    Y = torch.randn(12, 2, generator=g, dtype=D)
    la = Laplace(net, "regression", subset, "kron", sigma_noise=0.2, prior_precision=1.5)
    la.fit(du.DataLoader(du.TensorDataset(X, Y), batch_size=6))
    standardize = Standardize(m=2)
    standardize(Y * 3 + 1)
    bounds = torch.tensor([[0.0, -1.0, 2.0], [1.0, 1.0, 5.0]], dtype=D)
    model = PushforwardModel.from_laplace(
        la, outcome_transform=standardize, input_transform=Normalize(d=3, bounds=bounds), **kwargs
    )
    return net, model


def roundtrip(obj, **load_kwargs):
    buffer = io.BytesIO()
    pf.save(obj, buffer)
    buffer.seek(0)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # plain values only
    return pf.load(buffer, **load_kwargs)


def same_posterior(a: PushforwardModel, b: PushforwardModel, X: torch.Tensor) -> None:
    """Equal to rounding (the loaded tensors are bit-for-bit the saved ones)."""
    pa, pb = a.posterior(X), b.posterior(X)
    assert rel_err(pb.mean, pa.mean) <= 1e-15
    assert rel_err(pb.distribution.covariance_matrix, pa.distribution.covariance_matrix) <= 1e-15


def variants(model: PushforwardModel) -> dict[str, PushforwardModel]:
    g = torch.Generator().manual_seed(5)
    Xn = torch.rand(3, 3, generator=g, dtype=D) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor(
        [0.0, -1.0, 2.0]
    )
    Yn = torch.randn(3, 2, generator=g, dtype=D)
    return {
        "plain": model,
        "conditioned": model.condition_on_observations(Xn, Yn),
        "twice": model.condition_on_observations(Xn[:1], Yn[:1]).condition_on_observations(
            Xn[1:], Yn[1:], noise=torch.full((2, 2), 0.3, dtype=D)
        ),
        "batched": model.condition_on_observations(Xn.expand(2, 3, 3), Yn.expand(4, 2, 3, 2)),
        "subset": model.condition_on_observations(Xn, Yn).subset_output([1]),
    }


@pytest.mark.parametrize("observation_noise", [False, True])
def test_save_load_roundtrip_is_exact(observation_noise):
    net, model = fitted_model(observation_noise=observation_noise)
    X = torch.rand(2, 2, 3, dtype=D) * 2
    for name, m in variants(model).items():
        loaded = roundtrip(m, model=net)
        assert isinstance(loaded, PushforwardModel), name
        assert loaded.batch_shape == m.batch_shape and loaded.num_outputs == m.num_outputs, name
        assert loaded.observation_noise == observation_noise
        same_posterior(m, loaded, X)
        same_posterior(m, loaded, X[:, :1])


def test_last_layer_model_loads_with_its_parameter_selection():
    _, model = fitted_model(subset="last_layer")
    fm = model.functional_model  # wraps laplace-torch's copy of the network
    assert fm.param_names == ("2.weight", "2.bias")
    with pytest.raises(ValueError, match="does not fit this model"):
        roundtrip(model, model=fm.module)  # every trainable parameter: another layout
    loaded = roundtrip(model, model=pf.FunctionalModel(fm.module, params=["2.weight", "2.bias"]))
    same_posterior(model, loaded, torch.rand(3, 2, 3, dtype=D))


def test_load_refuses_other_weights_another_network_and_no_network():
    net, model = fitted_model()
    buffer = io.BytesIO()
    pf.save(model.condition_on_observations(torch.rand(2, 3, dtype=D), torch.rand(2, 2)), buffer)
    with pytest.raises(ValueError, match=r"parameter '0.weight' differs from the weights"):
        pf.load(io.BytesIO(buffer.getvalue()), model=make_net(1))
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    with pytest.raises(ValueError, match="does not fit this model"):
        pf.load(io.BytesIO(buffer.getvalue()), model=other)
    with pytest.raises(ValueError, match="needs its network: pass model="):
        pf.load(io.BytesIO(buffer.getvalue()))
    moved = copy.deepcopy(net)
    with torch.no_grad():
        moved[2].bias.add_(1e-12)  # a fine-tuned or re-initialized network is refused too
    with pytest.raises(ValueError, match=r"parameter '2.bias' differs"):
        pf.load(io.BytesIO(buffer.getvalue()), model=moved)


def test_state_dict_restores_exactly_or_refuses():
    _net, model = fitted_model()
    conditioned = model.condition_on_observations(torch.rand(2, 3, dtype=D), torch.rand(2, 2))
    state = conditioned.state_dict()
    # it travels as plain values
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    X = torch.rand(3, 2, 3, dtype=D)
    # the same network with another posterior: restored exactly
    other = model.condition_on_observations(torch.rand(4, 3, dtype=D), torch.rand(4, 2))
    other.load_state_dict(state)
    same_posterior(conditioned, other, X)
    # a model rebuilt with a fresh network (other weights): refused, never "All keys matched"
    _, fresh = fitted_model(seed=3)
    with pytest.raises(ValueError, match="differs from the weights the posterior was fitted"):
        fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="differs from the weights"):
        fresh.load_state_dict(state, strict=False)


def test_unsupported_transform_is_refused_when_saving():
    _net, model = fitted_model()
    model.outcome_transform = Log()
    with pytest.raises(TypeError, match="cannot save a model with a Log transform"):
        pf.save(model, io.BytesIO())
