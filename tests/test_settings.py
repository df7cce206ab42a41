"""``pushforward.settings``: the tunables, scoped to a block, shown by ``print(plan)``."""

from __future__ import annotations

import threading

import pytest
from conftest import rel_err, zoo_reference
from test_variance import make_cov

import pushforward as pf


def test_settings_scope_and_defaults():
    base = pf.settings.current()
    assert base.chunk_target == 128 * 2**20 and base.plan_cache == 64
    with pf.settings(chunk_target="1MB", traffic=2) as inner:
        assert inner is pf.settings.current()
        assert inner.chunk_target == 10**6 and inner.traffic == 2.0
        with pf.settings(budget_fraction=0.25):
            assert pf.settings.current().chunk_target == 10**6  # nested blocks combine
            assert pf.settings.current().budget_fraction == 0.25
        assert pf.settings.current().budget_fraction == base.budget_fraction
    assert pf.settings.current() == base
    seen = []
    with pf.settings(plan_cache=3):  # another thread sees the process default
        t = threading.Thread(target=lambda: seen.append(pf.settings.current().plan_cache))
        t.start()
        t.join()
    assert seen == [base.plan_cache]


def test_set_default_and_decorator():
    old = pf.settings.current()
    try:
        pf.settings.set_default(traffic=3.0)
        assert pf.settings.current().traffic == 3.0

        @pf.settings(traffic=5.0)
        def inside():
            return pf.settings.current().traffic

        assert inside() == 5.0 and pf.settings.current().traffic == 3.0
    finally:
        pf.settings.set_default(traffic=old.traffic)


def test_settings_are_validated():
    with pytest.raises(TypeError, match="unknown settings"):
        pf.settings(chunk_size=3)
    with pytest.raises(ValueError, match="cannot read chunk_target"):
        pf.settings(chunk_target="lots")
    with pytest.raises(ValueError, match="budget_fraction"):
        pf.settings(budget_fraction=1.5)
    with pytest.raises(ValueError, match="plan_cache"):
        pf.settings(plan_cache=-1)
    with pytest.raises(ValueError, match="traffic"):
        pf.settings(traffic=float("nan"))
    for flag in ("replay", "settle_heap"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            pf.settings(**{flag: 1})


def test_chunk_target_bounds_chunks_and_shows_in_the_plan():
    case, _, _ = zoo_reference("cnn_batchnorm_eval")
    cov = make_cov("diag", case.fm)
    big = pf.plan(case.fm, case.x, cov, strategy="reverse")
    with pf.settings(chunk_target=20_000):
        small = pf.plan(case.fm, case.x, cov, strategy="reverse")
        text = str(small)
    assert small.chunk_size < big.chunk_size
    assert "chunk target 20.0 KB" in text and "chunks up to 20.0 KB" in text
    assert rel_err(small.execute()[1], big.execute()[1]) < 1e-12


def test_plan_cache_setting():
    case, _, _ = zoo_reference("mlp")
    fm = pf.FunctionalModel(case.fm.module)
    cov = make_cov("diag", fm)
    with pf.settings(plan_cache=0):
        pf.functional_variance(fm, case.x, cov)
        assert len(fm.cache.plans) == 0
    pf.functional_variance(fm, case.x, cov)
    pf.functional_variance(fm, case.x, cov)
    assert len(fm.cache.plans) == 1
    with pf.settings(traffic=1.0):  # other settings: another plan
        pf.functional_variance(fm, case.x, cov)
    assert len(fm.cache.plans) == 2


def test_default_budget_follows_the_fraction():
    case, _, _ = zoo_reference("mlp")
    cov = make_cov("diag", case.fm)
    with pf.settings(budget_fraction=0.5):
        half = pf.plan(case.fm, case.x, cov).problem.budget.total
    with pf.settings(budget_fraction=0.1):
        tenth = pf.plan(case.fm, case.x, cov).problem.budget.total
    assert 3 < half / tenth < 7  # the available memory moves a little between the two reads
