"""The per-call check that examples do not interact, where the plan needs it.

A signature's first call always runs :meth:`FunctionalModel.check_examples`. Later calls that
reuse a cached plan run it only before a strategy that evaluates several examples together: a
plan whose chunks hold one example each computes every example by itself, so another example's
values cannot reach its results (its answer is the per-example one, which is what the check
protects)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pushforward as pf
from pushforward.core.functional_model import FunctionalModel

D = torch.float64


class ScaledByBatchMax(nn.Module):
    """Couples examples once a batch's largest input passes a threshold: below it, every
    example's output is its own (the first calls pass the check); above it, each output is
    divided by the batch's largest input (an example's answer depends on the others)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        big = x.abs().amax()
        scale = torch.where(big > 10, big, torch.ones_like(big))
        return self.body(x) / scale


def _model() -> FunctionalModel:
    torch.manual_seed(0)
    return pf.FunctionalModel(ScaledByBatchMax().double().eval())


def _per_example(fm: FunctionalModel, x: torch.Tensor, cov) -> torch.Tensor:
    """Each example's variance with the example alone (the reverse strategy's answer)."""
    return torch.cat([pf.functional_variance(fm, x[i : i + 1], cov)[1] for i in range(len(x))])


def _count_checks(fm: FunctionalModel, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = FunctionalModel.check_examples

    def counted(self, inputs):
        calls.append(inputs.batch_size)
        return original(self, inputs)

    monkeypatch.setattr(FunctionalModel, "check_examples", counted)
    return calls


def test_plans_of_one_example_per_chunk_skip_the_later_checks_and_stay_per_example(
    monkeypatch,
) -> None:
    fm = _model()
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    calm = torch.randn(2, 3, dtype=D)
    calls = _count_checks(fm, monkeypatch)
    options = {"strategy": "structured", "chunk_size": 2}  # 2 rows: one example per chunk
    pf.functional_variance(fm, calm, cov, **options)
    assert calls == [2]  # the first call is checked
    plan = pf.plan(fm, calm, cov, **options)
    assert plan.estimate.alone
    wild = calm.clone()
    wild[1, 0] = 50.0  # the batch's maximum now scales every other example
    calls.clear()
    f, var = pf.functional_variance(fm, wild, cov, **options)
    assert calls == []  # the cached plan evaluates every example by itself
    torch.testing.assert_close(var, _per_example(fm, wild, cov), rtol=1e-12, atol=0)
    alone = torch.cat([fm(wild[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(f, alone, rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", ["forward", "explicit", "structured"])
def test_plans_evaluating_examples_together_check_every_call(strategy, monkeypatch) -> None:
    fm = _model()
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    calm = torch.randn(2, 3, dtype=D)
    pf.functional_variance(fm, calm, cov, strategy=strategy)
    if strategy == "structured":
        assert not pf.plan(fm, calm, cov, strategy=strategy).estimate.alone
    wild = calm.clone()
    wild[1, 0] = 50.0
    with pytest.raises(pf.BatchCouplingError, match="depends on the other examples"):
        pf.functional_variance(fm, wild, cov, strategy=strategy)


def test_a_fallback_that_evaluates_examples_together_checks_first(monkeypatch) -> None:
    """The chosen plan evaluates examples alone but fails at run time; the strategy it falls
    through to runs the whole batch, so the skipped check runs before it."""
    from pushforward.engine.strategies import structured

    fm = _model()
    cov = pf.Diagonal(torch.full((fm.num_params,), 0.1, dtype=D))
    calm = torch.randn(2, 3, dtype=D)
    with pf.settings(chunk_target=1):  # the smallest chunks: one example each
        plan = pf.plan(fm, calm, cov)
        assert plan.name == "structured" and plan.estimate.alone
        pf.functional_variance(fm, calm, cov)

        def broken(self, problem, estimate):
            raise RuntimeError("vmap: an operation without a batching rule")

        monkeypatch.setattr(structured.StructuredStrategy, "run", broken)
        wild = calm.clone()
        wild[1, 0] = 50.0
        with pytest.raises(pf.BatchCouplingError, match="depends on the other examples"):
            pf.functional_variance(fm, wild, cov)


def test_a_curvature_pass_checks_the_examples_of_every_batch_against_its_own_forward() -> None:
    """A data pass checks each later batch's probes against the outputs of its own forward:
    a batch whose examples interact is refused, also when the first batch's did not."""
    from torch.utils.data import DataLoader, TensorDataset

    from pushforward.curvature import GGN

    fm = _model()
    calm = torch.randn(4, 3, dtype=D)
    wild = calm.clone()
    wild[1, 0] = 50.0
    y = torch.tensor([0, 1, 0, 1])
    data = DataLoader(TensorDataset(torch.cat([calm, wild]), torch.cat([y, y])), batch_size=4)
    GGN(fm, [(calm, y)], "classification").diagonal()  # the first batch passes
    with pytest.raises(pf.BatchCouplingError, match="depends on the other examples"):
        GGN(fm, data, "classification").diagonal()
