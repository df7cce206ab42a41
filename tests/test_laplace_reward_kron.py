"""laplace-torch's reward modeling (Bradley-Terry pairs) with ``kron``: the K-FAC factors of
``PushforwardGGN``/``PushforwardEF`` against laplace-torch's default backend (curvlinops), as
``docs/guides/laplace_torch.md`` states them.

* A model that maps the pairs ``(B, 2, d) -> (B, 2)`` (each layer sees the two items of an
  example as two positions): the same factors as the default backend, ``"expand"`` and
  ``"reduce"``, GGN and empirical Fisher.
* A model that folds the pairs into the batch inside ``forward`` (``(B, 2, d) -> (2B, d)`` through
  the network, reshaped to ``(B, 2)``): curvlinops takes the layer's ``2B`` rows for ``B``
  examples and sums their input products over ``N = B``; this library sees two rows per
  example and averages over ``N R`` (K-FAC "expand", ``R = 2``). Our input factors are half of
  curvlinops', the output factors the same, and equal to the unfolded model's: closer to the
  exact GGN.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

laplace = pytest.importorskip("laplace")
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402

from pushforward.curvature import GGN  # noqa: E402
from pushforward.laplace_interop import PushforwardEF, PushforwardGGN  # noqa: E402

DT = torch.float64
N = 24


class Pairs(nn.Module):
    """``(B, 2, d) -> (B, 2)``: the network runs on the pairs' items as positions."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Folded(Pairs):
    """The same network on ``(2B, d)``: the pairs folded into the batch dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, 2, 3, generator=g, dtype=DT), torch.randint(0, 2, (N,), generator=g)


def _model(cls):
    torch.manual_seed(0)
    return cls().to(DT)


def _factors(backend, model, X, y, **kwargs):
    """laplace-torch's reward modeling fits with the classification likelihood."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, kron = backend(model, "classification").kron(X, y, N=N, **kwargs)
    return kron


def _close(a, b) -> bool:
    return all(
        torch.allclose(x, y, rtol=1e-10, atol=1e-14)
        for fa, fb in zip(a.kfacs, b.kfacs, strict=True)
        for x, y in zip(fa, fb, strict=True)
    )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    ("ours", "theirs"), [(PushforwardGGN, CurvlinopsGGN), (PushforwardEF, CurvlinopsEF)]
)
def test_pairs_model_has_the_default_backends_factors(ours, theirs, approx):
    X, y = _data()
    model = _model(Pairs)
    kwargs = {} if approx == "expand" else {"kfac_approx": "reduce"}
    assert _close(_factors(ours, model, X, y, **kwargs), _factors(theirs, model, X, y, **kwargs))


def test_folded_pairs_give_half_of_curvlinops_input_factors():
    X, y = _data()
    folded, pairs = _model(Folded), _model(Pairs)
    ours = _factors(PushforwardGGN, folded, X, y)
    theirs = _factors(CurvlinopsGGN, folded, X, y)
    for mine, other in zip(ours.kfacs, theirs.kfacs, strict=True):
        assert torch.allclose(mine[0], other[0], rtol=1e-10, atol=1e-14)  # output side (or 1-d)
        if len(mine) == 2:  # a weight: the input factor over N R = 2 N rows, not N
            assert torch.allclose(mine[1], other[1] / 2, rtol=1e-10, atol=1e-14)
    # the folded model's factors are the unfolded model's (same weights, same function)
    assert _close(ours, _factors(PushforwardGGN, pairs, X, y))
    assert _close(ours, _factors(CurvlinopsGGN, pairs, X, y))
    # and closer to the exact GGN (Frobenius relative error measured: 1.89 against 2.47)
    H = GGN(folded, [(X, y)], "classification").dense()
    errors = [((k.to_matrix() - H).norm() / H.norm()).item() for k in (ours, theirs)]
    assert errors[0] < errors[1], errors
