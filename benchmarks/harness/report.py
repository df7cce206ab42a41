"""Benchmark reports: the machine description, ``results.json``, ``results.md``, ``results.png``.

``results.json`` holds everything (options, machine, every raw per-call number); the Markdown
table and the plot are views of it: one section per workload, a batch-size sweep as a
method x batch-size table and as time/memory curves (log-log), the other workloads as rows and
as horizontal bars. A case that ran out of memory or time is shown at its limit, marked.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from cases.workloads import TITLES

import pushforward
from harness.lib import format_bytes

__all__ = [
    "format_seconds",
    "machine_info",
    "markdown",
    "readme_section",
    "summary",
    "update_readme",
    "write_plot",
    "write_tables",
]

_PACKAGES = {
    "laplace-torch": "laplace-torch",
    "curvlinops": "curvlinops-for-pytorch",
    "BackPACK": "backpack-for-pytorch",
    "ASDL (asdfghjkl)": "asdfghjkl",
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python/torch and peer-library versions, GPU, date."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "packages": {
            "pushforward": pushforward.__version__,
            **{name: _version(dist) for name, dist in _PACKAGES.items()},
        },
        "device": device,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_seconds(t: float) -> str:
    """Seconds with three significant digits (``"0.00412 s"``, ``"12.3 s"``)."""
    return f"{t:.3g} s"


#: A case during which other processes kept at least this many cores busy on average is
#: marked: its time is unreliable.
CONTENDED_CORES = 0.25


def _contended(result: dict[str, Any]) -> bool:
    return (result.get("others_cpu_cores") or 0.0) >= CONTENDED_CORES


def summary(result: dict[str, Any]) -> str:
    """One line: ``"0.123 s, +45.6 MB"`` for a measured case (with ``†`` when the machine was
    busy with other work), else its message."""
    if result["status"] != "ok":
        return result["message"]
    mark = " †" if _contended(result) else ""
    return f"{format_seconds(result['time_median_s'])}{mark}, +{format_bytes(_memory(result))}"


def _memory(result: dict[str, Any]) -> int | None:
    """The case's peak memory above baseline: CUDA's when measured on a GPU, else RSS."""
    return result.get("cuda_peak_above_baseline_bytes", result.get("peak_above_baseline_bytes"))


def _method_key(result: dict[str, Any]) -> str:
    """``"w1-diag/laplace-default"`` -> ``"laplace-default"`` (sweeps drop ``"/B=..."``)."""
    return result["id"].split("/")[1] if "/" in result["id"] else result["id"]


def _by_workload(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["workload"], []).append(r)
    return groups


def _short_failure(result: dict[str, Any], options: dict[str, Any]) -> str:
    return {
        "oom": f"out of memory (> {format_bytes(options['memory_limit_bytes'])})",
        "timeout": f"timeout (> {options['time_limit_s']:g} s)",
    }.get(result["status"], result["status"])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _header(payload: dict[str, Any]) -> list[str]:
    m, o = payload["machine"], payload["options"]
    ram = format_bytes(m["ram_bytes"]) if m.get("ram_bytes") else "unknown"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    packages = "".join(f", {k} {v}" for k, v in m["packages"].items() if v)
    memory = "CUDA memory (max_memory_allocated)" if m.get("gpu") else "resident memory (RSS)"
    lines = ["# pushforward benchmark results", ""]
    if o["quick"]:
        lines += [
            "**Quick mode**: tiny workloads that check the harness; these are not measurements.",
            "",
        ]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {ram} RAM{gpu}; {m['os']}; "
        f"Python {m['python']}, torch {m['torch']} ({o.get('threads') or m['torch_threads']} "
        f"threads){packages}. Run {m['date']} on device `{o['device']}`.",
        "",
        f"Regenerate: `{payload.get('command') or 'python benchmarks/run.py'}`. Each case runs in a fresh "
        f"process: its setup (model, inputs, fitted posterior), {o['warmup']} untimed warm-up "
        f"call(s) (one-time costs), then {o['repeats']} timed calls. Time: the median timed call. "
        f"Memory: the largest peak {memory} of a timed call above the baseline, the memory held "
        "right before the first timed call (imports, model, inputs, posterior, what the warm-up "
        f"left). Limits: {o['time_limit_s']:g} s for the setup and for each call, "
        f"{format_bytes(o['memory_limit_bytes'])} RSS. First-call (cold) numbers are in "
        "`results.json`.",
        "",
    ]
    return lines


def _sizes(results: list[dict[str, Any]], sweep: bool) -> str:
    info = next((r["info"] for r in results if r.get("info")), {})
    if not info:
        return ""
    parts = [info.get("arch", "")] + [f"{k}={info[k]:,}" for k in ("K", "P") if k in info]
    if not sweep and "B" in info:
        parts.append(f"B={info['B']}")
    return "Measured sizes: " + ", ".join(p for p in parts if p) + "."


def _fixed_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| case | method | median time | peak memory above baseline | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] == "ok":
            cells = [
                format_seconds(r["time_median_s"]) + (" †" if _contended(r) else ""),
                format_bytes(_memory(r)),
                format_bytes(r["peak_rss_bytes"]),
            ]
        else:
            cells = [_cell(r["message"][:200]), "—", "—"]
        lines.append(f"| `{_method_key(r)}` | {_cell(r['method'])} | " + " | ".join(cells) + " |")
    return lines


def _sweep_table(results: list[dict[str, Any]], options: dict[str, Any]) -> list[str]:
    batches = sorted({r["batch"] for r in results})
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    methods: dict[str, str] = {}
    for r in results:
        rows.setdefault(_method_key(r), {})[r["batch"]] = r
        methods.setdefault(_method_key(r), r["method"])
    lines = [
        "| case | " + " | ".join(f"B={b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for key, cells in rows.items():
        texts = []
        for b in batches:
            r = cells.get(b)
            if r is None:
                texts.append("")
            elif r["status"] == "ok":
                texts.append(summary(r))
            else:
                texts.append(_short_failure(r, options))
        lines.append(f"| `{key}` | " + " | ".join(texts) + " |")
    lines += ["", "Time per call, then peak memory above baseline. Cases:", ""]
    lines += [f"- `{k}`: {m}" for k, m in methods.items()]
    return lines


def _estimate_table(results: list[dict[str, Any]]) -> list[str]:
    """Estimated peak (the plan's) vs the measured peaks of each ``estimate/`` case."""
    lines = [
        "| workload | strategy | estimated peak | allocator peak (one call) | RSS peak above "
        "baseline | allocator / estimate |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        info = r.get("info", {})
        if r["status"] != "ok" or "estimated_bytes" not in info:
            lines.append(f"| `{_method_key(r)}` | — | {_cell(r['message'][:200])} | | | |")
            continue
        est, alloc = info["estimated_bytes"], info.get("allocator_peak_bytes")
        measured = "—" if alloc is None else format_bytes(alloc)
        ratio = "—" if alloc is None else f"{alloc / max(est, 1):.2f}"
        lines.append(
            f"| `{_method_key(r)}` | {info.get('strategy', '')} | {format_bytes(est)} | "
            f"{measured} | {format_bytes(_memory(r))} | {ratio} |"
        )
    lines += [
        "",
        "The allocator peak is PyTorch's own count of what one call allocated "
        "(`pushforward.testing.peak_memory`); the RSS peak adds the allocator's and the C "
        "library's behaviour. The estimate must bound the allocator peak.",
    ]
    return lines


def _planner_table(results: list[dict[str, Any]]) -> list[str]:
    """Per problem: every strategy's median time, the planner's choice and the fastest."""
    problems: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        problem, strategy = r["id"].split("/")[1:3]
        problems.setdefault(problem, {})[strategy] = r
    lines = [
        "| problem | planner's choice | fastest measured | times (median) | choice is fastest |",
        "|---|---|---|---|---|",
    ]
    for problem, runs in problems.items():
        ok = {s: r for s, r in runs.items() if r["status"] == "ok"}
        choice = next((r["info"].get("planner_choice") for r in runs.values() if r.get("info")), "")
        fastest = min(ok, key=lambda s: ok[s]["time_median_s"]) if ok else "—"
        times = ", ".join(
            f"{s} {format_seconds(r['time_median_s'])}" if r["status"] == "ok" else f"{s} failed"
            for s, r in runs.items()
        )
        same = choice == fastest or (
            choice in ok and ok[choice]["time_median_s"] <= 1.1 * ok[fastest]["time_median_s"]
        )
        verdict = "yes" if same else "**no**"
        lines.append(f"| {problem} | {choice} | {fastest} | {times} | {verdict} |")
    lines += ["", "“yes” when the choice is the fastest or within 10 % of it."]
    return lines


def _overhead_table(results: list[dict[str, Any]]) -> list[str]:
    """The public call's time minus the strategy's own, per call."""
    by = {r["id"].split("/")[1]: r for r in results if r["status"] == "ok"}
    lines = _fixed_table(results)
    if "public-call" in by and "strategy-run" in by:
        calls = 200
        public = by["public-call"]["time_median_s"] / calls
        bare = by["strategy-run"]["time_median_s"] / calls
        lines += [
            "",
            f"Per call: public {public * 1e3:.3f} ms, the strategy's own work {bare * 1e3:.3f} ms: "
            f"overhead {(public - bare) * 1e3:.3f} ms.",
        ]
    return lines


#: Workloads whose report section is not the plain table.
_SECTIONS = {"estimate": _estimate_table, "planner": _planner_table, "overhead": _overhead_table}


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report of a run (header, then one section per workload)."""
    options = payload["options"]
    lines = _header(payload)
    for workload, results in _by_workload(payload["results"]).items():
        sweep = all(r["batch"] is not None for r in results)
        lines += [f"## {TITLES.get(workload, workload)}", ""]
        sizes = _sizes(results, sweep)
        if sizes:
            lines += [sizes, ""]
        if workload in _SECTIONS:
            lines += _SECTIONS[workload](results)
        else:
            lines += _sweep_table(results, options) if sweep else _fixed_table(results)
        if any(_contended(r) for r in results if r["status"] == "ok"):
            lines += [
                "",
                f"† Other processes kept ≥ {CONTENDED_CORES:g} cores busy on average while "
                "this case ran (`others_cpu_cores` in `results.json`): its time is unreliable.",
            ]
        errors = [r for r in results if r["status"] in ("error", "crashed")]
        if errors:
            lines += ["", "Errors:", ""]
            lines += [f"- `{r['id']}`: {_cell(r['message'])}" for r in errors]
        lines.append("")
    return "\n".join(lines)


#: The README section between these markers is rewritten by ``python benchmarks/run.py --readme``.
README_START = "<!-- benchmark results: generated by `python benchmarks/run.py --readme README.md` -->"
README_END = "<!-- end of benchmark results -->"


def _ratio(ours: dict[str, Any], anchor: dict[str, Any] | None) -> str:
    """``"123x faster, 45x less memory"`` against an anchor that finished, else ``""``."""
    if anchor is None or anchor["status"] != "ok" or ours["status"] != "ok":
        return ""
    speed = anchor["time_median_s"] / max(ours["time_median_s"], 1e-9)
    mem_ours, mem_anchor = _memory(ours), _memory(anchor)
    memory = (
        f", {mem_anchor / max(mem_ours, 1):.0f}x less memory" if mem_ours and mem_anchor else ""
    )
    return f"{speed:.0f}x faster{memory}"


def readme_section(payload: dict[str, Any], results_dir: str) -> str:
    """A compact results table for the README: every fixed-size case with its time, memory
    and, for this library's cases, the ratio to laplace-torch's default backend in the same run."""
    m = payload["machine"]
    lines = [
        README_START,
        "",
        f"Measured on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['date']}; "
        f"regenerate with `{payload.get('command') or 'python benchmarks/run.py'}`. Full tables: "
        f"[`{results_dir}/results.md`]({results_dir}/results.md).",
        "",
        "| workload | case | median time | peak memory above baseline | vs laplace-torch |",
        "|---|---|---|---|---|",
    ]
    for workload, results in _by_workload(payload["results"]).items():
        fixed = [r for r in results if r["batch"] is None]
        anchor = next((r for r in fixed if _method_key(r) == "laplace-default"), None)
        anchor = anchor or next((r for r in fixed if r["library"] == "laplace-torch"), None)
        for r in fixed:
            if r["status"] == "ok":
                cells = [format_seconds(r["time_median_s"]), format_bytes(_memory(r))]
            else:
                cells = [_cell(_short_failure(r, payload["options"])), "—"]
            ratio = _ratio(r, anchor) if r["library"] == "pushforward" else ""
            lines.append(
                f"| {workload} | `{_method_key(r)}` | " + " | ".join(cells) + f" | {ratio} |"
            )
    lines += ["", f"![benchmark plot]({results_dir}/results.png)", "", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace the README's generated section (between the markers) with ``section``."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(
            f"{readme} has no generated-results markers ({README_START!r} ... {README_END!r})"
        )
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + section + tail)


def write_tables(payload: dict[str, Any], out_dir: Path) -> None:
    """Write ``results.json`` and ``results.md`` into ``out_dir``."""
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(payload))


def write_plot(payload: dict[str, Any], path: Path) -> None:
    """Write the PNG: per sweep, time and memory against batch size (log-log); for the other
    workloads, horizontal time and memory bars (log scale). Cases stopped at a limit are drawn
    at the limit with an ``x``; failed cases elsewhere are labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    options = payload["options"]
    groups = _by_workload(payload["results"])
    sweeps = {w: rs for w, rs in groups.items() if all(r["batch"] is not None for r in rs)}
    fixed = [r for w, rs in groups.items() if w not in sweeps for r in rs]
    bar_height = max(2.5, 0.28 * len(fixed))
    heights = [3.6] * len(sweeps) + ([bar_height] if fixed else [])
    if not heights:
        return
    fig, axes = plt.subplots(
        len(heights),
        2,
        figsize=(13, sum(heights) + 1),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    palette = plt.get_cmap("tab10")
    libraries = sorted({r["library"] for r in fixed})
    colors = {lib: palette(i % 10) for i, lib in enumerate(libraries)}
    limits = {"time": options["time_limit_s"], "memory": options["memory_limit_bytes"] / 1e9}

    def value(r: dict[str, Any], what: str) -> float | None:
        if r["status"] == "ok":
            return r["time_median_s"] if what == "time" else _memory(r) / 1e9
        stopped = (r["status"], what) in (("timeout", "time"), ("oom", "memory"))
        return limits[what] if stopped else None

    for row, (workload, results) in enumerate(sweeps.items()):
        by_method: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            by_method.setdefault(_method_key(r), []).append(r)
        for col, what in enumerate(("time", "memory")):
            ax = axes[row][col]
            for i, (key, rs) in enumerate(by_method.items()):
                ok = [(r["batch"], value(r, what)) for r in rs if r["status"] == "ok"]
                stopped = [
                    (r["batch"], value(r, what))
                    for r in rs
                    if r["status"] != "ok" and value(r, what)
                ]
                color = palette(i % 10)
                if ok:
                    ax.plot(*zip(*ok, strict=True), "o-", color=color, label=key)
                if stopped:
                    ax.plot(*zip(*stopped, strict=True), "x", color=color, markersize=10, mew=2)
                    ax.axhline(limits[what], color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel(
                "median time [s]" if what == "time" else "peak memory above baseline [GB]"
            )
            ax.set_title(TITLES.get(workload, workload), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, title="x: stopped at the limit (dashed)", title_fontsize=7)
    if fixed:
        labels = [f"{r['workload']}: {_method_key(r)}" for r in fixed]
        ys = range(len(fixed))
        for col, what in enumerate(("time", "memory")):
            ax = axes[-1][col]
            for y, r in zip(ys, fixed, strict=True):
                v = value(r, what)
                failed = r["status"] != "ok"
                if v is not None:
                    ax.barh(
                        y,
                        v,
                        color=colors[r["library"]],
                        hatch="//" if failed else None,
                        alpha=0.5 if failed else 1,
                    )
                if failed:
                    ax.text(
                        0.01,
                        y,
                        _short_failure(r, options),
                        va="center",
                        fontsize=7,
                        transform=ax.get_yaxis_transform(),
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
                    )
            ax.set_yticks(list(ys))
            ax.set_yticklabels(labels if col == 0 else [], fontsize=7)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel(
                "median time [s]" if what == "time" else "peak memory above baseline [GB]"
            )
            ax.grid(True, axis="x", which="both", alpha=0.3)
        handles = [Patch(color=colors[lib], label=lib) for lib in libraries]
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="//", label="stopped at the limit")
        )
        fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=len(handles))
    machine = payload["machine"]
    title = (
        f"pushforward benchmarks — {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}"
    )
    if options["quick"]:
        title += " — QUICK MODE (not measurements)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.02 if fixed else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
