"""``python examples/bo_hartmann.py --tiny``: the BO loop runs end to end and writes its plot
and numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("botorch")
pytest.importorskip("laplace")
pytest.importorskip("matplotlib")

from bo_hartmann import METHODS, TINY, main


def test_tiny_bo_loop_writes_plot_and_results(tmp_path: Path) -> None:
    out = tmp_path / "bo"
    assert main(["--tiny", "--out", str(out)]) == 0
    assert (out / "bo_hartmann.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "results.json").read_text())
    assert payload["tiny"] and len(payload["runs"]) == TINY.seeds == 1
    assert set(payload["runs"][0]) == set(METHODS)
    n = TINY.n_init + TINY.iterations * TINY.q
    first = None
    for method, r in payload["runs"][0].items():
        assert len(r["values"]) == len(r["best"]) == n, method
        assert all(b <= c for b, c in zip(r["best"], r["best"][1:], strict=False)), method
        assert r["best"][-1] == max(r["values"])
        # every method starts from the same initial points
        first = first or r["values"][: TINY.n_init]
        assert r["values"][: TINY.n_init] == first
