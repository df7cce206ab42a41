"""Consecutive batches run together (``CurvaturePass.joined``, on GPUs): the diagonal, K-FAC and
the dense curvature equal those of the batches run one by one, on the CPU with the device rule
forced (float64, the zoo with tensor, tuple and mapping inputs); batches of another signature,
Monte Carlo rows and a small memory budget keep batches apart; the plan describes the joined
batch."""

from __future__ import annotations

import pytest
import torch
from test_curvature import CASES, ce_targets, split

from pushforward.curvature import GGN
from pushforward.curvature import passes as passes_module


@pytest.fixture
def joined(monkeypatch) -> list[int]:
    """Forces the GPU's rule on the CPU; records the examples of every batch a pass runs."""
    sizes: list[int] = []
    original = passes_module.CurvaturePass.run_batch

    def counted(self, batch, consumer, rows=None):
        sizes.append(batch.inputs.batch_size)
        return original(self, batch, consumer, rows)

    monkeypatch.setattr(passes_module, "joins_batches", lambda device: True)
    monkeypatch.setattr(passes_module.CurvaturePass, "run_batch", counted)
    return sizes


def _data(name: str):
    fm, x = CASES[name]()
    y = ce_targets(fm(x))
    batches = split(x, y, 1) if len(y) < 4 else split(x, y, 2)
    first, rest = batches
    # three batches: the last split again (joined as one batch of the whole data)
    more = split(*rest, 1) if len(rest[1]) > 1 else [rest]
    return fm, [first, *more], len(y)


@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm_eval", "dict_input", "gpt2_lora"])
@pytest.mark.parametrize("what", ["diagonal", "kfac", "dense"])
def test_joined_batches_give_the_same_curvature(name, what, joined):
    fm, data, N = _data(name)
    together = getattr(GGN(fm, data), what)()
    assert joined == [N]  # every batch joined into one
    forced = passes_module.joins_batches
    try:
        passes_module.joins_batches = lambda device: False
        apart = getattr(GGN(fm, data), what)()
    finally:
        passes_module.joins_batches = forced
    assert joined[1:] == [len(b[1]) for b in data]  # one by one
    a = together.to_dense() if what == "kfac" else together
    b = apart.to_dense() if what == "kfac" else apart
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_other_signatures_monte_carlo_and_small_budgets_stay_apart(joined):
    fm, x = CASES["mlp"]()
    y = ce_targets(fm(x))
    data = [(x, y), (torch.cat([x, x]), torch.cat([y, y]))]  # the same signature: joinable
    GGN(fm, data).diagonal()
    assert joined == [3 * len(y)]
    joined.clear()
    GGN(fm, data, mc_samples=2).diagonal()  # rows drawn per batch: never joined
    assert joined == [len(y), 2 * len(y)]
    joined.clear()
    plan = GGN(fm, data).plan("diagonal")
    per_example = plan.rows * plan.per_row + plan.per_example
    GGN(fm, data, memory_budget=plan.held + per_example * len(y)).diagonal()
    assert joined == [len(y), 2 * len(y)]  # the second batch's rows do not fit beside the first
    joined.clear()
    other = torch.nn.Sequential(torch.nn.Flatten(), fm.module)
    images = [(x.reshape(len(y), 1, -1), y), (x, y)]  # another input signature: apart
    GGN(other, images).diagonal()
    assert joined == [len(y), len(y)]


def test_the_plan_describes_the_joined_batch(joined):
    fm, data, N = _data("mlp")
    plan = GGN(fm, data).plan("diagonal")
    assert plan.examples == N
    assert f"batches of {N:,} examples" in str(plan)


@pytest.mark.parametrize("what", ["diagonal", "kfac"])
def test_a_joined_pass_stays_within_its_plan(what, joined):
    from test_cost_passes import _check, _ggn

    ggn = _ggn("wide_custom")
    plan = ggn.plan(what)
    assert plan.examples == 96  # the two batches of 48, joined
    _check(f"joined {what}\n{plan}", plan.memory, getattr(ggn, what))
