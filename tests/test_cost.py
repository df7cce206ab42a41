"""The cost model keeps its promise: what a call allocates (PyTorch's allocator, measured by
``pushforward.testing.peak_memory``) stays within its estimate, and under ``memory_budget``."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, zoo_reference
from test_variance import make_cov, references

import pushforward as pf
from pushforward.testing import peak_memory

#: measured peak <= MARGIN * estimate + SLACK (allocator rounding, small bookkeeping tensors)
MARGIN, SLACK = 1.1, 32 * 1024

STRATEGIES = ["structured", "reverse", "forward", "explicit", "monte_carlo"]
CASES = [
    (model, cov, kind)
    for model in ("mlp", "cnn_batchnorm_eval", "gpt2_tiny", "tied_embedding_lm")
    for cov in ("diag", "kron", "lowrank")
    for kind in ("variance", "joint")
]


def _plans(case, cov, kind, **kw):
    for strategy in STRATEGIES:
        try:
            yield pf.plan(case.fm, case.x, cov, kind=kind, strategy=strategy, **kw)
        except ValueError:  # the strategy does not apply to this problem
            continue


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(("model", "cov_kind", "kind"), CASES)
def test_measured_peak_within_the_estimate(model, cov_kind, kind):
    case, _, _ = zoo_reference(model)
    cov = make_cov(cov_kind, case.fm)
    for plan in _plans(case, cov, kind):
        plan.execute()  # one-time work (factorizations cached on the operator) done
        _, peak = peak_memory(plan.execute)
        assert peak <= MARGIN * plan.estimate.memory + SLACK, (plan.name, peak, str(plan))


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(("model", "cov_kind"), [("mlp", "kron"), ("cnn_batchnorm_eval", "diag")])
@pytest.mark.parametrize("kind", ["variance", "covariance", "joint"])
def test_a_small_budget_is_kept_and_changes_nothing(model, cov_kind, kind):
    case, _, J_ref = zoo_reference(model)
    cov = make_cov(cov_kind, case.fm)
    var_ref, cov_ref, joint_ref, _ = references(case, J_ref, cov)
    want = {"variance": var_ref, "covariance": cov_ref, "joint": joint_ref}[kind]
    ran = []
    for big in _plans(case, cov, kind):
        if not big.estimate.exact:
            continue
        budget = int(big.estimate.memory * 0.5)
        try:
            small = pf.plan(
                case.fm, case.x, cov, kind=kind, strategy=big.name, memory_budget=budget
            )
        except pf.MemoryBudgetError as err:
            assert err.need > budget and err.budget == budget
            continue
        (_, got), peak = peak_memory(small.execute)
        assert peak <= budget + SLACK, (small.name, peak, budget)
        assert rel_err(got.reshape(want.shape), want) < 1e-10, small.name
        ran.append(small.name)
    assert ran  # at least one strategy ran in chunks under half its unchunked need


def test_products_keep_the_budget():
    case, f_ref, _ = zoo_reference("cnn_batchnorm_eval")
    fm, x = case.fm, case.x
    V = torch.randn(40, fm.num_params, dtype=torch.float64)
    cov, kron = make_cov("lowrank", fm), make_cov("kron", fm)
    ran = []
    for name, call in {
        "batched_jvp": lambda budget: pf.batched_jvp(fm, x, V, memory_budget=budget),
        "jacobian": lambda budget: pf.jacobian(fm, x, memory_budget=budget),
        "per_example_vjp": lambda budget: pf.per_example_vjp(
            fm, x, torch.ones_like(f_ref), memory_budget=budget
        ),
        "functional_samples": lambda budget: pf.functional_samples(
            fm, x, cov, 40, memory_budget=budget, generator=torch.Generator().manual_seed(0)
        ),
        "functional_samples_kron": lambda budget: pf.functional_samples(
            fm, x, kron, 40, memory_budget=budget, generator=torch.Generator().manual_seed(0)
        ),
    }.items():
        full, _ = peak_memory(lambda call=call: call("1GB"))
        _, unchunked = peak_memory(lambda call=call: call("1GB"))
        budget = max(int(unchunked * 0.6), 1)
        try:
            part, peak = peak_memory(lambda call=call, budget=budget: call(budget))
        except pf.MemoryBudgetError:
            continue
        assert peak <= budget + SLACK, (name, peak, budget)
        full_t = full[1] if isinstance(full, tuple) else full
        part_t = part[1] if isinstance(part, tuple) else part
        assert rel_err(part_t, full_t) < 1e-12, name
        ran.append(name)
    assert len(ran) >= 3, ran


def test_over_budget_is_one_error_type_everywhere():
    case, _, _ = zoo_reference("mlp")
    cov = make_cov("diag", case.fm)
    calls = [
        lambda: pf.functional_variance(case.fm, case.x, cov, memory_budget=64),
        lambda: pf.functional_variance(case.fm, case.x, cov, strategy="reverse", memory_budget=64),
        lambda: pf.functional_samples(case.fm, case.x, cov, 10, memory_budget=64),
        lambda: pf.batched_jvp(
            case.fm,
            case.x,
            torch.zeros(3, case.fm.num_params, dtype=torch.float64),
            memory_budget=64,
        ),
        lambda: pf.jacobian(case.fm, case.x, memory_budget=64),
    ]
    for call in calls:
        with pytest.raises(pf.MemoryBudgetError, match="memory budget of 64 B") as err:
            call()
        assert isinstance(err.value, ValueError) and err.value.need > 64


def test_attention_flops_take_grouped_query_heads() -> None:
    """The fused attention kernels' FLOPs: PyTorch's count where it has one (as many key/value
    heads as query heads), and grouped-query attention (fewer key/value heads; some PyTorch
    versions' own formula raises on it) counted as its repeated-heads equivalent."""
    from torch.utils.flop_counter import sdpa_flop_count

    from pushforward.core.cost import _ATTENTION_FORMULAS, _attention_flops

    assert _ATTENTION_FORMULAS  # the kernels of this PyTorch version are covered
    q, k, v = (2, 8, 16, 32), (2, 8, 24, 32), (2, 8, 24, 64)
    assert _attention_flops(q, k, v) == sdpa_flop_count(q, k, v)
    grouped = _attention_flops(q, (2, 2, 24, 32), (2, 2, 24, 64))
    assert grouped == sdpa_flop_count(q, k, v)
