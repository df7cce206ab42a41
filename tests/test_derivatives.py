"""Models whose forward blocks derivatives: a clear error where PyTorch's forward and reverse modes
disagree (``torch.no_grad`` around a computation on the posterior parameters, an inconsistent
custom ``autograd.Function``), exact answers where they agree (``.detach()``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import pushforward as pf
from pushforward.core import derivatives
from pushforward.curvature import GGN

DT = torch.float64
STRATEGIES = ["auto", "structured", "forward", "reverse"]


class Blocked(nn.Module):
    """An MLP 5-7-7-4 whose forward blocks derivatives as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2, self.head = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        kind = self.kind
        if kind == "no_grad_backbone":
            with torch.no_grad():
                h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        else:
            h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        if kind == "detached_backbone":
            h = h.detach()
        if kind == "no_grad_scale":  # a normalization's scale hidden from reverse mode
            with torch.no_grad():
                scale = h.norm(dim=-1, keepdim=True) + 1.0
            h = h / scale
        if kind == "no_grad_output":
            with torch.no_grad():
                return self.head(h)
        out = self.head(h)
        if kind == "detached_output":
            return out.detach()
        if kind == "data_output":
            return out.data
        if kind == "inconsistent_function":
            return _Inconsistent.apply(out)
        return out


class _Inconsistent(torch.autograd.Function):
    """The identity, with a backward that doubles (its forward-mode formula does not)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return 2 * g

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:
        return t


def _model(kind: str, frozen_backbone: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Blocked(kind).to(DT).eval()
    if frozen_backbone:
        model.fc1.requires_grad_(False)
        model.fc2.requires_grad_(False)
    return model, torch.randn(6, 5, dtype=DT), torch.randint(4, (6,))


@pytest.mark.parametrize(
    "kind", ["no_grad_backbone", "no_grad_scale", "no_grad_output", "inconsistent_function"]
)
def test_forward_and_reverse_mode_disagreeing_is_an_error_for_every_computation(kind):
    model, x, y = _model(kind)
    fm = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    for strategy in STRATEGIES:
        with pytest.raises(pf.InconsistentDerivativesError, match=r"torch\.no_grad"):
            pf.functional_variance(pf.FunctionalModel(model), x, S, strategy=strategy)
    with pytest.raises(pf.InconsistentDerivativesError):
        GGN(model, [(x, y)]).diagonal()
    with pytest.raises(pf.InconsistentDerivativesError):
        pf.predictive(pf.FunctionalModel(model), x, S, link="probit")


@pytest.mark.parametrize("kind", ["detached_backbone", "detached_output", "data_output"])
def test_detached_values_are_constants_to_every_strategy(kind):
    """``.detach()`` (and ``.data``) is a constant to both modes: every strategy gives the same
    exact answer, zero where the output is detached entirely (a detached alias of the head's
    output is not taken for the head's output)."""
    model, x, y = _model(kind)
    fm = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    # the Jacobian by brute force, the detached part a constant
    params = fm.params(False)
    rows = []
    for b in range(len(x)):
        J = torch.func.jacrev(lambda p, b=b: fm.call(p, (x[b : b + 1],), {})[0])(params)
        rows.append(torch.cat([J[n].reshape(4, -1) for n in fm.param_names], 1))
    J = torch.stack(rows)  # (B, K, P)
    want = torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J)
    if kind != "detached_backbone":
        assert want.abs().max() == 0
    for strategy in STRATEGIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pf.PushforwardFallbackWarning)
            if kind != "detached_backbone" and strategy == "structured":
                # nothing to take back from the output: a clear error, never the head's rows
                with pytest.raises(RuntimeError, match="does not require grad"):
                    pf.functional_variance(fm, x, S, strategy=strategy)
                continue
            _, var = pf.functional_variance(fm, x, S, strategy=strategy)
        torch.testing.assert_close(var, want, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pf.PushforwardFallbackWarning)
        diag = GGN(model, [(x, y)]).diagonal()
    p = torch.softmax(model(x), -1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(diag, torch.einsum("bkp,bkl,blp->p", J, H, J))


def test_no_grad_outside_the_posterior_is_fine():
    """A backbone run under ``torch.no_grad`` with the posterior on the head alone (last-layer
    Laplace): both modes see the same head, no error, exact."""
    model, x, _ = _model("no_grad_backbone", frozen_backbone=True)
    fm = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    _, J = pf.testing.brute_force_jacobian(fm, x)
    want = torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J)
    for strategy in STRATEGIES:
        _, var = pf.functional_variance(fm, x, S, strategy=strategy)
        torch.testing.assert_close(var, want)


def test_the_check_runs_once_per_input_signature_and_tests_only_on_a_sign(monkeypatch):
    screened: list[bool] = []
    tested: list[int] = []
    screen, test = derivatives.may_block_derivatives, derivatives.check_derivatives

    def screen_counted(forward, params):
        screened.append(screen(forward, params))
        return screened[-1]

    def test_counted(call, params):
        tested.append(1)
        return test(call, params)

    monkeypatch.setattr("pushforward.core.functional_model.may_block_derivatives", screen_counted)
    monkeypatch.setattr("pushforward.core.functional_model.check_derivatives", test_counted)
    model, x, _ = _model("plain")
    fm = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    for _ in range(3):
        pf.functional_variance(fm, x, S)
        pf.functional_variance(fm, x[:1], S)  # a batch of one: the same signature
    assert screened == [False] and not tested  # no sign: no adjoint test
    pf.functional_variance(fm, torch.randn(6, 2, 5, dtype=DT), S)  # another signature
    assert screened == [False, False] and not tested
    model.kind = "detached_backbone"  # .detach() is no sign: a constant to both modes
    pf.functional_variance(pf.FunctionalModel(model), x, S)
    assert screened == [False, False, False] and not tested
    model.kind = "no_grad_backbone"
    with pytest.raises(pf.InconsistentDerivativesError):
        pf.functional_variance(pf.FunctionalModel(model), x, S)
    assert screened[-1] and tested == [1]


@pytest.mark.parametrize(
    ("kind", "sign"),
    [
        ("plain", False),
        ("detached_backbone", False),
        ("no_grad_backbone", True),
        ("no_grad_scale", True),
        ("no_grad_output", True),
        ("detached_output", True),  # an output requiring no gradient
        ("inconsistent_function", True),  # a custom Function's forward runs without gradients
    ],
)
def test_the_signs_of_blocked_derivatives(kind, sign):
    model, x, _ = _model(kind)
    params = dict(model.named_parameters())
    assert derivatives.may_block_derivatives(lambda: model(x[:1]), params) == sign
    model.fc1.bias.requires_grad_(False)  # a frozen posterior parameter: the forward cannot tell
    assert derivatives.may_block_derivatives(lambda: model(x[:1]), params)


def test_a_frozen_parameter_selected_for_the_posterior_is_tested_too():
    """``no_grad`` around a parameter frozen in the module but selected for the posterior: the
    screening forward cannot see it (nothing requires gradients there), the adjoint test can."""
    model, x, _ = _model("no_grad_backbone", frozen_backbone=True)
    fm = pf.FunctionalModel(model, params=[n for n, _ in model.named_parameters()])
    assert fm.num_params == sum(p.numel() for p in model.parameters())
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    with pytest.raises(pf.InconsistentDerivativesError):
        pf.functional_variance(fm, x, S)


def test_the_adjoint_test_passes_models_that_agree_and_skips_what_it_cannot_decide():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    fm = pf.FunctionalModel(model)
    x = torch.randn(1, 3)
    derivatives.check_derivatives(lambda p: fm.call(p, (x,), {}), fm.params(False))  # float32
    derivatives.check_derivatives(lambda p: fm.call(p, (x,), {}), {})  # nothing to test
    half = pf.FunctionalModel(Blocked("no_grad_backbone").to(torch.bfloat16))
    xb = torch.randn(1, 5, dtype=torch.bfloat16)
    # bfloat16 rounding is as large as the effect: not decided here
    derivatives.check_derivatives(lambda p: half.call(p, (xb,), {}), half.params(False))
