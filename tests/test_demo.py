"""``python examples/demo.py --quick``: it writes the picture, the table and the numbers, and the numbers
say what the picture should show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("laplace")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from demo import METHODS, STRUCTURES, main


def test_quick_demo_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0

    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table.count("| regression |") == table.count("| two moons |") == 2 * len(METHODS)
    assert table.splitlines()[-1] in capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert results["quick"]
    for structure in STRUCTURES:
        fit = results["fits"][f"regression/{structure}"]
        assert fit["sd_gap"] > fit["sd_data"], (structure, fit)
    kron = results["fits"]["regression/kron"]
    assert kron["sd_gap"] > 2 * kron["sd_data"]

    rows = results["comparison"]
    assert len(rows) == 2 * len(STRUCTURES) * len(METHODS)
    for row in rows:
        assert row["time_median_s"] > 0
        assert row["peak_above_baseline_bytes"] >= 0
        if row["method"] != "pushforward":
            assert row["max_abs_diff"] < 1e-4, row
