"""functional_variance / functional_covariance: every exact strategy x covariance structure x zoo
model against brute force (explicit J, then J S J^T), float64."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, zoo_reference

import pushforward as pf
from pushforward.covariance import BlockDiagonal, Dense, Diagonal, Isotropic, Kronecker, LowRank

TOL = 1e-10
D = torch.float64
STRATEGIES = ["explicit", "reverse", "forward", "auto"]


def spd(n: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=gen, dtype=D)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=D)


def make_cov(kind: str, fm: pf.FunctionalModel, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    P, layout = fm.num_params, fm.layout
    if kind == "diag":
        return Diagonal(torch.rand(P, generator=gen, dtype=D))
    if kind == "dense":
        return Dense(spd(P, gen))
    if kind == "lowrank":
        return LowRank(
            torch.randn(P, 3, generator=gen, dtype=D), torch.rand(3, generator=gen, dtype=D)
        )
    if kind == "lowrank_diag":
        return LowRank(
            torch.randn(P, 2, generator=gen, dtype=D),
            torch.rand(2, generator=gen, dtype=D),
            torch.rand(P, generator=gen, dtype=D),
        )
    if kind == "isotropic":
        return Isotropic(torch.tensor(0.3, dtype=D))
    if kind == "kron":
        factors = {}
        for name, shape in layout.shapes.items():
            if len(shape) >= 2:
                factors[name] = (spd(shape[0], gen), spd(shape[1:].numel(), gen))
            else:
                factors[name] = (spd(shape.numel(), gen),)
        return Kronecker(factors)
    if kind == "block_mix":
        first = layout.names[0]
        n = layout.shapes[first].numel()
        rest = P - n
        return BlockDiagonal(
            {first: Dense(spd(n, gen))},
            default=Diagonal(torch.rand(rest, generator=gen, dtype=D)) if rest else None,
        )
    raise ValueError(kind)


COVS = ["diag", "dense", "lowrank", "lowrank_diag", "isotropic", "kron", "block_mix"]


def references(case, J_ref, cov, outputs=None):
    """(var, per-example cov, joint) from the explicit Jacobian and the dense covariance."""
    fm = case.fm
    P = fm.num_params
    f_shape = J_ref.shape[:-1]
    example_shape = f_shape[: len(f_shape) - fm.output_dims]
    N = example_shape.numel()
    J = J_ref.reshape(N, -1, P)
    if outputs is not None:
        J = J[torch.arange(N)[:, None], outputs.reshape(N, -1)]
    S = cov.bind(fm.layout).to_dense()
    per_example = torch.einsum("nkp,pq,nlq->nkl", J, S, J)
    flat = J.reshape(-1, P)
    joint = flat @ S @ flat.T
    var = per_example.diagonal(dim1=-2, dim2=-1)
    return var, per_example, joint, example_shape


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("cov_kind", COVS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_strategies_match_brute_force(zoo_name, cov_kind, strategy):
    case, f_ref, J_ref = zoo_reference(zoo_name)
    cov = make_cov(cov_kind, case.fm)
    var_ref, cov_ref, joint_ref, example_shape = references(case, J_ref, cov)
    K = cov_ref.shape[-1]
    f, var = pf.functional_variance(case.fm, case.x, cov, strategy=strategy)
    assert var.shape == f_ref.shape
    assert rel_err(f, f_ref) < TOL
    assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL
    _, per_example = pf.functional_covariance(case.fm, case.x, cov, strategy=strategy)
    assert per_example.shape == (*example_shape, K, K)
    assert rel_err(per_example.reshape(cov_ref.shape), cov_ref) < TOL
    _, joint = pf.functional_covariance(case.fm, case.x, cov, joint=True, strategy=strategy)
    assert joint.shape == joint_ref.shape
    assert rel_err(joint, joint_ref) < TOL


SELECTED = [
    "mlp",
    "gpt2_tiny",
    "tied_embedding_lm",
    "transformer_encoder",
    "multi_output_regression",
]


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("name", SELECTED)
@pytest.mark.parametrize("cov_kind", ["diag", "lowrank", "kron"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selected_outputs(name, cov_kind, strategy):
    case, f_ref, J_ref = zoo_reference(name)
    cov = make_cov(cov_kind, case.fm, seed=1)
    example_shape = f_ref.shape[: f_ref.dim() - case.fm.output_dims]
    K = f_ref[(0,) * len(example_shape)].numel()
    outputs = torch.randint(0, K, (*example_shape, 2), generator=torch.Generator().manual_seed(5))
    var_ref, cov_ref, joint_ref, _ = references(case, J_ref, cov, outputs)
    _, var = pf.functional_variance(case.fm, case.x, cov, outputs=outputs, strategy=strategy)
    assert var.shape == outputs.shape
    assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL
    _, per_example = pf.functional_covariance(
        case.fm, case.x, cov, outputs=outputs, strategy=strategy
    )
    assert per_example.shape == (*outputs.shape, 2)
    assert rel_err(per_example.reshape(cov_ref.shape), cov_ref) < TOL
    _, joint = pf.functional_covariance(
        case.fm, case.x, cov, outputs=outputs, joint=True, strategy=strategy
    )
    assert rel_err(joint, joint_ref) < TOL


# -- last layer ------------------------------------------------------------------------------
LAST_LAYER_MODELS = [
    "mlp",
    "cnn_batchnorm_eval",
    "layernorm",
    "dict_input",
    "transformer_encoder",
    "multi_output_regression",
]


def last_layer_covs(fm: pf.FunctionalModel):
    gen = torch.Generator().manual_seed(3)
    (w, b) = fm.param_names
    K, d = fm.param_shapes[w]
    l1, l2 = (
        torch.rand(K, generator=gen, dtype=D) + 0.5,
        torch.rand(d, generator=gen, dtype=D) + 0.5,
    )
    Q1 = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=D))[0]
    Q2 = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=D))[0]
    Qb = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=D))[0]
    lb = torch.rand(K, generator=gen, dtype=D) + 0.5
    eigen = Kronecker.from_precision_eigen([[Q1, Q2], [Qb]], [[l1, l2], [lb]], deltas=0.7)
    damped = Kronecker.from_precision_eigen(
        [[Q1, Q2], [Qb]], [[l1, l2], [lb]], deltas=0.7, damping=True
    )
    return {
        "diag": make_cov("diag", fm),
        "kron": make_cov("kron", fm),
        "kron_eigen": eigen,
        "kron_damped": damped,
        "dense": make_cov("dense", fm),
        "lowrank": make_cov("lowrank", fm),
        "mix": BlockDiagonal(
            {w: Diagonal(torch.rand(K * d, generator=gen, dtype=D)), b: Dense(spd(K, gen))}
        ),
    }


@pytest.mark.parametrize("name", LAST_LAYER_MODELS)
def test_last_layer_closed_forms(name):
    case, _, _ = zoo_reference(name)
    from zoo import brute_force_jacobian, make_case

    fm = make_case(name, params="last_layer", example_input=case.x).fm
    _, J_ref = brute_force_jacobian(fm, case.x)
    shape = J_ref.shape[:-1]
    example_shape = shape[: len(shape) - fm.output_dims]
    K = shape[len(example_shape) :].numel()
    outputs = torch.randint(0, K, (*example_shape, 3), generator=torch.Generator().manual_seed(2))
    for cov_name, cov in last_layer_covs(fm).items():
        for sel in (None, outputs):
            var_ref, cov_ref, joint_ref, _ = references(
                type(case)(name, fm, case.x), J_ref, cov, sel
            )
            if cov_name.startswith(("diag", "kron")):  # closed forms: one forward pass
                plan = pf.plan(fm, case.x, cov, outputs=sel)
                assert plan.name == "last_layer", (cov_name, str(plan))
            _, var = pf.functional_variance(fm, case.x, cov, outputs=sel, strategy="last_layer")
            _, per = pf.functional_covariance(fm, case.x, cov, outputs=sel, strategy="last_layer")
            _, joint = pf.functional_covariance(
                fm, case.x, cov, outputs=sel, joint=True, strategy="last_layer"
            )
            assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL, cov_name
            assert rel_err(per.reshape(cov_ref.shape), cov_ref) < TOL, cov_name
            assert rel_err(joint, joint_ref) < TOL, cov_name


def test_last_layer_refuses_what_it_cannot_do():
    case, _, _ = zoo_reference("mlp")
    with pytest.raises(ValueError, match=r"last_layer.*one module"):
        pf.functional_variance(case.fm, case.x, make_cov("diag", case.fm), strategy="last_layer")
    from zoo import TiedLM

    lm = pf.FunctionalModel(TiedLM().double(), params=["emb"])
    with pytest.raises(ValueError, match=r"Embedding|tied"):
        pf.functional_variance(
            lm, torch.randint(0, 7, (2, 3)), make_cov("diag", lm), strategy="last_layer"
        )

    class Softmaxed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(3, 4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return torch.softmax(self.head(torch.tanh(self.body(x))), -1)

    fm = pf.FunctionalModel(Softmaxed().double(), params=["head"])
    x = torch.randn(3, 3, dtype=D)
    with pytest.raises(ValueError, match="not the model output"):
        pf.functional_variance(fm, x, make_cov("diag", fm), strategy="last_layer")
    assert pf.plan(fm, x, make_cov("diag", fm)).name != "last_layer"

    class HeadTwice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.head(x)))

    fm = pf.FunctionalModel(HeadTwice().double())
    with pytest.raises(ValueError, match="called 2 times"):
        pf.functional_variance(fm, x, make_cov("diag", fm), strategy="last_layer")

    class FunctionalReuse(torch.nn.Module):
        """The head's weight is also used functionally (invisible to module scans)."""

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.head(torch.tanh(torch.nn.functional.linear(x, self.head.weight)))

    fm = pf.FunctionalModel(FunctionalReuse().double())
    with pytest.raises(ValueError, match="used elsewhere"):
        pf.functional_variance(fm, x, make_cov("diag", fm), strategy="last_layer")


# -- planner -------------------------------------------------------------------------------
def test_plan_explains_choice_and_rejections():
    case, _, _ = zoo_reference("mlp")
    plan = pf.plan(case.fm, case.x, make_cov("diag", case.fm), memory_budget="1GB")
    text = str(plan)
    assert plan.name in text and "memory budget 1.0 GB" in text
    assert "last_layer: not applicable" in text
    for other in ("explicit", "reverse", "forward"):
        assert other in text
    lowrank_plan = pf.plan(case.fm, case.x, make_cov("lowrank", case.fm))
    assert lowrank_plan.name == "forward"  # r = 3 JVPs beat K = 3 reverse rows per example x 5


def test_named_strategy_errors():
    case, _, _ = zoo_reference("mlp")
    cov = make_cov("diag", case.fm)
    with pytest.raises(ValueError, match="unknown strategy"):
        pf.functional_variance(case.fm, case.x, cov, strategy="magic")
    with pytest.raises(ValueError, match="over the memory budget"):
        pf.functional_variance(case.fm, case.x, cov, strategy="explicit", memory_budget=100)
    with pytest.raises(ValueError, match="cannot read memory budget"):
        pf.functional_variance(case.fm, case.x, cov, memory_budget="lots")


def test_covariance_must_match_the_model():
    case, _, _ = zoo_reference("mlp")
    with pytest.raises(ValueError, match="P="):
        pf.functional_variance(
            case.fm, case.x, Diagonal(torch.ones(case.fm.num_params + 1, dtype=D))
        )
    single = Diagonal(torch.ones(case.fm.num_params))  # float32: cast to the model's float64
    assert pf.functional_variance(case.fm, case.x, single)[1].dtype == D
    with pytest.raises(TypeError, match="covariance operator"):
        pf.functional_variance(case.fm, case.x, torch.eye(case.fm.num_params, dtype=D))
    with pytest.raises(ValueError, match="outputs"):
        pf.functional_variance(
            case.fm,
            case.x,
            make_cov("diag", case.fm),
            outputs=torch.zeros(5, 1, dtype=torch.long) + 7,
        )


@pytest.mark.parametrize("strategy", ["reverse", "explicit", "forward"])
def test_small_budgets_give_small_chunks_and_the_same_answer(strategy, monkeypatch):
    case, _, J_ref = zoo_reference("cnn_batchnorm_eval")
    cov = make_cov("kron", case.fm)
    var_ref, *_ = references(case, J_ref, cov)
    big = pf.plan(case.fm, case.x, cov, strategy=strategy, memory_budget="1GB")
    small = pf.plan(
        case.fm, case.x, cov, strategy=strategy, memory_budget=int(big.estimate.memory * 0.6)
    )
    assert small.chunk_size < big.chunk_size
    assert small.estimate.memory <= big.estimate.memory * 0.6
    _, var = small.execute()
    assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL


def test_progress_bar(capsys):
    case, _, J_ref = zoo_reference("mlp")
    cov = make_cov("diag", case.fm)
    var_ref, *_ = references(case, J_ref, cov)
    _, var = pf.functional_variance(case.fm, case.x, cov, strategy="reverse", progress=True)
    assert rel_err(var.reshape(var_ref.shape), var_ref) < TOL
    assert "reverse rows" in capsys.readouterr().err


# -- differentiable ------------------------------------------------------------------------
@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("strategy", ["explicit", "reverse", "forward", "last_layer"])
@pytest.mark.parametrize("kind", ["variance", "covariance", "joint"])
def test_gradcheck_wrt_inputs_parameters_and_covariance(strategy, kind):
    from functools import partial

    from torch.autograd import gradcheck

    gradcheck = partial(gradcheck, fast_mode=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    params = "last_layer" if strategy == "last_layer" else "trainable"
    fm = pf.FunctionalModel(model, params=params)
    x = torch.randn(3, 3, dtype=D, requires_grad=True)
    variances = torch.rand(fm.num_params, dtype=D, requires_grad=True)

    def run(x_, v_):
        if kind == "variance":
            f, out = pf.functional_variance(
                fm, x_, Diagonal(v_), strategy=strategy, differentiable=True
            )
        else:
            f, out = pf.functional_covariance(
                fm, x_, Diagonal(v_), joint=kind == "joint", strategy=strategy, differentiable=True
            )
        return f, out

    assert gradcheck(run, (x, variances))
    weight = model[0].weight  # a backbone parameter: the Jacobian depends on it
    assert gradcheck(lambda w: run(x.detach(), variances.detach())[1] + 0 * w.sum(), (weight,))
    f, var = run(x, variances)
    assert f.requires_grad and var.requires_grad
    f, var = pf.functional_variance(fm, x, Diagonal(variances), strategy=strategy)
    assert not var.requires_grad  # differentiable=False detaches
