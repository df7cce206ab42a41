"""``examples/bo_loops.py``: both loops run end to end from the same initial points (tiny
sizes, in this process), one run goes through the fresh-process driver, and the table is
written."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("botorch")
pytest.importorskip("laplace_bayesopt")

from bo_loops import ACQUISITIONS, LOOPS, TINY, run, run_in_process, table


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as the driver's worker (LaplaceBoTorch's noise)
    yield
    torch.set_default_dtype(old)


def test_tiny_loops_and_table(one_thread) -> None:
    runs = [run(loop, kind, 0, TINY) for kind in ACQUISITIONS for loop in LOOPS]
    evaluations = dict(TINY.evaluations)
    for r in runs:
        assert len(r["values"]) == TINY.n_init + evaluations[r["acquisition"]]
        assert r["best"] == min(r["values"])
        assert r["seconds"] >= r["fit_seconds"] > 0
    for kind in ACQUISITIONS:  # the same initial design on both sides
        first = [r["values"][: TINY.n_init] for r in runs if r["acquisition"] == kind]
        assert first[0] == first[1]
    text = table(runs, dict(TINY.refit_every))
    assert text.count("| mean / total |") == len(ACQUISITIONS)


def test_fresh_process_driver() -> None:
    args = argparse.Namespace(threads=1, tiny=True, evaluations=2)
    r = run_in_process("refit-every-k", "ei", 0, args)
    assert len(r["values"]) == TINY.n_init + 2
    assert r["process_seconds"] >= r["seconds"] and r["peak_rss_bytes"] > 0
