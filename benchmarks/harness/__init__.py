"""Benchmark harness: this library's products side by side with laplace-torch and other anchors.

Every case runs in a fresh process (:mod:`~harness.worker`) so its peak memory is
its own; the runner (:mod:`~harness.runner`) repeats it for a median, enforces a time
and a memory limit, and records a case that runs out of either instead of dropping it; the
report (:mod:`~harness.report`) writes JSON, Markdown and a PNG plot. Cases live in
the ``cases_*`` modules, registered with :func:`~harness.registry.register`, on the
workloads of :mod:`~cases.workloads`. Command line: ``python benchmarks/run.py`` (``make bench``).
"""

from harness.registry import Case, Context, load_cases, register, select
from harness.runner import Options, run_benchmarks, run_case

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
