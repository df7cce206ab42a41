"""Run benchmark cases, each in a fresh worker process, under a time and a memory limit.

The parent starts ``python -m harness.worker <case-id>``, reads its events from a
pipe and watches its RSS every 10 ms. It kills the worker and records the case as

* ``"out of memory (> X)"`` when the worker's RSS passes the memory limit, or when the machine's
  available memory falls under :data:`MIN_AVAILABLE_BYTES` (other processes included);
* ``"timeout (> T s)"`` when its setup, or any one timed call, runs longer than the time limit
  (the interpreter's start-up and imports get :data:`STARTUP_LIMIT_S`);

and records an exception raised by the case as the error (``status="error"``; a failed
allocation inside the case as ``"oom"``), and a worker that died otherwise as ``"crashed"``.
No case is dropped: every selected case yields one result.

Each result also says how busy the machine was: ``others_cpu_cores``, the average number of
cores that processes other than the benchmark kept busy while the case ran (from
``/proc/stat`` less this process's and its workers' CPU time). On a shared machine with few
cores a competing process slows multi-threaded torch far more than its share.
"""

from __future__ import annotations

import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import report
from harness.lib import available_memory, format_bytes
from harness.procmem import busy_cpu_seconds, rss_bytes
from harness.registry import Case

__all__ = ["MIN_AVAILABLE_BYTES", "STARTUP_LIMIT_S", "Options", "run_benchmarks", "run_case"]

STARTUP_LIMIT_S = 300.0
MIN_AVAILABLE_BYTES = 500 * 10**6
_POLL_S = 0.01


@dataclass(frozen=True)
class Options:
    """How cases are run.

    Attributes:
        repeats: timed calls per case (the median is reported).
        warmup: untimed calls before them (one-time costs; measured and reported apart).
        quick: tiny workloads, to check the harness.
        time_limit_s: limit for the setup and for each timed call.
        memory_limit_bytes: limit for the worker's RSS.
        device: torch device of the workloads.
        threads: ``torch.set_num_threads`` in the worker (None: torch's default).
        seed: seed of weights and inputs.
        modules: extra case modules for the worker (dotted names or ``.py`` paths).
    """

    repeats: int = 3
    warmup: int = 1
    quick: bool = False
    time_limit_s: float = 120.0
    memory_limit_bytes: int = 18 * 10**9
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    modules: tuple[str, ...] = ()


def _worker_command(case: Case, options: Options, events_fd: int) -> list[str]:
    cmd = [sys.executable, "-m", "harness.worker", case.id, "--events-fd", str(events_fd)]
    cmd += [
        "--warmup",
        str(options.warmup),
        "--repeats",
        str(options.repeats),
        "--device",
        options.device,
        "--seed",
        str(options.seed),
    ]
    if options.quick:
        cmd.append("--quick")
    if options.threads is not None:
        cmd += ["--threads", str(options.threads)]
    for module in options.modules:
        cmd += ["--module", module]
    return cmd


def _worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with the benchmarks folder (the ``harness`` and
    ``cases`` packages) on ``PYTHONPATH``."""
    here = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here if not path else f"{here}{os.pathsep}{path}"}


def _watch(
    proc: subprocess.Popen, read_fd: int, options: Options
) -> tuple[list[dict], dict[str, Any]]:
    """Collect the worker's events until it exits; kill it at a limit. Returns the events and
    what the watch saw: the worker's largest RSS and, if it was killed, status and message."""
    events: list[dict] = []
    buffer = b""
    phase, deadline = "startup", time.monotonic() + STARTUP_LIMIT_S
    watched: dict[str, Any] = {"observed_max_rss_bytes": 0}
    limit = format_bytes(options.memory_limit_bytes)
    while True:
        ready, _, _ = select.select([read_fd], [], [], _POLL_S)
        if ready:
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                events.append(event)
                if event["event"] in ("started", "call_start"):
                    phase = "setup" if event["event"] == "started" else event["call"]
                    deadline = time.monotonic() + options.time_limit_s
        rss = rss_bytes(proc.pid)
        watched["observed_max_rss_bytes"] = max(watched["observed_max_rss_bytes"], rss)
        if rss > options.memory_limit_bytes:
            watched.update(status="oom", message=f"out of memory (> {limit}) in {phase}")
        elif available_memory() < MIN_AVAILABLE_BYTES:
            watched.update(
                status="oom",
                message=f"out of memory: the machine had < {format_bytes(MIN_AVAILABLE_BYTES)} "
                f"available, the case held {format_bytes(rss)} in {phase}",
            )
        elif time.monotonic() > deadline:
            limit_s = STARTUP_LIMIT_S if phase == "startup" else options.time_limit_s
            watched.update(status="timeout", message=f"timeout (> {limit_s:g} s) in {phase}")
        if "status" in watched:
            proc.kill()
            break
    proc.wait()
    return events, watched


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_case(case: Case, options: Options) -> dict[str, Any]:
    """Run ``case`` in a fresh worker process; return its result record (JSON-ready)."""
    read_fd, write_fd = os.pipe()
    started, busy, own = time.monotonic(), busy_cpu_seconds(), _own_cpu_seconds()
    with tempfile.TemporaryFile() as log:
        try:
            proc = subprocess.Popen(
                _worker_command(case, options, write_fd),
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_worker_env(),
            )
        finally:
            os.close(write_fd)
        try:
            events, watched = _watch(proc, read_fd, options)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(read_fd)
        log.seek(0)
        log_text = log.read().decode(errors="replace")
    result = _assemble(case, events, watched, proc.returncode)
    result["wall_s"] = time.monotonic() - started
    busy_after = busy_cpu_seconds()
    if busy is not None and busy_after is not None:
        others = busy_after - busy - (_own_cpu_seconds() - own)
        result["others_cpu_cores"] = round(max(0.0, others) / result["wall_s"], 3)
    if result["status"] != "ok":
        result["log_tail"] = log_text[-3000:]
    return result


def _assemble(
    case: Case, events: list[dict], watched: dict[str, Any], returncode: int
) -> dict[str, Any]:
    by_kind: dict[str, dict] = {}
    for event in events:
        by_kind.setdefault(event["event"], event)
    done = [
        {k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == "call_done"
    ]
    calls = [c for c in done if not c["warmup"]]
    result: dict[str, Any] = {
        "id": case.id,
        "workload": case.workload,
        "method": case.method,
        "library": case.library,
        "batch": case.batch,
        "status": "ok",
        "message": "",
        "info": by_kind.get("setup_done", by_kind.get("failed", {})).get("info", {}),
        "rss_import_bytes": by_kind.get("started", {}).get("rss_bytes"),
        "setup_s": by_kind.get("setup_done", {}).get("setup_s"),
        "setup_peak_rss_bytes": by_kind.get("setup_done", {}).get("setup_peak_rss_bytes"),
        "torch_threads": by_kind.get("setup_done", {}).get("torch_threads"),
        "warmup_calls": [c for c in done if c["warmup"]],
        "calls": calls,
        "observed_max_rss_bytes": watched["observed_max_rss_bytes"],
    }
    if result["warmup_calls"]:
        first = result["warmup_calls"][0]
        result["first_call_time_s"] = first["time_s"]
        result["first_call_peak_above_baseline_bytes"] = (
            first["peak_rss_bytes"] - first["rss_before_bytes"]
        )
    if calls:
        baseline = calls[0]["rss_before_bytes"]
        peak = max(c["peak_rss_bytes"] for c in calls)
        result.update(
            times_s=[c["time_s"] for c in calls],
            time_median_s=statistics.median(c["time_s"] for c in calls),
            rss_baseline_bytes=baseline,
            peak_rss_bytes=peak,
            peak_above_baseline_bytes=peak - baseline,
            peak_exact=all(c["peak_exact"] for c in calls),
        )
        if "cuda_peak_bytes" in calls[0]:
            cuda_base = calls[0]["cuda_before_bytes"]
            result["cuda_baseline_bytes"] = cuda_base
            result["cuda_peak_above_baseline_bytes"] = (
                max(c["cuda_peak_bytes"] for c in calls) - cuda_base
            )
    if "status" in watched:
        result.update(status=watched["status"], message=watched["message"])
    elif "failed" in by_kind:
        failed = by_kind["failed"]
        result.update(
            status=failed["status"],
            message=f"{failed['message']} (in {failed['phase']})",
            traceback=failed["traceback"],
        )
    elif "finished" not in by_kind:
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        result.update(status="crashed", message=f"worker died ({how})")
    return result


def run_benchmarks(
    cases: Sequence[Case],
    options: Options,
    out_dir: str | Path,
    *,
    command: str = "",
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run ``cases`` one after another, each in a fresh process, and write ``results.json``,
    ``results.md`` (after every case, so an interrupted run keeps what it measured) and
    ``results.png`` (at the end) into ``out_dir``. Returns the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "command": command,
        "options": asdict(options),
        "machine": report.machine_info(options.device),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": [],
    }
    width = max((len(c.id) for c in cases), default=0)
    digits = len(str(len(cases)))
    for i, case in enumerate(cases, 1):
        result = run_case(case, options)
        payload["results"].append(result)
        echo(f"[{i:>{digits}}/{len(cases)}] {case.id:<{width}}  {report.summary(result)}")
        report.write_tables(payload, out)
    payload["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.write_tables(payload, out)
    try:
        report.write_plot(payload, out / "results.png")
    except ImportError:
        echo("matplotlib is not installed: no plot (pip install 'pushforward[bench]')")
    return payload["results"]
