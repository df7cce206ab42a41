"""``python examples/laplace_lora.py --tiny``: the Laplace-LoRA job runs end to end, with no
fallback warning, and writes its table (accuracy, NLL, ECE, Brier per method and test set), the
reliability diagram and the step timings."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")
pytest.importorskip("laplace")
pytest.importorskip("matplotlib")

from laplace_lora import COLUMNS, EVAL_SPLITS, METHODS, README_END, README_START, main

import pushforward as pf


def test_tiny_laplace_lora_writes_the_table(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pf.PushforwardFallbackWarning)
            readme = tmp_path / "README.md"
            readme.write_text(f"# intro\n\n{README_START}\nold\n{README_END}\n\n# after\n")
            result = main(["--tiny", "--out", str(tmp_path), "--readme", str(readme)])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["table"] == result["table"]
    table = payload["table"]
    assert list(table) == [m[0] for m in METHODS]
    for method, per_split in table.items():
        assert list(per_split) == list(EVAL_SPLITS), method
        for split, values in per_split.items():
            assert all(math.isfinite(values[c]) for c in COLUMNS), (method, split)
            assert 0 <= values["accuracy"] <= 1 and 0 <= values["ECE"] <= 1
            assert 0 <= values["Brier"] <= 2 and values["NLL"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| method | split | accuracy | NLL | ECE | Brier |" in md
    assert md.count("| MAP | test_") == len(EVAL_SPLITS)
    text = readme.read_text()  # the README's block is the same table, between its markers
    assert "old" not in text and text.startswith("# intro") and text.endswith("# after\n")
    assert "| method | split | accuracy | NLL | ECE | Brier |" in text.split(README_START)[1]
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = {s["step"] for s in payload["steps"]}
    assert any(s.startswith("fit: GGN K-FAC") for s in steps)
    assert any(s.startswith("laplace-torch: KronLaplace.fit") for s in steps)
    for s in payload["steps"]:
        assert s["seconds"] >= 0 and s["peak_MB_above_start"] >= 0
    # the same posterior through laplace-torch's GLM predictive and pushforward's
    assert payload["laplace_torch"]["max_abs_diff_same_posterior"] < 1e-5
    for per_split in payload["entropy"].values():
        assert all(math.isfinite(v) for s in per_split.values() for v in s.values())
