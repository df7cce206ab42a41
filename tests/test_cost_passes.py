"""The cost model's estimates of the data passes and the other chunked computations hold: what a
call allocates (PyTorch's allocator, ``pushforward.testing.peak_memory``) stays within its
estimate and is not far below it, for the curvature's diagonal, K-FAC, products, dense matrix
and low rank, laplace-torch's Monte Carlo predictive and the distributed joint covariance."""

from __future__ import annotations

import pytest
import torch
from test_curvature import ce_targets
from zoo import make_case

import pushforward as pf
from pushforward.core.cost import Budget
from pushforward.curvature import GGN
from pushforward.testing import peak_memory

#: measured peak <= MARGIN * estimate + SLACK (allocator rounding, small bookkeeping tensors),
#: and >= FLOOR * estimate (an estimate far above what is used would waste the budget)
MARGIN, SLACK, FLOOR = 1.1, 64 * 1024, 0.2

MODELS = ["mlp", "cnn_batchnorm_eval", "gpt2_tiny", "layernorm", "wide_mlp", "wide_custom"]


class Custom(torch.nn.Module):
    """The wide MLP as a custom module (the general path, not the hand-differentiated chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = (
            torch.nn.Linear(64, 128),
            torch.nn.Linear(128, 128),
            torch.nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _ggn(name: str) -> GGN:
    if name.startswith("wide"):
        torch.manual_seed(0)
        model = (
            Custom()
            if name == "wide_custom"
            else torch.nn.Sequential(
                torch.nn.Linear(64, 128),
                torch.nn.Tanh(),
                torch.nn.Linear(128, 128),
                torch.nn.Tanh(),
                torch.nn.Linear(128, 10),
            )
        )
        fm = pf.FunctionalModel(model.double())
        x = torch.randn(48, 64, dtype=torch.float64)
    else:
        case = make_case(name)
        fm, x = case.fm, case.x
    y = ce_targets(fm(x))
    return GGN(fm, [(x, y), (x, y)])


def _check(name: str, estimate: int, call) -> None:
    call()  # one-time work (traces, measured costs, cached factors) done
    _, peak = peak_memory(call)
    assert peak <= MARGIN * estimate + SLACK, (name, peak, estimate)
    if estimate > SLACK:  # below it, the allocator's granularity decides
        assert peak >= FLOOR * estimate, (name, peak, estimate)


@pytest.mark.parametrize(
    ("model", "what"),
    [
        (model, what)
        for model in MODELS
        for what in ("diagonal", "kfac", "dense")
        if not (what == "dense" and model.startswith("wide"))  # P^2 entries: small P only
    ],
)
def test_curvature_passes_within_their_plans(model, what):
    ggn = _ggn(model)
    plan = ggn.plan(what)
    _check(f"{model} {what}\n{plan}", plan.memory, getattr(ggn, what))


@pytest.mark.parametrize("model", MODELS)
def test_products_and_low_rank_within_their_plans(model):
    ggn = _ggn(model)
    V = torch.randn(ggn.num_params, 4, dtype=torch.float64)
    plan = ggn.plan("matmat", columns=4)
    _check(f"{model} matmat\n{plan}", plan.memory, lambda: ggn.matmat(V))
    plan = ggn.plan("lowrank", k=2)
    _check(f"{model} lowrank\n{plan}", plan.memory, lambda: ggn.lowrank(2))


def test_monte_carlo_predictive_within_its_plan():
    from pushforward.laplace_interop.glm import output_mc_plan

    torch.manual_seed(0)
    B, K, n = 64, 10, 200
    f = torch.randn(B, K, dtype=torch.float64)
    var = torch.randn(B, K, K, dtype=torch.float64)
    var = var @ var.transpose(-1, -2) + torch.eye(K, dtype=torch.float64)
    budget = Budget.of(2**30)
    plan = output_mc_plan(f.numel(), var.numel(), K, n, 8, budget)

    def sample():
        scale = torch.linalg.cholesky(var)
        z = torch.randn(K, n, dtype=f.dtype)
        total = torch.zeros_like(f)
        for part in pf.core.chunking.spans(n, plan.chunk):
            total = total + (f.unsqueeze(-1) + scale @ z[:, part]).softmax(-2).sum(-1)
        return total

    _check("output-space Monte Carlo", plan.memory, sample)


@pytest.mark.parametrize("model", ["mlp", "cnn_batchnorm_eval"])
@pytest.mark.parametrize("cov_kind", ["diag", "lowrank"])
def test_distributed_joint_rows_within_their_plan(model, cov_kind):
    from test_variance import make_cov

    from pushforward.core.options import Options
    from pushforward.distributed.joint import joint_plan, joint_rows
    from pushforward.engine import Problem

    case = make_case(model)
    cov = make_cov(cov_kind, case.fm)
    inputs = case.fm.prepare(case.x).detach()
    plan = joint_plan(Problem.build(case.fm, inputs, cov, "joint", Options()))
    _check(f"{model} joint rows", plan.memory, lambda: joint_rows(case.fm, case.x, cov))
