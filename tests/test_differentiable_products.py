"""Gradients through the products (``differentiable=True``): gradcheck w.r.t. x and parameters."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck as _gradcheck

import pushforward as pf

gradcheck = partial(_gradcheck, fast_mode=True)


def model_and_input(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.randn(3, 3)
    elif kind == "layernorm":
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Softplus(), nn.Linear(4, 2))
        x = torch.randn(2, 3)
    else:  # sequence model with attention, eval mode
        model = nn.Sequential(
            nn.TransformerEncoderLayer(4, 2, 8, batch_first=True), nn.Linear(4, 2)
        ).eval()
        x = torch.randn(2, 3, 4)
    return pf.FunctionalModel(model.double()), x.double().requires_grad_(True)


KINDS = ["mlp", "layernorm", "transformer"]


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_gradcheck_x_params_and_tangent(kind):
    fm, x = model_and_input(kind)
    v = torch.randn(fm.num_params, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x_, v_: pf.jvp(fm, x_, v_, differentiable=True), (x, v))
    weight = fm.params()[fm.param_names[0]]
    assert gradcheck(
        lambda w: pf.jvp(fm, x, v.detach(), differentiable=True)[1] * w.sum() ** 0, (weight,)
    )


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("kind", KINDS)
def test_per_example_vjp_and_jacobian_gradcheck(kind):
    fm, x = model_and_input(kind)
    f = fm(x)
    u = torch.randn(f.shape, dtype=torch.float64)
    assert gradcheck(
        lambda x_: pf.per_example_vjp(fm, x_, u, chunk_size=2, differentiable=True)[1], (x,)
    )
    assert gradcheck(lambda x_: pf.jacobian(fm, x_, chunk_size=3, differentiable=True)[1], (x,))
    weight = fm.params()[fm.param_names[-1]]
    assert gradcheck(
        lambda w: pf.jacobian(fm, x.detach(), differentiable=True)[1] + 0 * w.sum(), (weight,)
    )


@pytest.mark.usefixtures("quiet_fallbacks")
def test_batched_jvp_gradcheck():
    fm, x = model_and_input("mlp")
    V = torch.randn(3, fm.num_params, dtype=torch.float64, requires_grad=True)
    assert gradcheck(
        lambda x_, V_: pf.batched_jvp(fm, x_, V_, chunk_size=2, differentiable=True)[1], (x, V)
    )


def test_gradient_through_fallback_paths():
    """The reverse-mode emulation of jvp and the autograd loop are differentiable too."""
    from test_products import CustomOpModel, OldStyleModel

    for cls in (CustomOpModel, OldStyleModel):
        torch.manual_seed(0)
        fm = pf.FunctionalModel(cls().double())
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        v = torch.randn(fm.num_params, dtype=torch.float64)
        with pytest.warns(pf.PushforwardFallbackWarning):
            pf.jvp(fm, x, v)
            pf.jacobian(fm, x)
        assert gradcheck(lambda x_, fm=fm, v=v: pf.jvp(fm, x_, v, differentiable=True)[1], (x,))
        assert gradcheck(lambda x_, fm=fm: pf.jacobian(fm, x_, differentiable=True)[1], (x,))
