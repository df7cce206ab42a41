"""Regression tests of the second reliability audit: the functional model, the covariance
operators and the forward-mode products.

* batch coupling that the first two examples do not show (a normalisation by the batch maximum
  held by example 0, a branch on a batch statistic on which examples 0 and 1 agree, a depth
  chosen from the batch maximum), on the first call and on later calls of an input signature;
* a module instance used twice in an ``nn.Sequential`` is restored exactly (its parameters stay
  the same ``nn.Parameter`` objects);
* building a :class:`FunctionalModel` while another thread runs the library on the module;
* ``batched_jvp`` keeps its memory budget, the tangents' finiteness check included;
* cached square roots follow in-place changes of the defining tensors (also after pickling);
* inputs the model cannot take, outputs that do not lead with the batch dimension, inputs the
  model changes in place, and half-precision operators give the library's own messages.
"""

from __future__ import annotations

import copy
import pickle
import random
import re
import threading

import pytest
import torch
from torch import nn

import pushforward as pf
from pushforward.covariance import Marginal, PrecisionUpdate
from pushforward.curvature import GGN
from pushforward.testing import check_covariance_operator, peak_memory

D = torch.float64


def _mlp(width: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))


# -- 4. batch coupling that examples 0 and 1 do not reveal --------------------------------------
class MaxNormalised(nn.Module):
    """Hidden units divided by the batch maximum (held by example 0 in the tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) * (1 + x.abs().max())


class BranchOnAll(nn.Module):
    """One of two heads, chosen by whether every example of the batch has x[:, 0] > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) if bool((x[:, 0] > 0).all()) else self.c(h)


class DepthFromMax(nn.Module):
    """The hidden layer applied as many times as the batch maximum says."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.h, self.b = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        for _ in range(int(x.abs().max())):
            h = torch.tanh(self.h(h))
        return self.b(h)


def _coupled_batch(kind: str) -> torch.Tensor:
    """A batch on which the coupling shows, but not between examples 0 and 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, generator=g, dtype=D) * 0.5 + 0.1
    if kind == "branch":
        x[5, 0] = -0.3  # examples 0 and 1 (alone or together) take the other branch
    else:
        x[0] = 2.5  # example 0 holds the batch maximum
    return x


COUPLED = {"max": MaxNormalised, "branch": BranchOnAll, "depth": DepthFromMax}


@pytest.mark.parametrize("kind", sorted(COUPLED))
def test_coupling_hidden_from_examples_0_and_1_is_refused(kind):
    torch.manual_seed(0)
    fm = pf.FunctionalModel(COUPLED[kind]().double().eval())
    x = _coupled_batch(kind)
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    calls = {
        "functional_variance": lambda: pf.functional_variance(fm, x, cov),
        "jvp": lambda: pf.jvp(fm, x, torch.ones(fm.num_params, dtype=D)),
        "jacobian": lambda: pf.jacobian(fm, x),
    }
    for name, call in calls.items():
        with pytest.raises(pf.BatchCouplingError, match="depends on the other examples"):
            call()
        assert not fm.cache.independence, name


@pytest.mark.parametrize("kind", ["branch", "depth"])
def test_coupling_that_appears_at_a_later_call_is_refused(kind):
    """The first batch of a signature shows no coupling; a later one of the same shape does."""
    torch.manual_seed(0)
    fm = pf.FunctionalModel(COUPLED[kind]().double().eval())
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # uniform batches: every example alone takes the batch's branch/depth
        pf.functional_variance(fm, torch.rand(8, 3, generator=g, dtype=D) * 0.5 + 0.1, cov)
    with pytest.raises(pf.BatchCouplingError, match="depends on the other examples"):
        pf.functional_variance(fm, _coupled_batch(kind), cov)


def test_non_finite_outputs_of_independent_examples_are_not_coupling():
    class Log(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(torch.log(x))

    fm = pf.FunctionalModel(Log().double())
    x = torch.rand(6, 3, dtype=D) + 0.1
    x[2, 0] = -1.0  # example 2's output is NaN, alone or in the batch
    f, _ = pf.jacobian(fm, x)
    assert f[2].isnan().all() and not f[[0, 1, 3, 4, 5]].isnan().any()


def test_the_example_check_leaves_no_random_state_behind():
    fm = pf.FunctionalModel(_mlp().double().eval())
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    x = torch.randn(6, 3, dtype=D)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    for _ in range(3):
        pf.functional_variance(fm, x, cov)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


# -- 6. a module instance used twice ---------------------------------------------------------------
def _shared_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 2)
    ).double()


def _library_calls(fm, x):
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    y = torch.randint(0, 2, (x.shape[0],))
    return {
        "functional_variance": lambda: pf.functional_variance(fm, x, cov)[1],
        "functional_variance reverse": lambda: pf.functional_variance(
            fm, x, cov, strategy="reverse"
        )[1],
        "jvp": lambda: pf.jvp(fm, x, torch.ones(fm.num_params, dtype=D))[1],
        "per_example_vjp": lambda: pf.per_example_vjp(fm, x, torch.ones(x.shape[0], 2, dtype=D))[1],
        "jacobian": lambda: pf.jacobian(fm, x)[1],
        "GGN diagonal": lambda: GGN(fm, [(x, y)], "classification").diagonal(),
        "GGN kfac": lambda: GGN(fm, [(x, y)], "classification").kfac().to_dense(),
    }


@pytest.mark.usefixtures("quiet_fallbacks")
def test_a_module_used_twice_is_restored_exactly():
    model = _shared_layer_model().eval()
    x = torch.randn(5, 3, dtype=D)
    fm = pf.FunctionalModel(model)
    _, J = pf.testing.brute_force_jacobian(fm, x)
    want = pf.jacobian(fm, x)[1]
    assert torch.allclose(want, J, atol=1e-12)
    for name, call in _library_calls(fm, x).items():
        before = dict(model.named_parameters())
        call()
        after = dict(model.named_parameters())
        assert after.keys() == before.keys(), name
        for n, p in after.items():
            assert p is before[n] and isinstance(p, nn.Parameter), (name, n, type(p))
        assert model[2].weight is model[4].weight, name
        copy.deepcopy(model)  # "Cannot access storage of TensorWrapper" before the fix
        model.zero_grad()
        model(x).square().sum().backward()
        assert model[2].weight.grad is not None and model[2].weight.grad.abs().sum() > 0, name


# -- 8. building a FunctionalModel while another thread runs the library --------------------------
def test_construction_while_another_thread_runs_the_library():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 512), nn.Tanh(), nn.Linear(512, 512), nn.Linear(512, 2))
    model = model.double().eval()
    fm = pf.FunctionalModel(model)
    x = torch.randn(256, 3, dtype=D)
    v = torch.ones(fm.num_params, dtype=D)
    stop, errors, runs = threading.Event(), [], [0]

    def busy():  # the module's parameters are swapped while its forward runs
        try:
            while not stop.is_set():
                pf.jvp(fm, x, v)
                runs[0] += 1
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        for _ in range(2000):
            other = pf.FunctionalModel(model)
            assert other.param_names == fm.param_names
            assert all(isinstance(p, nn.Parameter) for p in other.params().values())
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert runs[0] > 0


# -- 10. batched_jvp keeps its memory budget ---------------------------------------------------
def test_batched_jvp_keeps_the_budget_with_many_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 700), nn.Tanh(), nn.Linear(700, 20)).eval()
    fm = pf.FunctionalModel(model)
    assert fm.num_params > 700_000
    x = torch.randn(2, 1000)
    V = torch.randn(50, fm.num_params)  # 143 MB of tangents, held by the caller
    want = pf.batched_jvp(fm, x, V[:4], memory_budget="1GB")[1]
    for budget in (20 * 2**20, 50 * 2**20, 200 * 2**20):
        (_, JV), peak = peak_memory(lambda b=budget: pf.batched_jvp(fm, x, V, memory_budget=b))
        assert peak <= budget, (budget, peak)
        assert torch.allclose(JV[:4], want, rtol=1e-5, atol=1e-5)
    bad = V.clone()
    bad[37, 123_456] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pf.batched_jvp(fm, x, bad, memory_budget=20 * 2**20)


def test_the_finiteness_check_is_exact_without_a_full_size_temporary():
    from pushforward.covariance.checks import all_finite

    big = torch.full((3, 70_000), 3e38)  # finite entries whose sum overflows
    assert all_finite(big) and all_finite(big[:, ::7]) and all_finite(big[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[2, 69_999] = bad
        assert not all_finite(t) and not all_finite(t.T) and all_finite(t[:2])
    V = torch.randn(40, 100_000)
    _, peak = peak_memory(lambda: all_finite(V[:, 1:].reshape(40, 99_999)))
    assert peak < 1024


# -- 14. cached square roots follow in-place changes --------------------------------------------
def _operators():
    """``name -> (operator, the defining tensor to change in place)`` (float64, P = 6)."""
    g = torch.Generator().manual_seed(3)

    def spd(n):
        A = torch.randn(n, n, generator=g, dtype=D)
        return A @ A.T + n * torch.eye(n, dtype=D)

    def U():
        return torch.randn(6, 2, generator=g, dtype=D)

    def positive(n):
        return torch.rand(n, generator=g, dtype=D) + 0.5

    def update(base):
        return PrecisionUpdate(base, torch.randn(2, 6, generator=g, dtype=D), positive(2))

    return {
        "Dense": (pf.Dense(spd(6)), lambda op: op._matrix),
        "Dense factor": (pf.Dense(factor=spd(6)), lambda op: op._factor),
        "Diagonal": (pf.Diagonal(positive(6)), lambda op: op._var),
        "LowRank": (pf.LowRank(U(), positive(2), positive(6)), lambda op: op.U),
        "LowRank eigvals": (pf.LowRank(U(), positive(2)), lambda op: op.eigvals),
        "LowRankPrecision": (
            pf.LowRankPrecision(U(), positive(2), positive(6)),
            lambda op: op.diag,
        ),
        "LowRankPrecision U": (pf.LowRankPrecision(U(), positive(2), positive(6)), lambda op: op.U),
        "KroneckerFactors": (pf.KroneckerFactors(spd(2), spd(3)), lambda op: op.in_factor),
        "Kronecker": (pf.Kronecker([(spd(2), spd(3))]), lambda op: op._blocks[0].out_factor),
        "PrecisionUpdate": (update(pf.Dense(spd(6))), lambda op: op.rows),
        "PrecisionUpdate base": (update(pf.Dense(spd(6))), lambda op: op.base._matrix),
        "Marginal": (
            Marginal(pf.Dense(spd(6)), torch.tensor([4, 0, 2])),
            lambda op: op.parent._matrix,
        ),
    }


def _products(op) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    V = torch.randn(3, op.num_params, generator=g, dtype=D)
    Z = torch.randn(3, op.sqrt_cols, generator=g, dtype=D)
    return [
        op.matmul_rows(V),
        op.sqrt_rows(Z),
        op.sqrt_t_rows(V),
        op.quadratic_rows(V),
        op.diagonal(),
        op.to_dense(),
        op.sqrt_dense(),
    ]


@pytest.mark.parametrize("name", sorted(_operators()))
@pytest.mark.parametrize("when", ["in memory", "after pickling", "changed, then pickled"])
def test_cached_products_follow_in_place_changes(name, when):
    op, target = _operators()[name]
    if when == "after pickling":
        op = pickle.loads(pickle.dumps(op))
    _products(op)  # caches the square root (and whatever else the operator keeps)
    with torch.no_grad():
        target(op).mul_(1.5)
    if when == "changed, then pickled":
        op = pickle.loads(pickle.dumps(op))
    fresh = op._apply(torch.clone)  # a new operator (new caches) of the changed tensors
    for got, want in zip(_products(op), _products(fresh), strict=True):
        assert torch.equal(got, want)
    check_covariance_operator(op, fresh.to_dense())


# -- inputs the model cannot take ------------------------------------------------------------
def _api_calls(fm, x):
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=fm.dtype))
    B = x.shape[0]
    return {
        "functional_variance": lambda: pf.functional_variance(fm, x, cov),
        "functional_covariance": lambda: pf.functional_covariance(fm, x, cov),
        "functional_samples": lambda: pf.functional_samples(fm, x, cov, 4),
        "predictive": lambda: pf.predictive(fm, x, cov, link="probit"),
        "jvp": lambda: pf.jvp(fm, x, torch.zeros(fm.num_params, dtype=fm.dtype)),
        "per_example_vjp": lambda: pf.per_example_vjp(fm, x, torch.ones(B, 2, dtype=fm.dtype)),
        "jacobian": lambda: pf.jacobian(fm, x),
        "GGN": lambda: GGN(
            fm, [(x, torch.zeros(B, dtype=torch.long))], "classification"
        ).diagonal(),
    }


@pytest.mark.parametrize(
    ("model_dtype", "x", "kind", "names"),
    [
        (torch.float32, torch.randn(5, 3, dtype=D), TypeError, ["float64", "float32"]),
        (torch.float64, torch.randn(5, 3), TypeError, ["float32", "float64"]),
        (torch.float16, torch.randn(5, 3), TypeError, ["float32", "float16"]),
        (torch.float32, torch.randint(0, 3, (5, 3)), TypeError, ["int64", "float32"]),
        (torch.float32, torch.randn(5, 4), RuntimeError, [r"\(5, 4\)", "3 features"]),
    ],
    ids=["f64 data", "f32 data", "half model", "integer data", "wrong width"],
)
def test_inputs_the_model_cannot_take_are_named(model_dtype, x, kind, names):
    """A dtype mismatch is a TypeError; other failures keep torch's type. Either names the
    inputs' shapes and dtypes and what the model takes, with torch's error chained."""
    fm = pf.FunctionalModel(_mlp().to(model_dtype).eval())
    for name, call in _api_calls(fm, x).items():
        with pytest.raises(kind) as err:
            call()
        text = str(err.value)
        assert "the model cannot run on these inputs" in text, (name, text)
        for want in names:
            assert re.search(want, text), (name, want, text)
        assert err.value.__cause__ is not None, name


def test_a_model_error_that_is_not_about_the_inputs_keeps_its_type():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            raise KeyError("from the model")

    with pytest.raises(KeyError, match="from the model"):
        pf.jacobian(pf.FunctionalModel(Failing()), torch.randn(2, 3))


class SequenceFirst(nn.Module):
    """Inputs (B, T, 3), outputs (T, B, 2): the batch is not the outputs' first dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x).transpose(0, 1)


class ChangesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x.mul_(2.0))


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        (SequenceFirst, (4, 4, 3), r"output for one example has shape \(4, 1, 2\)"),
        (ChangesItsInput, (5, 3), r"changes its inputs in place \(args\[0\]\)"),
    ],
)
def test_outputs_not_batch_first_and_inputs_changed_in_place_are_named(model, shape, message):
    """Both used to read as random draws (the probe's two runs differed): every entry point now
    names the problem."""
    torch.manual_seed(0)
    fm = pf.FunctionalModel(model().eval())
    for call in _api_calls(fm, torch.randn(*shape)).values():
        with pytest.raises(ValueError, match=message):
            call()


# -- half precision operators ------------------------------------------------------------------
def _half_operators(dtype):
    g = torch.Generator().manual_seed(5)

    def spd(n):
        A = torch.randn(n, n, generator=g)
        return (A @ A.T / n + torch.eye(n)).to(dtype)

    U = torch.randn(6, 2, generator=g).to(dtype)
    ones = torch.ones(6, dtype=dtype)
    return {
        "Dense": pf.Dense(spd(6)),
        "Dense singular": pf.Dense(torch.diag(torch.tensor([1.0, 2, 0, 1, 1, 3])).to(dtype)),
        "KroneckerFactors": pf.KroneckerFactors(spd(2), spd(3)),
        "Kronecker": pf.Kronecker([(spd(2), spd(3))]),
        "LowRankPrecision": pf.LowRankPrecision(U, torch.ones(2, dtype=dtype), ones),
        "PrecisionUpdate": PrecisionUpdate(pf.Dense(spd(6)), U.T.contiguous(), ones[:2]),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_operators_factorize_in_single_precision(dtype):
    for name, op in _half_operators(dtype).items():
        assert op.dtype == dtype, name
        L = op.sqrt_dense()
        assert L.dtype == dtype, name
        dense = op.to_dense().double()
        err = ((L.double() @ L.double().T - dense).abs().max() / dense.abs().max()).item()
        assert err < 5 * torch.finfo(dtype).eps * 6, (name, err)
        single = op.to(torch.float32)
        assert torch.allclose(op.diagonal().float(), single.diagonal(), rtol=0.05, atol=0.05)
