"""The standalone curvature operators (GGN, empirical Fisher) against brute force, float64.

The reference is a plain autograd Jacobian of every output entry (``zoo.brute_force_jacobian``)
contracted with the loss Hessian (or gradient) written out; K-FAC is compared with curvlinops'
``KFACLinearOperator``, the low-rank eigenpairs with a dense ``eigh``.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo import FACTORIES, brute_force_jacobian, make_case

import pushforward as pf
from pushforward.curvature import GGN, CrossEntropy, EmpiricalFisher, Gaussian, OutputHessian

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DT = torch.float64
EXACT = 1e-10


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def ce_targets(f: Tensor, seed: int = 0, ignore: bool = True) -> Tensor:
    """Class targets for outputs ``(B, ..., K)``; with positions, some ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, f.shape[-1], f.shape[:-1], generator=g)
    if ignore and y.dim() > 1:
        y[0, 0] = -100
        y[-1, -1] = -100
    return y


def reference(fm, x, y, likelihood: str, kind: str = "ggn", jacobian=None) -> Tensor:
    """The dense curvature from the brute-force Jacobian ``(B, n, K, P)``."""
    f, J = brute_force_jacobian(fm, x) if jacobian is None else jacobian
    B, P = f.shape[0], J.shape[-1]
    K = math.prod(f.shape[f.dim() - fm.output_dims :])
    f, J = f.reshape(B, -1, K), J.reshape(B, -1, K, P)
    if likelihood == "classification":
        mask = (y.reshape(B, -1) != -100).to(DT)
        p = f.softmax(-1)
        if kind == "ef":
            g = (p - F.one_hot(y.reshape(B, -1).clamp_min(0), K)) * mask[..., None]
            rows = torch.einsum("bnkp,bnk->bp", J, g)
            return rows.T @ rows
        L = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) * mask[..., None, None]
        return torch.einsum("bnkp,bnkl,bnlq->pq", J, L, J)
    if kind == "ef":
        rows = torch.einsum("bnkp,bnk->bp", J, f - y.reshape(f.shape))
        return rows.T @ rows
    return torch.einsum("bnkp,bnkq->pq", J, J)


def gpt2_lora():
    """GPT-2 from a config (1 block), every weight frozen, LoRA (peft) on ``c_attn``; token
    outputs (B, T, V)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    config = LoraConfig(
        r=2,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(GPT2LMHeadModel(cfg).eval(), config).to(DT).eval()
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    return pf.FunctionalModel(model), {"input_ids": ids}


def _zoo(name: str):
    case = make_case(name)
    return case.fm, case.x


#: Every zoo model (the regression one is below) and GPT-2 with LoRA.
CASES = {
    **{name: partial(_zoo, name) for name in FACTORIES if name != "multi_output_regression"},
    "gpt2_lora": gpt2_lora,
}


def split(x, y, at: int):
    """Two batches of the data (tensor or mapping inputs)."""
    if isinstance(x, dict):  # non-tensor entries are static arguments, shared by both
        first = {k: v[:at] if isinstance(v, Tensor) else v for k, v in x.items()}
        second = {k: v[at:] if isinstance(v, Tensor) else v for k, v in x.items()}
        return [(first, y[:at]), (second, y[at:])]
    return [(x[:at], y[:at]), (x[at:], y[at:])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_classification_matches_brute_force(name, quiet_fallbacks):
    """GGN and empirical Fisher: diagonal, dense, products; token outputs with ignored targets."""
    fm, x = CASES[name]()
    jacobian = brute_force_jacobian(fm, x)
    f = jacobian[0]
    y = ce_targets(f)
    data = split(x, y, max(1, f.shape[0] // 2))
    V = torch.randn(fm.num_params, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    for kind, op_cls in (("ggn", GGN), ("ef", EmpiricalFisher)):
        H = reference(fm, x, y, "classification", kind, jacobian)
        op = op_cls(fm, data, CrossEntropy(ignore_index=-100))
        assert rel(op.diagonal(), H.diagonal()) <= EXACT, kind
        assert rel(op.dense(), H) <= EXACT, kind
        assert rel(op.matmat(V), H @ V) <= EXACT, kind
        assert rel(op @ V[:, 0], H @ V[:, 0]) <= EXACT, kind
        assert op.n_data == f.shape[0]


@pytest.mark.parametrize("name", ["mlp", "multi_output_regression", "frozen_backbone_adapter"])
def test_regression_matches_brute_force(name):
    case = make_case(name)
    jacobian = brute_force_jacobian(case.fm, case.x)
    f = jacobian[0]
    y = torch.randn(f.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    n = f.shape[0]
    v = torch.randn(case.fm.num_params, dtype=DT)
    for kind, op_cls in (("ggn", GGN), ("ef", EmpiricalFisher)):
        H = reference(case.fm, case.x, y, "regression", kind, jacobian)
        op = op_cls(case.fm, split(case.x, y, 1), "regression", reduction="mean")
        assert rel(op.diagonal() * n, H.diagonal()) <= EXACT
        assert rel(op.dense() * n, H) <= EXACT
        assert rel(op.matvec(v) * n, H @ v) <= EXACT


def test_output_hessian_callable_equals_cross_entropy():
    case = make_case("mlp")
    y = ce_targets(case.fm(case.x))

    def hessian(f, y):
        p = f.softmax(-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def nll(f, y):
        return F.cross_entropy(f, y, reduction="sum")

    custom = GGN(case.fm, [(case.x, y)], hessian)
    builtin = GGN(case.fm, [(case.x, y)], "classification")
    assert rel(custom.diagonal(), builtin.diagonal()) <= EXACT
    assert (
        rel(custom.matvec(torch.ones(case.fm.num_params, dtype=DT)), builtin.dense().sum(1))
        <= EXACT
    )
    ef = EmpiricalFisher(case.fm, [(case.x, y)], OutputHessian(hessian, nll))
    ref = EmpiricalFisher(case.fm, [(case.x, y)], "classification")
    assert rel(ef.diagonal(), ref.diagonal()) <= EXACT
    assert abs(ef.loss() - ref.loss()) <= EXACT * ref.loss()


def test_monte_carlo_diagonal_within_standard_errors():
    case = make_case("mlp")
    y = ce_targets(case.fm(case.x))
    exact = GGN(case.fm, [(case.x, y)]).diagonal()
    draws = torch.stack(
        [GGN(case.fm, [(case.x, y)], mc_samples=50, seed=s).diagonal() for s in range(12)]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all()
    # one seed is reproducible, another differs; the dense MC matrix has the same diagonal
    mc = GGN(case.fm, [(case.x, y)], mc_samples=50, seed=0)
    assert torch.equal(mc.diagonal(), draws[0])
    assert rel(mc.dense().diagonal(), draws[0]) <= EXACT
    assert rel(mc.matvec(torch.ones(case.fm.num_params, dtype=DT)), mc.dense().sum(1)) <= EXACT


@pytest.mark.parametrize("name", ["tied_embedding_lm", "gpt2_lora", "multi_output_regression"])
def test_monte_carlo_diagonal_of_tokens_and_regression(name, quiet_fallbacks):
    """Unbiased as well for token outputs with ignored targets (an ignored position draws no
    sample) and for the Gaussian; the bias of counting the ignored positions is detectable."""
    fm, x = CASES[name]() if name in CASES else _zoo(name)
    f = fm(x)
    if name == "multi_output_regression":
        likelihood = Gaussian()
        y = torch.randn(f.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    else:
        likelihood = CrossEntropy(ignore_index=-100)
        y = ce_targets(f)
    data = split(x, y, max(1, f.shape[0] // 2))
    exact = GGN(fm, data, likelihood).diagonal()
    draws = torch.stack(
        [GGN(fm, data, likelihood, mc_samples=50, seed=s).diagonal() for s in range(12)]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - exact).abs() <= 5 * se + 1e-12 * exact.abs().max()).all()
    if name != "multi_output_regression":
        unmasked = GGN(fm, [(x, y.clamp_min(0))], likelihood).diagonal()
        assert ((mean - unmasked).abs() > 5 * se + 1e-12 * exact.abs().max()).any()


def _curvlinops_dense(model, loss, data, approx):
    curvlinops = pytest.importorskip("curvlinops")
    op = curvlinops.KFACLinearOperator(
        model,
        loss,
        list(model.parameters()),
        data,
        fisher_type="type-2",
        kfac_approx=approx,
        check_deterministic=False,
    )
    return op @ torch.eye(op.shape[0], dtype=DT)


class Pooled(nn.Module):
    """Linear over positions, mean-pooled, then a head: weight sharing, one loss per example."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).mean(1))


def _kfac_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).to(DT)
    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    return {
        "mlp": (mlp, torch.randn(10, 5, generator=g, dtype=DT), "classification", (3,)),
        "cnn": (cnn, torch.randn(6, 2, 5, 5, generator=g, dtype=DT), "classification", (4,)),
        "sequence": (seq, torch.randn(6, 4, 5, generator=g, dtype=DT), "regression", (4, 3)),
        "pooled": (
            Pooled().to(DT),
            torch.randn(6, 4, 5, generator=g, dtype=DT),
            "classification",
            (3,),
        ),
    }


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "sequence", "pooled"])
def test_kfac_equals_curvlinops(name, approx):
    model, X, likelihood, out = _kfac_models()[name]
    if name == "sequence" and approx == "reduce":
        pytest.skip("per-position losses: curvlinops sums factor columns over positions (below)")
    g = torch.Generator().manual_seed(2)
    if likelihood == "classification":
        y = torch.randint(0, out[-1], (len(X),), generator=g)
        loss = nn.CrossEntropyLoss(reduction="sum")
        scale = 1.0
    else:
        y = torch.randn(len(X), *out, generator=g, dtype=DT)
        loss = nn.MSELoss(reduction="sum")
        scale = 2.0  # torch's squared error has Hessian 2 I, the unit Gaussian's I
    ref = _curvlinops_dense(model, loss, [(X, y)], approx)
    ours = GGN(model, split(X, y, 4), likelihood).kfac(approx).to_dense()
    assert rel(scale * ours, ref) <= 1e-8


def test_kfac_reduce_with_per_position_losses():
    """``reduce`` sums each factor row's output gradients over positions. With one loss per
    position the rows are per position (a factor of the exact GGN), so for a position-wise model
    the output factor equals ``expand``'s (curvlinops instead sums the columns of every
    position's factor into one backward pass, which adds cross-position terms), and the input
    factor is the mean input's ``1/N sum abar abar^T``."""
    model, X, _, out = _kfac_models()["sequence"]
    y = torch.randn(len(X), *out, dtype=DT)
    op = GGN(model, [(X, y)], "regression")
    reduce, expand = op.kfac("reduce"), op.kfac("expand")
    a = X.mean(1)
    assert rel(reduce.factors("0.weight").in_factor, a.T @ a / len(X)) <= EXACT
    for name in ("0.weight", "2.weight"):
        assert rel(reduce.factors(name).out_factor, expand.factors(name).out_factor) <= EXACT


def test_kfac_of_gpt2_lora_and_embeddings():
    fm, x = gpt2_lora()
    y = ce_targets(fm(x))
    kfac = GGN(fm, [(x, y)], CrossEntropy()).kfac()
    assert set(kfac.blocks) == set(fm.param_names)
    dense = kfac.to_dense()
    assert torch.allclose(dense, dense.T)
    # one example at one position: each K-FAC block is the exact GGN's block (embedding,
    # linear over positions, bias)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Linear(4, 5)).to(DT)
    ids, yy = torch.tensor([[3]]), torch.tensor([[2]])
    fm = pf.FunctionalModel(model)
    H = reference(fm, ids, yy, "classification")
    K = GGN(fm, [(ids, yy)]).kfac()
    for name in fm.param_names:
        block = fm.layout.slices[name]
        assert rel(K.block(name).to_dense(), H[block, block]) <= EXACT, name


def test_lowrank_eigenpairs_equal_dense():
    case = make_case("mlp")
    X = torch.randn(40, 4, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(5))
    op = GGN(case.fm, [(X[:20], y[:20]), (X[20:], y[20:])])
    lam, Q = torch.linalg.eigh(op.dense())
    lam, Q = lam.flip(0), Q.flip(1)
    k = 5
    for method, kwargs in (("lanczos", {"tol": 1e-10}), ("randomized", {"power_iterations": 20})):
        values, vectors = op.lowrank(k, method, **kwargs)
        assert values.shape == (k,) and vectors.shape == (case.fm.num_params, k)
        assert ((values - lam[:k]).abs() / lam[:k]).max() <= 1e-6
        # largest principal angle between the subspaces
        s = torch.linalg.svdvals(Q[:, :k].T @ vectors)
        assert torch.arccos(s.min().clamp(max=1.0)) <= 1e-4
    # exactly `iterations` Lanczos steps
    values, _ = op.lowrank(3, iterations=3)
    assert values.shape == (3,)


def test_posterior_feeds_the_pushforward():
    """Every posterior form is a covariance operator the rest of the library takes."""
    case = make_case("mlp")
    y = ce_targets(case.fm(case.x))
    op = GGN(case.fm, [(case.x, y)])
    _, J = brute_force_jacobian(case.fm, case.x)
    forms = {
        "diag": op.diagonal(),
        "full": op.dense(),
        "lowrank": op.lowrank(4),
        "kron": op.kfac(),
    }
    for name, curvature in forms.items():
        S = pf.curvature.laplace_posterior(curvature, 0.5, layout=op)
        f, var = pf.functional_variance(case.fm, case.x, S)
        ref = torch.einsum("bkp,pq,bkq->bk", J, S.to_dense(), J)
        assert rel(var, ref) <= EXACT, name
        probs = pf.predictive(case.fm, case.x, S, link="probit")
        assert probs.shape == f.shape


def test_log_marginal_likelihood_of_lowrank_is_the_dense_formula():
    case = make_case("mlp")
    y = ce_targets(case.fm(case.x))
    op = GGN(case.fm, [(case.x, y)])
    values, vectors = op.lowrank(4)
    H = vectors @ torch.diag(values) @ vectors.T
    delta = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ours = pf.curvature.log_marginal_likelihood(op, (values, vectors), delta)
    dense = pf.curvature.log_marginal_likelihood(op, H, delta)
    assert abs(ours - dense) <= EXACT * abs(dense)
    g1, g2 = (torch.autograd.grad(v, delta)[0] for v in (ours, dense))
    assert abs(g1 - g2) <= 1e-8 * abs(g2)


def test_gridsearch_picks_the_best_validation_likelihood():
    case = make_case("mlp")
    y = ce_targets(case.fm(case.x))
    op = GGN(case.fm, [(case.x, y)])
    diag = op.diagonal()
    grid = torch.logspace(-2, 2, 5, dtype=DT)
    val = [(case.x, y)]
    best = pf.curvature.optimize_prior_precision(
        op, diag, method="gridsearch", val_data=val, grid=grid
    )
    scores = []
    for d in grid:
        S = pf.curvature.laplace_posterior(diag, d)
        p = pf.predictive(case.fm, case.x, S, link="probit")
        scores.append(-p.gather(1, y[:, None]).log().mean())
    assert best == grid[int(torch.stack(scores).argmin())]


def test_marglik_optimizes_sigma_for_regression():
    case = make_case("mlp")
    f = case.fm(case.x)
    y = f + 0.3 * torch.randn(f.shape, dtype=DT, generator=torch.Generator().manual_seed(6))
    op = GGN(case.fm, [(case.x, y)], Gaussian())
    delta, sigma = pf.curvature.optimize_prior_precision(
        op, op.diagonal(), optimize_sigma=True, prior_structure="layerwise", n_steps=200
    )
    assert delta.shape == (len(case.fm.param_names),)
    lml = pf.curvature.log_marginal_likelihood
    best = lml(op, op.diagonal(), delta, sigma_noise=sigma)
    for factor in (0.8, 1.25):
        assert lml(op, op.diagonal(), delta, sigma_noise=sigma * factor) < best


def test_memory_budget_and_chunking_do_not_change_results():
    case = make_case("cnn_batchnorm_eval")
    y = ce_targets(case.fm(case.x))
    free = GGN(case.fm, [(case.x, y)])
    with pytest.raises(pf.MemoryBudgetError):
        GGN(case.fm, [(case.x, y)], memory_budget=10).diagonal()
    with pf.settings(chunk_target=20_000):  # a few rows per chunk
        tight = GGN(case.fm, [(case.x, y)])
        assert rel(tight.diagonal(), free.diagonal()) <= EXACT
        assert rel(tight.kfac().to_dense(), free.kfac().to_dense()) <= EXACT
        V = torch.randn(case.fm.num_params, 4, dtype=DT)
        assert rel(tight.matmat(V), free.matmat(V)) <= EXACT


def test_data_and_argument_errors():
    case = make_case("mlp")
    y = ce_targets(case.fm(case.x))
    with pytest.raises(TypeError, match="one-shot iterator"):
        GGN(case.fm, ((case.x, y) for _ in range(2)))
    with pytest.raises(TypeError, match="re-iterable"):
        GGN(case.fm, case.x)
    with pytest.raises(ValueError, match="reduction"):
        GGN(case.fm, [(case.x, y)], reduction="max")
    with pytest.raises(ValueError, match="likelihood"):
        GGN(case.fm, [(case.x, y)], "poisson")
    with pytest.raises(ValueError, match="mc_samples"):
        GGN(case.fm, [(case.x, y)], mc_samples=0)
    with pytest.raises(ValueError, match="targets"):
        GGN(case.fm, [(case.x, y[:2])]).diagonal()
    per_parameter = torch.full((case.fm.num_params,), 2.0, dtype=DT)
    with pytest.raises(ValueError, match="K-FAC posterior"):
        pf.curvature.laplace_posterior(GGN(case.fm, [(case.x, y)]).kfac(), per_parameter)
    # mapping batches with the targets under "labels" (keyword inputs, a static flag)
    dict_case = make_case("dict_input")
    yd = ce_targets(dict_case.fm(dict_case.x))
    mapped = GGN(dict_case.fm, [{**dict_case.x, "labels": yd}])
    pairs = GGN(dict_case.fm, [(dict_case.x, yd)])
    assert rel(mapped.diagonal(), pairs.diagonal()) <= EXACT
    assert mapped.n_data == len(yd)


class Skips(nn.Module):
    """A layer that only some examples run (data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)

    def forward(self, x):
        z = self.l2(torch.tanh(self.l1(x)))
        return self.l3(z) if x.sum() > 0 else z


def test_examples_that_leave_the_traced_layers():
    """The layer analysis is traced on the first batch's first example (which runs ``l3``); the
    second batch's examples skip it. The diagonal gives every parameter's per-example rows for
    those (exact, with a warning); K-FAC, whose blocks are the layers', refuses. (The branch
    reads a batch-wide sum: within each batch every example takes the branch it takes alone, so
    the examples are independent, as the batch-coupling check confirms.)"""
    torch.manual_seed(0)
    model = Skips().to(DT)
    x = torch.randn(4, 3, dtype=DT).abs() + 0.1
    x[2:] = -x[2:]
    fm = pf.FunctionalModel(model)
    y = torch.tensor([0, 1, 1, 0])
    H = sum(reference(fm, x[i : i + 1], y[i : i + 1], "classification") for i in range(4))
    op = GGN(fm, [(x[:2], y[:2]), (x[2:], y[2:])])
    with pytest.warns(pf.PushforwardFallbackWarning, match="every parameter"):
        assert rel(op.diagonal(), H.diagonal()) <= EXACT
    with pytest.raises(RuntimeError, match="needs every example to run the traced layers"):
        op.kfac()


def test_structure_cached_across_operators_and_updates():
    """The layer structure is traced once per model and input signature (kept in the model's
    cache) and holds no parameter values: after an in-place update of every weight — the frozen
    head weight included — a new operator on the same model gives the new parameters' exact
    diagonal. The model's output is its last linear layer's (the backward passes start at that
    head's input, from the factor's rows times its weight)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    fm = pf.FunctionalModel(model, params=lambda name, p: name != "2.weight")  # head bias only
    x = torch.randn(5, 4, dtype=DT)
    y = torch.tensor([0, 1, 2, 1, 0])
    first = GGN(fm, [(x, y)]).diagonal()
    assert rel(first, reference(fm, x, y, "classification").diagonal()) <= EXACT
    traced = len(fm.cache.structures)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.1)
    again = GGN(fm, [(x, y)]).diagonal()
    assert len(fm.cache.structures) == traced
    assert rel(again, reference(fm, x, y, "classification").diagonal()) <= EXACT
    assert rel(again, first) > 1e-3
