"""Run laplace-torch's own test suite against the installed laplace-torch three ways: unmodified
(``baseline``), with ``accelerate(la)`` on every Laplace object (``accelerate``), and with
``PushforwardGGN``/``PushforwardEF`` in place of ``CurvlinopsGGN``/``CurvlinopsEF``
(``backends``); print passed/failed/skipped per module and mode, and every failure of a
pushforward mode with its classification (see ``expected.py``).

The suite is not vendored: it is read at run time from a Laplace checkout or git directory::

    git clone https://github.com/aleximmer/Laplace /tmp/Laplace     # on a networked machine
    python tools/laplace_suite/run.py --git-dir /tmp/Laplace/.git --ref <commit or tag>
    python tools/laplace_suite/run.py --tests /tmp/Laplace             # a checkout (its tests/)
    python tools/laplace_suite/run.py --clone --ref <tag>              # git clone --depth 1

Only the ``tests/`` folder is copied (into ``--work``, a temporary folder by default), so the
laplace-torch under test is the installed one, never the checkout's ``laplace/`` package.
Tests run module by module in a fresh interpreter each, one torch thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), ``-p no:cacheprovider -q``, with this
repository's ``src`` first on ``PYTHONPATH``, ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (the suite
predates torch 2.6's ``weights_only`` default) and a per-test time limit (hangs fail). Unless
``--no-compare``, every call pushforward answers is also computed by laplace-torch and compared
(``audit.py``). Exit status: 0 when every failure of a pushforward
mode also fails in the baseline or is a difference listed in ``expected.py``; 1 when any is
unexplained or a known pushforward bug.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from expected import EXPECTED, EXPECTED_MISMATCHES  # noqa: E402

URL = "https://github.com/aleximmer/Laplace"
MODES = ("baseline", "accelerate", "backends")
MODULES = (
    "test_baselaplace",
    "test_lllaplace",
    "test_subnetlaplace",
    "test_subset_params",
    "test_serialization",
    "test_curv_backends_curvlinops",
    "test_curv_backends_interface",
    "test_laplace",
)
COUNTED = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="laplace_suite_"))
    tests = obtain_tests(args, work)
    out = Path(args.out) if args.out else work / "results"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {}
    for module in args.modules:
        if not (tests / f"{module}.py").exists():
            print(f"{module}: not in {tests}, skipped", flush=True)
            continue
        for mode in args.modes:
            report = out / f"{module}.{mode}.json"
            if args.resume and report.exists():
                results.setdefault(module, {})[mode] = json.loads(report.read_text())
                continue
            results.setdefault(module, {})[mode] = run_one(args, tests.parent, module, mode, report)
    summary = summarize(results)
    commit = tests.parent / "COMMIT"
    versions = {d.get("laplace_version") for by_mode in results.values() for d in by_mode.values()}
    summary["source"] = {
        "tests": commit.read_text().strip() if commit.exists() else str(args.tests),
        "laplace_torch": sorted(v for v in versions if v),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = render(summary)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"results in {out}")
    return 1 if summary["new"] or summary["known_bugs"] else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tests", help="a Laplace checkout (or its tests/ folder)")
    src.add_argument("--git-dir", help="a Laplace git directory; with --ref")
    src.add_argument("--clone", action="store_true", help=f"git clone --depth 1 {URL}; --ref")
    p.add_argument("--ref", help="tag, branch or commit for --git-dir / --clone")
    p.add_argument("--work", help="folder for the copied tests and results (default: temporary)")
    p.add_argument("--out", help="folder for the JSON reports and summary (default: WORK/results)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, "both"])
    p.add_argument("--modules", nargs="+", default=list(MODULES), help="test module names")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per module and mode")
    p.add_argument("--test-timeout", type=int, default=120, help="seconds per test (hangs)")
    p.add_argument("--resume", action="store_true", help="reuse reports already in --out")
    p.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="do not compare each swapped call with laplace-torch's own (audit.py)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter with laplace-torch")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    if not (args.tests or args.git_dir or args.clone):
        args.tests = os.environ.get("LAPLACE_TESTS")
        if not args.tests:
            p.error("give --tests, --git-dir or --clone (or set LAPLACE_TESTS)")
    if args.git_dir and not args.ref:
        p.error("--git-dir needs --ref")
    return args


def obtain_tests(args: argparse.Namespace, work: Path) -> Path:
    """Copy laplace-torch's ``tests/`` into ``work/suite/tests``; returns that folder."""
    suite = work / "suite"
    if suite.exists():
        shutil.rmtree(suite)
    suite.mkdir(parents=True)
    if args.tests:
        source = Path(args.tests)
        source = source / "tests" if (source / "tests").is_dir() else source
        shutil.copytree(source, suite / "tests")
    else:
        git_dir = args.git_dir
        if args.clone:
            clone = work / "Laplace"
            if clone.exists():
                shutil.rmtree(clone)
            cmd = ["git", "clone", "--depth", "1", URL, str(clone)]
            if args.ref:
                cmd[3:3] = ["--branch", args.ref]
            subprocess.run(cmd, check=True)
            git_dir = str(clone / ".git")
        ref = args.ref or "HEAD"
        archive = subprocess.run(
            ["git", "--git-dir", git_dir, "archive", ref, "tests"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "x", "-C", str(suite)], input=archive, check=True)
        commit = subprocess.run(
            ["git", "--git-dir", git_dir, "rev-parse", ref], check=True, capture_output=True
        )
        (suite / "COMMIT").write_text(commit.stdout.decode())
    (suite / "pytest.ini").write_text("[pytest]\n")  # no configuration from folders above
    return suite / "tests"


def run_one(args: argparse.Namespace, suite: Path, module: str, mode: str, report: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    # the suite predates torch 2.6, whose torch.load defaults to weights_only=True: its
    # serialization tests pickle whole Laplace objects and load them back
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    paths = [str(HERE), str(REPO / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [
        args.python,
        "-m",
        "pytest",
        "-p",
        "pushforward_plugin",
        "--pf-mode",
        mode,
        "--pf-report",
        str(report),
        *(["--pf-compare"] if args.compare else []),
        f"--pf-test-timeout={args.test_timeout}",
        "-p",
        "no:cacheprovider",
        "-q",
        "--tb=short",
        "-W",
        "ignore",
        f"tests/{module}.py",
        *args.pytest_args,
    ]
    start = time.time()
    print(f"{module} [{mode}] ...", end=" ", flush=True)
    log = report.with_suffix(".log")
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                cmd, cwd=suite, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout
            )
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    data = json.loads(report.read_text()) if report.exists() else {"tests": []}
    data["status"] = status
    data["seconds"] = round(time.time() - start, 1)
    report.write_text(json.dumps(data, indent=1))
    counts = count(data["tests"])
    print(f"{status} in {data['seconds']} s: {counts}", flush=True)
    return data


def count(tests: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(COUNTED, 0)
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return counts


def matches(nodeid: str, pattern: str) -> bool:
    """``pattern`` with ``*`` for any text (brackets of parametrized ids are literal)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, nodeid) is not None


def classify(mode: str, nodeid: str, baseline_failed: set[str]) -> tuple[str, str]:
    """``(class, reason)`` of a failure in ``mode``: ``baseline`` (fails unmodified too), an
    entry of ``expected.EXPECTED``, or ``NEW``."""
    if nodeid in baseline_failed:
        return "baseline", "fails in the unmodified run too"
    for modes, pattern, kind, reason in EXPECTED:
        if mode in modes and matches(nodeid, pattern):
            return kind, reason
    return "NEW", "not explained: a regression or an unclassified difference"


def summarize(results: dict[str, dict[str, dict]]) -> dict:
    rows, failures, new, audits = [], [], [], []
    for module, by_mode in results.items():
        base = by_mode.get("baseline", {"tests": []})["tests"]
        baseline_failed = {t["nodeid"] for t in base if t["outcome"] in ("failed", "error")}
        for mode, data in by_mode.items():
            c = count(data["tests"])
            audit = data.get("audit") or {}
            compared = sum(audit.get("compared", {}).values())
            by_call = audit.get("max_rel", {})
            max_rel = {
                dtype: max(
                    (v for k, v in by_call.items() if k.endswith(f"({dtype})")), default=None
                )
                for dtype in ("float64", "float32")
            }
            for section in ("mismatches", "reference_errors"):
                for m in audit.get(section, []):
                    reason = _mismatch_reason(mode, m) if section == "mismatches" else ""
                    audits.append(
                        {"module": module, "mode": mode, "section": section, "reason": reason, **m}
                    )
            rows.append(
                {
                    "module": module,
                    "mode": mode,
                    **c,
                    "compared": compared if audit else None,
                    "max_rel": max_rel,
                    "mismatches": len(audit.get("mismatches", [])),
                    "unexplained_mismatches": sum(
                        not _mismatch_reason(mode, m) for m in audit.get("mismatches", [])
                    ),
                    "by_call": audit.get("max_rel", {}),
                    "not_compared": audit.get("not_compared", {}),
                    "seconds": data.get("seconds"),
                    "status": data.get("status"),
                    "accelerated": data.get("accelerated", 0),
                    "backends_swapped": data.get("backends_swapped", 0),
                }
            )
            for t in data["tests"]:
                if t["outcome"] not in ("failed", "error"):
                    continue
                kind, reason = (
                    ("baseline", "laplace-torch's own failure")
                    if mode == "baseline"
                    else classify(mode, t["nodeid"], baseline_failed)
                )
                entry = {"mode": mode, **t, "class": kind, "reason": reason}
                failures.append(entry)
                if kind == "NEW":
                    new.append(entry)
    known_bugs = [f for f in failures if f["class"] == "known-bug"]
    return {
        "rows": rows,
        "failures": failures,
        "new": new,
        "known_bugs": known_bugs,
        "audit": audits,
    }


def render(summary: dict) -> str:
    source = summary.get("source", {})
    lines = [
        f"laplace-torch {', '.join(source.get('laplace_torch', [])) or '?'} (installed); "
        f"its test suite from {source.get('tests', '?')}",
        "",
        "| module | mode | passed | failed | errors | skipped | xfailed | objects swapped "
        "| calls compared | max rel. diff float64 | float32 | mismatches (unexplained) | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        swapped = {"accelerate": r["accelerated"], "backends": r["backends_swapped"]}.get(
            r["mode"], r["accelerated"] + r["backends_swapped"]
        )
        baseline = r["mode"] == "baseline"
        compared = "" if baseline or r["compared"] is None else r["compared"]
        rel = {k: "" if v is None else f"{v:.1e}" for k, v in (r["max_rel"] or {}).items()}
        max_rel = f"{rel.get('float64', '')} | {rel.get('float32', '')}"
        mismatches = (
            ""
            if baseline or r["compared"] is None
            else f"{r['mismatches']} ({r['unexplained_mismatches']})"
        )
        lines.append(
            f"| {r['module']} | {r['mode']} | {r['passed']} | {r['failed']} | {r['error']} "
            f"| {r['skipped']} | {r['xfailed']} | {'' if baseline else swapped} | {compared} "
            f"| {max_rel} | {mismatches} | {r['seconds']}{_status(r['status'])} |"
        )
    totals: dict[str, float] = {}
    for r in summary["rows"]:
        for kind, rel in r["by_call"].items():
            totals[kind] = max(totals.get(kind, 0.0), rel)
    if totals:
        lines += ["", "Largest relative difference from laplace-torch's own result, per call:"]
        lines += [f"- {kind}: {rel:.1e}" for kind, rel in sorted(totals.items())]
    if summary["audit"]:
        lines += ["", "Calls that differ from laplace-torch's, or that laplace-torch refuses:"]
        seen: dict[tuple, int] = {}
        for a in summary["audit"]:
            key = (a["mode"], a["test"], a["kind"], a.get("error"), a.get("rel"))
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                continue
            if a["section"] == "reference_errors":
                what = f"laplace-torch's own call raises {a['error']}"
            else:
                what = f"rel. diff {a['rel']:.1e} ({a['detail']}) on ({a['call']})"
                what += " [understood, see expected.py]" if a["reason"] else " [UNEXPLAINED]"
            lines.append(f"- [{a['mode']}] {a['test']}: {a['kind']}: {what}")
    lines += ["", "Failures, grouped by classification:"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for f in summary["failures"]:
        groups.setdefault((f["class"], f["reason"]), []).append(f)
    for (kind, reason), members in groups.items():
        lines.append(f"- {kind}: {reason}")
        for f in members:
            message = f["message"].splitlines()[0].strip() if f["message"] else ""
            lines.append(f"  - [{f['mode']}] {f['nodeid']}: {message[:160]}")
    lines.append("")
    lines.append(
        f"unexplained failures: {len(summary['new'])}; known pushforward bugs: "
        f"{len(summary['known_bugs'])}"
    )
    return "\n".join(lines) + "\n"


def _mismatch_reason(mode: str, mismatch: dict) -> str:
    for modes, pattern, call, reason in EXPECTED_MISMATCHES:
        if mode in modes and mismatch["kind"] == call and matches(mismatch["test"] or "", pattern):
            return reason
    return ""


def _status(status: int | str | None) -> str:
    """A note for a run that did not end normally (pytest's 0: passed, 1: tests failed)."""
    return "" if status in (0, 1, None) else f" (ended: {status})"


if __name__ == "__main__":
    sys.exit(main())
