"""The cost model's estimates of the data passes and the other chunked computations hold: what a
call allocates (PyTorch's allocator, ``pushforward.testing.peak_memory``) stays within its
estimate and is not far below it, for the curvature's diagonal, K-FAC, products, dense matrix
and low rank, laplace-torch's Monte Carlo predictive, the distributed joint covariance, and the
forward-mode passes (function samples, the Monte Carlo variance) of a deep language model, whose
forward keeps a few blocks' tensors alive, not the activations a backward would need."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("custom", [False, True])
def test_diagonal_in_row_groups_within_its_plan(custom):
    """At a size where the rows go back in several cache-sized groups (MLP 784-256-256-10,
    float32, batches of 256: two rows per group), as an ``nn.Sequential`` and as a custom module
    (the traced chain)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    if custom:
        model = torch.nn.Sequential(Wrapped(model))
    x, y = torch.randn(512, 784), torch.randint(10, (512,))
    ggn = GGN(model, [(x[:256], y[:256]), (x[256:], y[256:])])
    plan = ggn.plan("diagonal")
    assert plan.producer.startswith("traced chain:" if custom else "chain:"), plan
    assert "squares" in plan.producer
    _check(f"row groups\n{plan}", plan.memory, ggn.diagonal)


class Wrapped(torch.nn.Module):
    """A module around another: not an ``nn.Sequential``, its forward read as a chain."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


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


class _LastToken(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits[:, -1]


def _deep_lm() -> tuple[pf.FunctionalModel, torch.Tensor]:
    """A GPT-2 of 10 blocks from a config (random weights) read at the last token, with only its
    attention projections selected (as LoRA selects adapters)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=10, n_embd=64, n_head=4, vocab_size=300, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    lm = transformers.GPT2LMHeadModel(config).eval()
    for name, p in lm.named_parameters():
        p.requires_grad_("c_attn" in name)
    return pf.FunctionalModel(_LastToken(lm)), torch.randint(0, 300, (3, 24))


@pytest.mark.parametrize("what", ["samples", "monte_carlo"])
def test_forward_mode_passes_of_a_deep_model_within_their_plans(what):
    from pushforward.core.cost import measure_cost
    from pushforward.products.perturbations import sample_bytes

    fm, ids = _deep_lm()
    S = pf.Diagonal(torch.full((fm.num_params,), 1e-3))
    n = 4
    if what == "samples":
        cost = measure_cost(fm, fm.prepare(ids))
        B = ids.shape[0]
        estimate = (n + 1) * B * cost.output_bytes + n * sample_bytes(cost, B, S)
        _check("function samples", estimate, lambda: pf.functional_samples(fm, ids, S, n))
    else:
        plan = pf.plan(fm, ids, S, strategy="monte_carlo", n_samples=n, chunk_size=n)
        assert plan.estimate.chunk_size == n
        _check(f"Monte Carlo variance\n{plan}", plan.estimate.memory, plan.execute)


def test_a_pass_plans_each_batch_shape_once(monkeypatch):
    """Within one pass, the batches of one input signature, size and rows share one plan, made
    once and equal to that batch's plan alone; a batch of another size gets its own; the next
    pass plans again (modules or hooks may have changed in between)."""
    from pushforward.curvature import passes as passes_module

    made: list[tuple[int, object]] = []
    original = passes_module.CurvaturePass._plan

    def recorded(self, consumer, inputs, cost, R):
        out = original(self, consumer, inputs, cost, R)
        made.append((inputs.batch_size, out[0]))
        return out

    monkeypatch.setattr(passes_module.CurvaturePass, "_plan", recorded)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x = torch.randn(29, 5)
    y = ce_targets(model(x))
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 29, 8)]  # 8, 8, 8 and 5 examples
    ggn = GGN(model, data)
    ggn.diagonal()
    assert [size for size, _ in made] == [8, 5]
    ggn.diagonal()
    assert [size for size, _ in made] == [8, 5, 8, 5]
    for size, plan in made[:2]:
        alone = GGN(model, [next(b for b in data if len(b[1]) == size)]).plan("diagonal")
        assert dataclasses.replace(plan, budget=alone.budget) == alone  # (free memory moves)
