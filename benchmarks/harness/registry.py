"""The case registry: what a benchmark case is, how one is registered, looked up and selected.

A case is one function ``setup(ctx) -> run``: its body builds the workload (model, inputs, a
fitted posterior, ...) and returns a zero-argument callable; only ``run()`` is timed and its
memory measured, in a fresh process per case (see :mod:`harness.worker`). Adding a
case is one decorated function in a module listed in :data:`CASE_MODULES`::

    @register("w1-diag/my-method", workload="w1-diag", method="my method", library="mine")
    def _my_method(ctx: Context) -> Callable[[], object]:
        w = workloads.build(ctx, "w1-diag")
        return lambda: w.model(w.x)

Modules are imported lazily by :func:`load_cases`; heavy third-party imports (laplace,
curvlinops) belong inside the case functions, so that listing cases stays cheap.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CASE_MODULES", "Case", "Context", "load_cases", "register", "select"]

#: Modules whose import registers the built-in cases. This tuple is the hook point for new
#: families of cases: the library's ``functional_variance`` strategies on W1/W3/W4 and the
#: ``from_laplace`` conversion go in a module of their own, appended here.
CASE_MODULES: tuple[str, ...] = (
    "cases.laplace",
    "cases.anchors",
    "cases.products",
    "cases.pushforward",
    "cases.laplace_oneline",
    "cases.engine",
    "cases.curvature",
    "cases.botorch",
    "cases.distributed",
    "cases.llm_lora",
    "cases.host",
)


@dataclass
class Context:
    """What a case's setup is told about the run, and what it reports back.

    Attributes:
        quick: build tiny workloads (validation of the harness, not a measurement).
        device: torch device string the workload lives on (``"cpu"``, ``"cuda"``).
        seed: seed of the workload's random weights and inputs.
        info: sizes the setup actually used (batch ``B``, outputs ``K``, parameters ``P``,
            ...), copied into the result.
    """

    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


Setup = Callable[[Context], Callable[[], object]]


@dataclass(frozen=True)
class Case:
    """One registered benchmark case.

    Attributes:
        id: unique ``"<workload>/<method>"`` (sweeps add ``"/B=<batch>"``).
        workload: key of the workload (a section of the report, see ``workloads.TITLES``).
        method: human-readable description of what is timed.
        library: whose code is timed (``"laplace-torch"``, ``"pushforward"``, ...).
        setup: ``setup(ctx) -> run``; only ``run()`` is measured.
        batch: the batch size of a point of a batch-size sweep (the report's x-axis).
        tags: names the case can be selected by (its workload and library are always tags).
    """

    id: str
    workload: str
    method: str
    library: str
    setup: Setup
    batch: int | None = None
    tags: frozenset[str] = frozenset()


_REGISTRY: dict[str, Case] = {}


def register(
    case_id: str,
    *,
    workload: str,
    method: str,
    library: str,
    batch: int | None = None,
    tags: Iterable[str] = (),
) -> Callable[[Setup], Setup]:
    """Decorator registering ``setup`` as the case ``case_id``; returns ``setup`` unchanged."""

    def decorate(setup: Setup) -> Setup:
        if case_id in _REGISTRY:
            raise ValueError(f"benchmark case {case_id!r} is registered twice")
        _REGISTRY[case_id] = Case(
            id=case_id,
            workload=workload,
            method=method,
            library=library,
            setup=setup,
            batch=batch,
            tags=frozenset({workload, library, *tags}),
        )
        return setup

    return decorate


def _import(module: str) -> None:
    """Import a module by dotted name, or a ``.py`` file by path (each at most once)."""
    if not module.endswith(".py"):
        importlib.import_module(module)
        return
    path = Path(module).resolve()
    name = "_bench_cases_" + re.sub(r"\W", "_", str(path))
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmark cases from {module}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


def load_cases(extra_modules: Sequence[str] = ()) -> dict[str, Case]:
    """Import :data:`CASE_MODULES` and ``extra_modules`` (dotted names or ``.py`` paths) and
    return every registered case by id, in registration order."""
    for module in (*CASE_MODULES, *extra_modules):
        _import(module)
    return dict(_REGISTRY)


def select(cases: dict[str, Case], patterns: Sequence[str]) -> list[Case]:
    """Cases matching any of ``patterns`` (all cases when there are none), in registry order.

    A pattern is a tag (workload key, library, ``"anchor"``, ...) or a shell-style glob over case
    ids (``"w1-*"``, ``"scaling-mlp/*/B=64"``). A pattern matching nothing is an error.
    """
    if not patterns:
        return list(cases.values())

    def matches(case: Case, pattern: str) -> bool:
        return pattern in case.tags or fnmatch.fnmatchcase(case.id, pattern)

    unknown = [p for p in patterns if not any(matches(c, p) for c in cases.values())]
    if unknown:
        tags = sorted(set().union(*(c.tags for c in cases.values())))
        raise ValueError(
            f"no benchmark case matches {unknown}; tags are {tags}, or use a glob over ids"
        )
    return [c for c in cases.values() if any(matches(c, p) for p in patterns)]
