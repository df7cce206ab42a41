"""What real clients and bad input hit (issue 13): failed strategies fall through, branching
models, non-PSD covariances, leaked state, attention masks, randomness and coupling, the Laplace
bridge's limits, input validation. Each test fails on the code before the fix."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
import torch
from conftest import rel_err, zoo_reference
from test_variance import make_cov, references
from torch import nn

import pushforward as pf
from pushforward.covariance import Dense, Diagonal, Kronecker, LowRank
from pushforward.laplace_interop import restore
from pushforward.testing import brute_force_jacobian

D = torch.float64
TOL = 1e-10


def _exact(fm, x, cov, *, strategy="auto", kind="variance", tol=TOL):
    """``functional_variance/covariance`` under ``strategy`` equals brute force."""
    _, J = brute_force_jacobian(fm, x)
    var_ref, cov_ref, joint_ref, _ = references(type("Case", (), {"fm": fm, "x": x}), J, cov)
    if kind == "variance":
        _, got = pf.functional_variance(fm, x, cov, strategy=strategy)
        want = var_ref
    else:
        _, got = pf.functional_covariance(fm, x, cov, strategy=strategy, joint=kind == "joint")
        want = joint_ref if kind == "joint" else cov_ref
    assert rel_err(got.reshape(want.shape), want) < tol, (strategy, kind)


# -- 1. a strategy failing at run time falls through under auto ------------------------------
def test_backpack_hooked_model_is_exact():
    """A model fitted with laplace-torch's BackPackGGN keeps BackPACK's full backward hooks
    (old-style autograd Functions, which torch.func's vjp refuses): every route is exact."""
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2)).double()
    X, y = torch.randn(10, 3, dtype=D), torch.randn(10, 2, dtype=D)
    la = laplace.DiagLaplace(model, "regression", backend=BackPackGGN)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5))
    fm, cov = pf.from_laplace(la)
    _, J = brute_force_jacobian(fm, X)
    want = torch.einsum("bkp,p,bkp->bk", J, cov.diagonal(), J)
    for strategy in ("auto", "structured", "reverse", "forward", "explicit"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pf.PushforwardFallbackWarning)
            _, var = pf.functional_variance(fm, X, cov, strategy=strategy)
        assert rel_err(var, want) < TOL, strategy
        for w in caught:  # a fallback, if any, says what failed
            if issubclass(w.category, pf.PushforwardFallbackWarning):
                assert "fell back" in str(w.message) or "exact" in str(w.message)
    _, f_var = pf.glm_predictive(la, X, diagonal_output=True)
    assert rel_err(f_var, want) < TOL


def test_failing_strategy_falls_through_to_the_next(monkeypatch):
    """Under auto, a strategy that fails at run time with a transform error gives way to the next
    in the plan's order, with one warning that print(plan) agrees with; a named one raises."""
    from pushforward.engine.strategies import STRATEGIES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 2)).double()
    X = torch.randn(10, 3, dtype=D)
    fm = pf.FunctionalModel(model)
    cov = Diagonal(torch.rand(fm.num_params, dtype=D) + 0.1)
    assert pf.plan(fm, X, cov).estimate.strategy == "structured"
    structured = STRATEGIES["structured"]

    def broken(problem, estimate):
        raise RuntimeError("an old-style autograd.Function cannot run under torch.func")

    monkeypatch.setattr(structured, "run", broken)
    with pytest.warns(pf.PushforwardFallbackWarning, match="strategy 'structured' failed"):
        _, var = pf.functional_variance(fm, X, cov)
    _, J = brute_force_jacobian(fm, X)
    want = torch.einsum("bkp,p,bkp->bk", J, cov.diagonal(), J)
    assert rel_err(var, want) < TOL
    assert "failed at run time: structured" in str(pf.plan(fm, X, cov))
    with warnings.catch_warnings():  # remembered: no second failure, no second warning
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        _, again = pf.functional_variance(fm, X, cov)
    assert rel_err(again, want) < TOL
    with pytest.raises(RuntimeError, match="old-style"):  # a named strategy still raises
        pf.functional_variance(pf.FunctionalModel(model), X, cov, strategy="structured")


# -- 3. attention masks keep GPT-2 and Llama on the fast path ----------------------------------
def _lm(name: str) -> nn.Module:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=1,
            n_embd=8,
            n_head=2,
            vocab_size=13,
            n_positions=8,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg).double().eval()
    cfg = transformers.LlamaConfig(
        vocab_size=13,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("strategy", ["structured", "reverse", "forward", "explicit"])
def test_padded_attention_masks_stay_on_the_fast_path(name, strategy):
    # the posterior over the attention weights: the Jacobian goes through the masked attention
    attention = {"gpt2": "transformer.h.0.attn", "llama": "model.layers.0.self_attn"}[name]
    fm = pf.FunctionalModel(_lm(name), params=[attention])
    ids = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0  # real padding in some examples, none in others
    mask[2, 4:] = 0
    # Llama's RMSNorm computes in float32 even in a float64 model: forward mode rounds there
    tol = 1e-6 if name == "llama" and strategy in ("forward", "explicit") else TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        _exact(
            fm,
            {"input_ids": ids, "attention_mask": mask},
            make_cov("diag", fm),
            strategy=strategy,
            tol=tol,
        )


# -- 4/5. joint covariances: the covariance applied once per row; the planner's choice --------
def test_joint_reverse_multiplies_each_row_once(monkeypatch):
    case, _, _ = zoo_reference("mlp")
    cov = make_cov("kron", case.fm).bind(case.fm.layout)
    calls = []
    for cls in {type(group.operator) for group in cov.param_groups()}:
        inner = cls.sqrt_t_rows
        monkeypatch.setattr(
            cls,
            "sqrt_t_rows",
            lambda self, V, inner=inner: calls.append(len(V)) or inner(self, V),
        )
    pf.functional_covariance(case.fm, case.x, cov, joint=True, strategy="reverse", chunk_size=2)
    rows = case.x.shape[0] * 3
    assert sum(calls) == rows * len(cov.param_groups())  # each row once per parameter group
    _exact(case.fm, case.x, cov, strategy="reverse", kind="joint")


def test_planner_prefers_structured_for_joint_layer_covariances():
    case, _, _ = zoo_reference("mlp")
    for kind in ("diag", "kron"):
        plan = pf.plan(case.fm, case.x, make_cov(kind, case.fm), kind="joint")
        assert plan.name == "structured", str(plan)


# -- 6. repeated calls reuse the plan: no planning, tracing or measuring --------------------
def test_repeated_calls_skip_planning(monkeypatch):
    import pushforward.core.cost as cost
    import pushforward.engine.strategies.structured as structured
    import pushforward.layers.structure as layer_structure

    case, _, _ = zoo_reference("mlp")
    fm = pf.FunctionalModel(case.fm.module)
    cov = make_cov("kron", fm)
    counts = {"measure": 0, "analyze": 0, "estimate": 0}
    measure, analyze = cost._measure, layer_structure.analyze
    estimate = structured.StructuredStrategy.estimate

    def count(key, fn):
        def wrapped(*a, **k):
            counts[key] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(cost, "_measure", count("measure", measure))
    monkeypatch.setattr(layer_structure, "analyze", count("analyze", analyze))
    monkeypatch.setattr(structured.StructuredStrategy, "estimate", count("estimate", estimate))
    first = pf.functional_variance(fm, case.x, cov)
    # auto estimates each strategy once (structured twice: as itself and as last_layer's check
    # shares its trace), measures the model once and traces it once
    assert counts["measure"] == 1 and counts["analyze"] == 1
    before = dict(counts)
    second = pf.functional_variance(fm, case.x + 1, cov)
    assert counts == before  # the cached plan ran: nothing planned, traced or measured again
    _, var = pf.functional_variance(pf.FunctionalModel(case.fm.module), case.x + 1, cov)
    assert rel_err(second[1], var) < TOL and not torch.equal(first[1], second[1])


def test_plan_cache_follows_in_place_changes_of_the_covariance():
    case, _, _ = zoo_reference("mlp")
    v = torch.rand(case.fm.num_params, dtype=D) + 0.1
    cov = Diagonal(v)
    _, a = pf.functional_variance(case.fm, case.x, cov)
    v.mul_(2)  # the same operator, new values
    _, b = pf.functional_variance(case.fm, case.x, cov)
    assert rel_err(b, 2 * a) < TOL


# -- 7. data-dependent control flow: every example proves the structure ------------------------
class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        outs = []
        for row in x:  # an example-dependent branch after the head
            z = self.l2(torch.tanh(self.l1(row[None])))
            outs.append(z if row.sum() > 0 else 2 * z)
        return torch.cat(outs)


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("strategy", ["auto", "structured", "reverse"])
def test_branching_models_are_exact(strategy):
    torch.manual_seed(0)
    fm = pf.FunctionalModel(Branching().double())
    x = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.5, 0.2, 0.1]], dtype=D)
    for kind in ("diag", "kron"):
        try:
            _exact(fm, x, make_cov(kind, fm), strategy=strategy)
        except pf.PushforwardFallbackWarning:  # pragma: no cover - quiet_fallbacks ignores them
            raise


def test_branch_after_the_head_in_one_batched_forward():
    """The one-forward last-layer path proves, per call, that the output is the head's."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            z = self.head(torch.tanh(self.body(x)))
            return z if x.sum() > 0 else 2 * z

    torch.manual_seed(0)
    fm = pf.FunctionalModel(Scaled().double(), params=["head"])
    cov = make_cov("diag", fm)
    positive = torch.ones(2, 3, dtype=D)
    assert pf.plan(fm, positive, cov).name == "last_layer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pf.PushforwardFallbackWarning)
        _exact(fm, -positive, cov)  # traced on the positive branch, called on the other


# -- 8. covariances that are not positive semi-definite are refused ---------------------------
def test_non_psd_covariances_are_refused_at_construction():
    with pytest.raises(ValueError, match="not positive semi-definite: smallest eigenvalue -1"):
        Dense(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=D))
    B = torch.tensor([[0.1, 0.5], [0.5, 0.1]], dtype=D)  # diagonal >= 0.1, indefinite
    with pytest.raises(ValueError, match="out_factor is not positive semi-definite"):
        Kronecker({"w": (B, torch.eye(3, dtype=D))})
    unchecked = Dense(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=D), check=False)
    assert unchecked.num_params == 2  # check=False skips the factorization (documented)


# -- 9. accelerate changes only the object it is given ------------------------------------------
def test_accelerate_changes_only_its_object():
    laplace = pytest.importorskip("laplace")
    from laplace.baselaplace import BaseLaplace
    from laplace.laplace import _all_subclasses

    model = nn.Sequential(nn.Linear(2, 3)).double()
    la = laplace.Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag")
    pf.accelerate(la)
    keys = {}
    for cls in _all_subclasses(BaseLaplace):
        if hasattr(cls, "_key"):
            keys.setdefault(cls._key, []).append(cls)
    clash = {k: v for k, v in keys.items() if len(v) > 1}
    assert not clash, clash  # the factory's key -> class map is unambiguous
    for _ in range(10):
        fresh = laplace.Laplace(
            model, "regression", subset_of_weights="all", hessian_structure="diag"
        )
        assert type(fresh) is type(la)._laplace_class
    restore(la)


# -- 10. two threads on one model ---------------------------------------------------------------
def test_two_threads_on_one_model():
    case, _, _ = zoo_reference("gpt2_tiny")
    fm, x = case.fm, case.x
    cov = make_cov("diag", fm)
    _, want = pf.functional_variance(fm, x, cov)
    params = {n: p for n, p in fm.module.named_parameters()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    errors, results = [], []

    def work():
        try:
            for _ in range(4):
                results.append(pf.functional_variance(fm, x, cov, strategy="reverse")[1])
                results.append(pf.functional_variance(fm, x, cov, strategy="forward")[1])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(rel_err(r, want) < TOL for r in results)
    after = dict(fm.module.named_parameters())
    assert all(after[n] is p and isinstance(p, nn.Parameter) for n, p in params.items())
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


# -- 11. randomness and coupling the module scan cannot see ----------------------------------
def test_functional_dropout_is_refused():
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return torch.nn.functional.dropout(self.a(x), 0.5, training=True)

    fm = pf.FunctionalModel(Drop().double())
    with pytest.raises(pf.BatchCouplingError, match="random"):
        pf.functional_variance(fm, torch.randn(4, 3, dtype=D), make_cov("diag", fm))


def test_examples_mixed_without_batchnorm_are_refused():
    class Centered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            return h - h.mean(0)

    fm = pf.FunctionalModel(Centered().double())
    for strategy in ("auto", "reverse", "forward"):
        with pytest.raises(pf.BatchCouplingError, match="depends on the other examples"):
            pf.functional_variance(
                fm, torch.randn(4, 3, dtype=D), make_cov("diag", fm), strategy=strategy
            )


# -- 12. the budget counts what operators allocate -------------------------------------------
def test_lowrank_temporaries_are_counted():
    from pushforward.testing import peak_memory

    case, _, _ = zoo_reference("cnn_batchnorm_eval")
    P = case.fm.num_params
    g = torch.Generator().manual_seed(0)
    cov = LowRank(torch.randn(P, 60, generator=g, dtype=D), torch.rand(60, generator=g, dtype=D))
    plan = pf.plan(case.fm, case.x, cov)
    budget = plan.estimate.memory
    _, peak = peak_memory(plan.execute)
    assert peak <= budget * 1.1 + 32 * 1024


# -- 13. the Laplace bridge stays a distribution ------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_laplace_bridge_limits(dtype):
    from pushforward.api.predictive import _bridge

    mu = torch.tensor([[1.0, 2.0, 0.5]], dtype=dtype)
    zero = _bridge(mu, torch.zeros(1, 3, 3, dtype=dtype), normalize=False)
    assert torch.allclose(zero, mu.softmax(-1))
    huge = _bridge(mu, 1e19 * torch.eye(3, dtype=dtype)[None], normalize=False)
    for probs in (huge, _bridge(mu, 1e19 * torch.eye(3, dtype=dtype)[None], normalize=True)):
        assert torch.isfinite(probs).all() and torch.allclose(
            probs.sum(-1), torch.ones(1, dtype=dtype)
        )
    singular = torch.tensor([[[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=dtype)
    probs = _bridge(mu, singular, normalize=False)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(1, dtype=dtype))


# -- 14/15. bad input: clear errors ---------------------------------------------------------
def test_integer_arguments_are_validated():
    case, _, _ = zoo_reference("mlp")
    fm, x = case.fm, case.x
    V = torch.zeros(3, fm.num_params, dtype=D)
    for bad, error in ((-1, ValueError), (0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="chunk_size must be a positive integer"):
            pf.batched_jvp(fm, x, V, chunk_size=bad)
        with pytest.raises(error, match="chunk_size must be a positive integer"):
            pf.functional_variance(fm, x, make_cov("diag", fm), chunk_size=bad)
    with pytest.raises(ValueError, match="output_dims must be an integer"):
        pf.FunctionalModel(fm.module, output_dims=1.5)
    with pytest.raises(TypeError, match="params must be"):
        pf.FunctionalModel(fm.module, params=123)
    with pytest.raises(ValueError, match="one dimension cannot say which is the batch"):
        pf.functional_variance(fm, torch.randn(4, dtype=D), make_cov("diag", fm))
    with pytest.raises(ValueError, match="selects no output"):
        pf.functional_variance(
            fm, x, make_cov("diag", fm), outputs=torch.zeros(5, 0, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        pf.functional_samples(fm, x, make_cov("diag", fm), 0)


def test_empty_batch_is_a_clear_error():
    case, _, _ = zoo_reference("mlp")
    empty = torch.zeros(0, 4, dtype=D)
    cov = make_cov("diag", case.fm)
    for call in (
        lambda: pf.functional_variance(case.fm, empty, cov),
        lambda: pf.functional_covariance(case.fm, empty, cov, strategy="reverse"),
        lambda: pf.jacobian(case.fm, empty),
        lambda: pf.per_example_vjp(case.fm, empty, torch.zeros(0, 3, dtype=D)),
        lambda: pf.functional_samples(case.fm, empty, cov, 3),
    ):
        with pytest.raises(ValueError, match="empty batch"):
            call()
