"""Benchmark harness: this library's products side by side with laplace-torch and other anchors.

Every case runs in a fresh process (:mod:`~pushforward.bench.worker`) so its peak memory is
its own; the runner (:mod:`~pushforward.bench.runner`) repeats it for a median, enforces a time
and a memory limit, and records a case that runs out of either instead of dropping it; the
report (:mod:`~pushforward.bench.report`) writes JSON, Markdown and a PNG plot. Cases live in
the ``cases_*`` modules, registered with :func:`~pushforward.bench.registry.register`, on the
workloads of :mod:`~pushforward.bench.workloads`. Command line: ``pushforward bench``.
"""

from pushforward.bench.registry import Case, Context, load_cases, register, select
from pushforward.bench.runner import Options, run_benchmarks, run_case

__all__ = [
    "Case",
    "Context",
    "Options",
    "load_cases",
    "register",
    "run_benchmarks",
    "run_case",
    "select",
]
