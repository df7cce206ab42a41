"""The benchmark harness: subprocess runs, limits, error records, reports, selection, CLI.

The cases below are registered when this file is imported — by pytest here, and by each
worker process, which loads this file by path (``Options.modules``). They need no laplace.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from harness import (
    Context,
    Options,
    load_cases,
    register,
    run_benchmarks,
    run_case,
    select,
)
from harness.cli import main
from harness.report import markdown

THIS_FILE = str(Path(__file__).resolve())
ALLOCATED = 64 * 2**20


@register(
    "harness-test/allocate", workload="harness-test", method="allocate 64 MiB", library="test"
)
def _allocate(ctx: Context):
    ctx.info["B"] = 1
    return lambda: torch.ones(ALLOCATED // 4)


@register("harness-test/fail", workload="harness-test", method="raise", library="test")
def _fail(ctx: Context):
    def run():
        raise ValueError("boom")

    return run


@register(
    "harness-test/hog", workload="harness-test", method="allocate until stopped", library="test"
)
def _hog(ctx: Context):
    def run():
        chunks = []
        for _ in range(64):  # stops at 2 GiB if nobody kills it
            chunks.append(torch.ones(8 * 2**20))
            time.sleep(0.02)
        return chunks

    return run


@register("harness-test/sleep", workload="harness-test", method="sleep", library="test")
def _sleep(ctx: Context):
    return lambda: time.sleep(60)


def _case(case_id: str):
    return load_cases()[case_id]


def test_allocation_past_the_memory_limit_is_recorded_as_out_of_memory():
    options = Options(repeats=1, memory_limit_bytes=700 * 10**6, modules=(THIS_FILE,))
    result = run_case(_case("harness-test/hog"), options)
    assert result["status"] == "oom"
    assert result["message"] == "out of memory (> 700.0 MB) in warm-up 1"
    assert result["observed_max_rss_bytes"] > 700 * 10**6
    assert result["observed_max_rss_bytes"] < 2 * 10**9


def test_call_past_the_time_limit_is_recorded_as_timeout():
    result = run_case(_case("harness-test/sleep"), Options(time_limit_s=2, modules=(THIS_FILE,)))
    assert result["status"] == "timeout"
    assert result["message"] == "timeout (> 2 s) in warm-up 1"
    assert result["wall_s"] < 30


def test_cases_run_in_subprocesses_record_measurements_or_failures_and_write_reports(
    tmp_path: Path,
):
    cases = [_case(f"harness-test/{name}") for name in ("allocate", "fail")]
    options = Options(repeats=2, warmup=1, modules=(THIS_FILE,))
    lines: list[str] = []
    results = run_benchmarks(
        cases, options, tmp_path, command="pushforward bench x", echo=lines.append
    )

    ok, failed = results
    assert ok["status"] == "ok", ok.get("log_tail")
    assert len(ok["times_s"]) == 2 and len(ok["warmup_calls"]) == 1
    assert ok["time_median_s"] > 0 and ok["info"] == {"B": 1}
    assert ok["calls"][0]["rss_before_bytes"] == ok["rss_baseline_bytes"]
    assert 0.9 * ALLOCATED <= ok["peak_above_baseline_bytes"] < 4 * ALLOCATED
    assert ok["peak_rss_bytes"] >= ok["rss_baseline_bytes"] + 0.9 * ALLOCATED
    assert failed["status"] == "error"
    assert failed["message"] == "ValueError: boom (in warm-up 1)"
    assert "raise ValueError" in failed["traceback"]
    assert len(lines) == 2 and "ValueError: boom" in lines[1]

    payload = json.loads((tmp_path / "results.json").read_text())
    assert [r["id"] for r in payload["results"]] == [c.id for c in cases]
    assert payload["machine"]["torch"] == torch.__version__
    assert payload["machine"]["cores"] == os.cpu_count()
    assert payload["options"]["repeats"] == 2 and payload["command"] == "pushforward bench x"
    assert payload["finished"]
    text = (tmp_path / "results.md").read_text()
    assert text == markdown(payload)
    assert "| `allocate` | allocate 64 MiB |" in text
    assert "| `fail` | raise | ValueError: boom (in warm-up 1) | — | — |" in text
    assert "`pushforward bench x`" in text
    assert (tmp_path / "results.png").stat().st_size > 0


def test_sweep_results_become_a_method_by_batch_table():
    def result(case_id: str, batch: int, status: str = "ok") -> dict:
        r = {"id": case_id, "workload": "sweep", "method": "m", "library": "lib", "batch": batch}
        r |= {"status": status, "message": "", "info": {"arch": "MLP", "K": 10, "P": 1234}}
        if status == "ok":
            r |= {
                "time_median_s": 0.5,
                "peak_above_baseline_bytes": 2 * 10**9,
                "peak_rss_bytes": 3 * 10**9,
            }
        return r

    payload = {
        "machine": {"cpu": "cpu", "cores": 2, "ram_bytes": 10**9, "os": "os", "python": "3"},
        "options": {
            "quick": False,
            "repeats": 3,
            "warmup": 1,
            "device": "cpu",
            "time_limit_s": 60.0,
        },
        "results": [result("sweep/a/B=8", 8), result("sweep/a/B=16", 16, "oom")],
    }
    payload["machine"] |= {"torch": "t", "torch_threads": 2, "packages": {}, "date": "d"}
    payload["options"]["memory_limit_bytes"] = 18 * 10**9
    text = markdown(payload)
    assert "| case | B=8 | B=16 |" in text
    assert "| `a` | 0.5 s, +2.0 GB | out of memory (> 18.0 GB) |" in text
    assert "Measured sizes: MLP, K=10, P=1,234." in text


def test_selection_by_tag_glob_and_id():
    cases = load_cases()
    assert {c.id for c in select(cases, ["harness-test"])} >= {
        "harness-test/allocate",
        "harness-test/fail",
    }
    assert [c.id for c in select(cases, ["harness-test/a*"])] == ["harness-test/allocate"]
    assert all(c.library == "laplace-torch" for c in select(cases, ["laplace-torch"]))
    assert len(select(cases, [])) == len(cases)
    with pytest.raises(ValueError, match="no benchmark case matches"):
        select(cases, ["no-such-case"])
    with pytest.raises(ValueError, match="registered twice"):
        register("harness-test/allocate", workload="x", method="x", library="x")(_allocate)


def test_cli_lists_the_built_in_cases(capsys: pytest.CaptureFixture[str]):
    assert main(["--list", "w1-diag"]) == 0
    out = capsys.readouterr().out
    assert "w1-diag/laplace-default" in out and "w1-diag/vjp-loop" in out
    assert "w1-kron" not in out
    assert main(["--list", "nothing-matches"]) == 2
