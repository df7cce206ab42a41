"""Recurrent layers in elementary operations (what runs on CUDA, where cuDNN's backward refuses
eval mode): equal to PyTorch's own kernels, and every strategy and curvature pass through them
equal to the native computation."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import pushforward as pf
import pushforward.core.functional_model as functional_model
from pushforward.core import rnn
from pushforward.curvature import GGN

D = torch.float64
STRATEGIES = ("structured", "reverse", "forward", "explicit")


def _flat(out) -> torch.Tensor:
    output, state = out
    states = state if isinstance(state, tuple) else (state,)
    return torch.cat([output.flatten(), *(s.flatten() for s in states)])


LAYERS = [
    lambda: nn.GRU(3, 4, 2, batch_first=True, bidirectional=True),
    lambda: nn.GRU(3, 4, bias=False),
    lambda: nn.LSTM(3, 4, 2, proj_size=2, bidirectional=True),
    lambda: nn.LSTM(3, 5, bias=False, batch_first=True),
    lambda: nn.RNN(3, 4, nonlinearity="relu", num_layers=2),
    lambda: nn.RNN(3, 4, bidirectional=True, batch_first=True),
]


@pytest.mark.parametrize("make", LAYERS)
def test_decomposition_equals_pytorch(make):
    torch.manual_seed(0)
    layer = make().to(D).eval()
    x = torch.randn(2, 5, 3, dtype=D)
    if not layer.batch_first:
        x = x.transpose(0, 1)
    for inputs in ((x,), (x[0] if layer.batch_first else x[:, 0],)):  # batched, unbatched
        want = layer(*inputs)
        with rnn.decomposed_rnn(everywhere=True):
            got = layer(*inputs)
        assert rel_err(_flat(got), _flat(want)) <= 1e-14
    # with an initial state
    h0 = torch.randn(
        layer.num_layers * (2 if layer.bidirectional else 1), 2, layer.hidden_size, dtype=D
    )
    state = h0 if not isinstance(layer, nn.LSTM) else (h0[..., : layer.proj_size or None], h0)
    with rnn.decomposed_rnn(everywhere=True):
        got = layer(x, state)
    assert rel_err(_flat(got), _flat(layer(x, state))) <= 1e-14


def test_packed_sequences_and_training_mode_take_pytorch_kernels(monkeypatch):
    calls = []
    monkeypatch.setitem(rnn._DECOMPOSED, torch.gru, lambda *a: calls.append(a) or torch.gru(*a))
    layer = nn.GRU(3, 4, dropout=0.5, num_layers=2).to(D)
    x = torch.randn(5, 2, 3, dtype=D)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    with rnn.decomposed_rnn(everywhere=True):
        layer.eval()(packed)
        layer.train()(x)
    assert not calls
    with rnn.decomposed_rnn(everywhere=True):
        layer.eval()(x)
    assert len(calls) == 1


class _Tagger(nn.Module):
    """A recurrent encoder and a linear head on its last step."""

    def __init__(self, layer: nn.Module, width: int) -> None:
        super().__init__()
        self.layer, self.head = layer, nn.Linear(width, 2)

    def forward(self, x):
        out = self.layer(x)[0]
        return self.head(out[:, -1])


def _models():
    torch.manual_seed(1)
    gru = _Tagger(nn.GRU(3, 4, batch_first=True, bidirectional=True), 8)
    lstm = _Tagger(nn.LSTM(3, 5, 2, batch_first=True, proj_size=3), 3)
    return {"gru": gru.to(D).eval(), "lstm": lstm.to(D).eval()}


@pytest.fixture
def decomposed(monkeypatch):
    """The library's calls of the model decomposed on the CPU, as they are on CUDA; counts them."""
    seen = []

    def everywhere():
        seen.append(1)
        return rnn.decomposed_rnn(everywhere=True)

    monkeypatch.setattr(functional_model, "decomposed_rnn", everywhere)
    return seen


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_every_strategy_through_the_decomposition(name, decomposed):
    model = _models()[name]
    x = torch.randn(4, 6, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    fm = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=D, generator=torch.Generator().manual_seed(3)))
    decomposed.clear()
    results = {s: pf.functional_variance(fm, x, S, strategy=s)[1] for s in STRATEGIES}
    assert decomposed  # the library's calls took the decomposition
    with pytest.MonkeyPatch.context() as native:
        native.setattr(functional_model, "decomposed_rnn", rnn.contextlib.nullcontext)
        want = pf.functional_variance(pf.FunctionalModel(model), x, S, strategy="reverse")[1]
    for strategy, got in results.items():
        assert rel_err(got, want) <= 1e-12, strategy
    assert not model.training


@pytest.mark.parametrize("what", ["diagonal", "kfac", "dense"])
def test_curvature_through_the_decomposition(what, decomposed):
    model = _models()["gru"]
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(4, 6, 3, dtype=D, generator=g), torch.randint(0, 2, (4,), generator=g))]

    def result():
        c = getattr(GGN(pf.FunctionalModel(model), data, "classification"), what)()
        return c.to_dense() if what == "kfac" else c

    got = result()
    assert decomposed
    with pytest.MonkeyPatch.context() as native:
        native.setattr(functional_model, "decomposed_rnn", rnn.contextlib.nullcontext)
        want = result()
    assert rel_err(got, want) <= 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN)")
@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_cudnn_models_in_eval_mode(name):
    model = _models()[name]
    x = torch.randn(4, 6, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    S = pf.Diagonal(torch.rand(pf.FunctionalModel(model).num_params, dtype=D))
    want = pf.functional_variance(pf.FunctionalModel(model), x, S, strategy="reverse")[1]
    cuda = model.cuda()
    flags = torch.backends.cudnn.enabled
    for strategy in STRATEGIES:
        got = pf.functional_variance(
            pf.FunctionalModel(cuda), x.cuda(), S.to(device="cuda"), strategy=strategy
        )[1]
        assert rel_err(got.cpu(), want) <= 1e-10, strategy
    assert torch.backends.cudnn.enabled == flags and not cuda.training
