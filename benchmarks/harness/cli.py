"""The benchmark command line: ``python benchmarks/run.py [cases] [options]`` (``make bench``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _bench(args: argparse.Namespace) -> int:
    from harness import Options, load_cases, run_benchmarks, select
    from harness.lib import format_bytes, parse_memory

    try:
        cases = select(load_cases(), args.cases)
    except ValueError as err:
        print(f"benchmarks/run.py: {err}", file=sys.stderr)
        return 2
    if args.list:
        width = max(len(c.id) for c in cases)
        for c in cases:
            print(f"{c.id:<{width}}  [{c.library}] {c.method}")
        return 0
    options = Options(
        repeats=args.repeats,
        warmup=args.warmup,
        quick=args.quick,
        time_limit_s=args.time_limit,
        memory_limit_bytes=parse_memory(args.memory_limit),
        device=args.device,
        threads=args.threads,
    )
    out = args.out or ("benchmarks/results/tmp/quick" if args.quick else "benchmarks/results")
    print(
        f"{len(cases)} cases, each in a fresh process; {options.warmup} warm-up and "
        f"{options.repeats} timed calls; limits {options.time_limit_s:g} s per call, "
        f"{format_bytes(options.memory_limit_bytes)}; writing to {out}/",
        flush=True,
    )
    command = shlex.join(["python", "benchmarks/run.py", *args.argv])
    results = run_benchmarks(
        cases, options, out, command=command, echo=lambda s: print(s, flush=True)
    )
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; results in {out}/")
    if args.readme:
        import json
        from pathlib import Path

        from harness.report import readme_section, update_readme

        payload = json.loads((Path(out) / "results.json").read_text())
        update_readme(Path(args.readme), readme_section(payload, out))
        print(f"updated the results section of {args.readme}")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "cases",
        nargs="*",
        help="case ids, globs over ids ('w1-*', 'scaling-mlp/*/B=64') or tags (a workload such "
        "as w1-diag, a library such as laplace-torch, 'anchor'); default: all",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--quick", action="store_true", help="tiny workloads: check the harness in seconds"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them (default: 1)")
    p.add_argument(
        "--out",
        help="output directory (default: benchmarks/results, quick: benchmarks/results/tmp/quick)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=120.0,
        help="seconds for setup and per call (default: 120)",
    )
    p.add_argument("--memory-limit", default="18GB", help="RSS limit per case (default: 18GB)")
    p.add_argument("--device", default="cpu", help="torch device of the workloads (default: cpu)")
    p.add_argument(
        "--threads", type=int, help="torch threads in each case (default: torch's default)"
    )
    p.add_argument(
        "--readme",
        help="also rewrite the generated results section of this README (e.g. README.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The benchmark parser."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Run benchmark cases, each in a fresh process, and write results.json, "
        "results.md and results.png.",
    )
    _add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
