"""The layer-structured strategy against brute force and the generic strategies (float64)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import rel_err, zoo_reference
from test_variance import make_cov, references
from torch import nn
from torch.autograd import gradcheck
from zoo import FACTORIES, Case, brute_force_jacobian

import pushforward as pf
from pushforward.core.options import Options
from pushforward.covariance import BlockDiagonal, Dense, Diagonal, Kronecker
from pushforward.engine.planner import plan_problem
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.structured import _split as split_problem

TOL = 1e-10
D = torch.float64


class ConvZoo(nn.Module):
    """Conv2d with stride, padding, dilation and groups; 'same' padding; Conv3d; a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv2d(4, 3, (2, 3), padding="same")
        self.c4 = nn.Conv3d(1, 2, 2, stride=(1, 2, 1))
        self.head = nn.Linear(3 * 4 * 4 + 2 * 2 * 2 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.c3(torch.relu(self.c2(torch.tanh(self.c1(x))))))
        v = torch.sin(self.c4(h.unsqueeze(1)))  # (B, 1, 3, 4, 4) -> (B, 2, 2, 2, 3)
        return self.head(torch.cat([h.flatten(1), v.flatten(1)], 1))


class SequenceConv(nn.Module):
    """Conv1d over sequences (B, C, L) and a per-position linear head: (B, L', K)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).transpose(1, 2))


class TokenModel(nn.Module):
    """Embedding (with padding_idx) -> Linear over (B, T, d) -> mixing -> per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.emb(ids)))
        h = self.norm(h + h.mean(1, keepdim=True))  # couples tokens of one sequence
        return self.head(h)


class SeqFirst(nn.Module):
    """Transposes to (T, B, d) internally: the engine must not assume layers see batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x (B, T, 3)
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # (T, B, 4)
        return self.head(h.transpose(0, 1).sum(1))


def extra_case(name: str) -> tuple[Case, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "conv_zoo":
        module, x = ConvZoo(), torch.randn(3, 2, 8, 8)
    elif name == "sequence_conv":
        module, x = SequenceConv(), torch.randn(2, 3, 7)
    elif name == "tokens":
        module, x = TokenModel(), torch.tensor([[1, 2, 2, 0], [3, 3, 3, 5]])
    else:
        module, x = SeqFirst(), torch.randn(3, 5, 3)
    module = module.to(D)
    x = x.to(D) if x.is_floating_point() else x
    case = Case(name, pf.FunctionalModel(module), x)
    f, J = brute_force_jacobian(case.fm, case.x)
    return case, f, J


EXTRA = ["conv_zoo", "sequence_conv", "tokens", "seq_first"]
COVS = ["diag", "kron", "isotropic", "block_mix"]


def _check(case, J_ref, cov, strategy="structured"):
    var_ref, cov_ref, joint_ref, _ = references(case, J_ref, cov)
    _, var = pf.functional_variance(case.fm, case.x, cov, strategy=strategy)
    _, per = pf.functional_covariance(case.fm, case.x, cov, strategy=strategy)
    _, joint = pf.functional_covariance(case.fm, case.x, cov, joint=True, strategy=strategy)
    assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL
    assert rel_err(per.reshape(cov_ref.shape), cov_ref) < TOL
    assert rel_err(joint, joint_ref) < TOL


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("cov_kind", COVS)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_structured_matches_brute_force_on_the_zoo(name, cov_kind):
    case, _, J_ref = zoo_reference(name)
    _check(case, J_ref, make_cov(cov_kind, case.fm))


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("cov_kind", COVS)
@pytest.mark.parametrize("name", EXTRA)
def test_structured_matches_brute_force_on_layer_variants(name, cov_kind):
    case, _, J_ref = extra_case(name)
    _check(case, J_ref, make_cov(cov_kind, case.fm))


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("name", EXTRA)
def test_structured_equals_generic_strategies(name):
    case, _, _ = extra_case(name)
    cov = make_cov("kron", case.fm, seed=4)
    _, var_s = pf.functional_variance(case.fm, case.x, cov, strategy="structured")
    for generic in ("reverse", "forward"):
        _, var_g = pf.functional_variance(case.fm, case.x, cov, strategy=generic)
        assert rel_err(var_s, var_g) < TOL


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("name", ["tokens", "sequence_conv"])
def test_selected_outputs_and_sequences(name):
    case, f_ref, J_ref = extra_case(name)
    cov = make_cov("diag", case.fm)
    example_shape = f_ref.shape[:-1]
    outputs = torch.randint(
        0, f_ref.shape[-1], (*example_shape, 2), generator=torch.Generator().manual_seed(1)
    )
    var_ref, cov_ref, joint_ref, _ = references(case, J_ref, cov, outputs)
    _, var = pf.functional_variance(case.fm, case.x, cov, outputs=outputs, strategy="structured")
    _, per = pf.functional_covariance(case.fm, case.x, cov, outputs=outputs, strategy="structured")
    _, joint = pf.functional_covariance(
        case.fm, case.x, cov, outputs=outputs, joint=True, strategy="structured"
    )
    assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL
    assert rel_err(per.reshape(cov_ref.shape), cov_ref) < TOL
    assert rel_err(joint, joint_ref) < TOL


def _problem(case, cov, kind="variance"):
    return Problem.build(case.fm, case.fm.prepare(case.x), cov, kind, Options())


def _split(problem):
    return split_problem(problem, lambda sub, exclude: plan_problem(sub, "auto", exclude))


def test_which_parameters_are_matched():
    case, _, _ = extra_case("tokens")
    layout = _split(_problem(case, make_cov("diag", case.fm)))
    handled = {n for c in layout.contractions for n in c.names}
    assert handled == {"emb.weight", "proj.weight", "proj.bias", "head.weight", "head.bias"}
    assert set(layout.generic_names) == {"norm.weight", "norm.bias"}
    assert layout.head is not None and layout.head.weight_name == "head.weight"
    reused, _, _ = zoo_reference("reused_module")
    analysis = _split(_problem(reused, make_cov("diag", reused.fm))).analysis
    assert (
        "inner.weight" in analysis.unmatched
        and "used 2 times" in analysis.unmatched["inner.weight"]
    )
    tied, _, _ = zoo_reference("tied_embedding_lm")
    analysis = _split(_problem(tied, make_cov("diag", tied.fm))).analysis
    assert "emb.weight" in analysis.unmatched


def test_planner_prefers_structured_for_layer_covariances():
    case, _, _ = extra_case("conv_zoo")
    for kind in ("diag", "kron"):
        cov = make_cov(kind, case.fm)
        plan = pf.plan(case.fm, case.x, cov)
        assert plan.name == "structured", str(plan)
    dense = Dense(torch.eye(case.fm.num_params, dtype=D))
    assert pf.plan(case.fm, case.x, dense).name != "structured"
    with pytest.raises(ValueError, match="couples layers"):
        pf.functional_variance(case.fm, case.x, dense, strategy="structured")


def test_cross_layer_block_goes_generic_and_adds_up():
    case, _, J_ref = zoo_reference("mlp")
    names = case.fm.param_names  # 0.weight, 0.bias, 2.weight, 2.bias
    gen = torch.Generator().manual_seed(9)
    spd = {}
    for key in [(names[0], names[1]), (names[2], names[3])]:  # a dense block per layer: fine
        A = torch.randn(case.fm.layout.sub(key).num_params, 5, generator=gen, dtype=D)
        spd[key] = Dense(A @ A.T + torch.eye(A.shape[0], dtype=D))
    layout = _split(_problem(case, BlockDiagonal(spd)))
    assert not layout.generic_names
    _check(case, J_ref, BlockDiagonal(spd))
    cross = (names[1], names[2])  # a block coupling two layers: generic for those two
    A = torch.randn(case.fm.layout.sub(cross).num_params, 5, generator=gen, dtype=D)
    rest = case.fm.num_params - A.shape[0]
    cov = BlockDiagonal(
        {cross: Dense(A @ A.T + torch.eye(A.shape[0], dtype=D))},
        default=Diagonal(torch.rand(rest, generator=gen, dtype=D)),
    )
    layout = _split(_problem(case, cov))
    assert set(layout.generic_names) == set(cross)
    _check(case, J_ref, cov)


def test_kronecker_eigen_forms_with_damping():
    case, _, J_ref = extra_case("conv_zoo")
    gen = torch.Generator().manual_seed(2)
    vecs, vals = [], []
    for shape in case.fm.param_shapes.values():
        dims = [shape[0], shape[1:].numel()] if len(shape) > 1 else [shape[0]]
        vecs.append([torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))[0] for n in dims])
        vals.append([torch.rand(n, generator=gen, dtype=D) + 0.2 for n in dims])
    for damping in (False, True):
        cov = Kronecker.from_precision_eigen(vecs, vals, deltas=0.5, damping=damping)
        _check(case, J_ref, cov)


def test_batch_coupled_models_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    fm = pf.FunctionalModel(model)
    with pytest.raises(pf.BatchCouplingError):
        pf.functional_variance(
            fm, torch.randn(4, 3, dtype=D), make_cov("diag", fm), strategy="structured"
        )


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("kind", ["variance", "covariance", "joint"])
@pytest.mark.parametrize("name", ["conv_zoo", "tokens"])
def test_structured_gradcheck(name, kind):
    check = partial(gradcheck, fast_mode=True)
    case, _, _ = extra_case(name)
    variances = torch.rand(case.fm.num_params, dtype=D, requires_grad=True)
    x = case.x.clone().requires_grad_(True) if case.x.is_floating_point() else case.x

    def run(*args):
        x_ = args[0] if x.is_floating_point() else x
        v_ = args[-1]
        if kind == "variance":
            return pf.functional_variance(
                case.fm, x_, Diagonal(v_), strategy="structured", differentiable=True
            )
        return pf.functional_covariance(
            case.fm,
            x_,
            Diagonal(v_),
            joint=kind == "joint",
            strategy="structured",
            differentiable=True,
        )

    inputs = (x, variances) if x.is_floating_point() else (variances,)
    assert check(run, inputs)
    # not the embedding: PyTorch's padding_idx makes its gradient deliberately inexact
    name = next(n for n in case.fm.param_names if not n.startswith("emb"))
    weight = case.fm.params()[name]
    assert check(lambda w: run(*[t.detach() for t in inputs])[1] + 0 * w.sum(), (weight,))
