"""pytest plugin: run laplace-torch's own test suite with pushforward swapped in.

Load it with ``-p pushforward_plugin`` (this folder on ``PYTHONPATH``) and choose a mode:

* ``--pf-mode baseline``: laplace-torch unmodified (only the common set-up below);
* ``--pf-mode accelerate``: every weight-space Laplace object (``ParametricLaplace``: Full, Diag,
  Kron, LowRank, their last-layer and subnetwork variants) gets
  ``pushforward.laplace_interop.accelerate(la)`` as soon as its outermost ``__init__`` returns,
  however it was made (the ``Laplace(...)`` factory or a class called directly). The
  function-space classes (``FunctionalLaplace``, ``ELLA``, ``VaLLA``), which ``accelerate`` does
  not cover, are left alone;
* ``--pf-mode backends``: laplace-torch's ``CurvlinopsGGN``/``CurvlinopsEF`` are replaced by
  ``PushforwardGGN``/``PushforwardEF``: (a) the names ``CurvlinopsGGN``/``CurvlinopsEF`` of
  ``laplace.curvature`` and ``laplace.curvature.curvlinops`` (what the test modules import, so
  backends they construct or parametrize over are ours) are rebound before collection, and
  (b) every Laplace object whose backend is laplace-torch's default (``backend=None``) or a
  Curvlinops GGN/EF gets ours. The weight-space classes receive ours as their ``backend``
  argument; the function-space classes, which accept only the exact classes
  ``[BackPackGGN, AsdlGGN, CurvlinopsGGN]``, are constructed with laplace-torch's class and
  switched afterwards (``la._backend_cls``: pushforward's README workaround);
* ``--pf-mode both``: the two together.

Common set-up in every mode (so the three runs differ only by the swap): one torch thread, and,
where ``torchvision`` cannot be imported, :mod:`torchvision_stub` as ``torchvision.models`` (the
suite imports ``wide_resnet50_2`` for its "large model" construction tests).

``--pf-report PATH`` writes one JSON record per test (node id, outcome, duration, the first
lines of a failure) plus the counts of Laplace objects accelerated and backends swapped.
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import time
from pathlib import Path
from typing import Any

import audit
import pytest
import torchvision_stub

MODES = ("baseline", "accelerate", "backends", "both")

_STATE: dict[str, Any] = {
    "mode": "baseline",
    "depth": 0,
    "accelerated": 0,
    "swapped": 0,
    "records": [],
    "patches": [],
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pushforward", "laplace-torch suite with pushforward swapped in")
    group.addoption(
        "--pf-mode",
        choices=MODES,
        default="baseline",
        help="baseline (laplace-torch as is), accelerate (accelerate(la) on every weight-space "
        "Laplace object), backends (PushforwardGGN/EF for CurvlinopsGGN/EF), both",
    )
    group.addoption("--pf-report", default=None, help="write per-test results as JSON here")
    group.addoption(
        "--pf-test-timeout",
        type=int,
        default=0,
        help="fail a test that runs longer than this many seconds (SIGALRM; 0: no limit)",
    )
    group.addoption(
        "--pf-compare",
        action="store_true",
        help="also compute every swapped call with laplace-torch's own code and compare "
        "(see audit.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)
    import laplace  # first: torchmetrics must see the real torchvision situation

    _STATE["torchvision_stub"] = torchvision_stub.install()
    mode = config.getoption("--pf-mode")
    _STATE["mode"] = mode
    _STATE["laplace_version"] = getattr(laplace, "__version__", None) or _dist_version()
    _STATE["compare"] = config.getoption("--pf-compare") and mode != "baseline"
    if mode in ("backends", "both"):
        _rebind_backend_names()
        if _STATE["compare"]:
            audit.audit_backends(_originals(), _patch)
    if mode != "baseline":
        _wrap_laplace_constructors(
            accelerate=mode in ("accelerate", "both"), backends=mode in ("backends", "both")
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    for owner, name, value in reversed(_STATE["patches"]):
        setattr(owner, name, value)
    _STATE["patches"].clear()


def pytest_report_header(config: pytest.Config) -> list[str]:
    import torch

    import pushforward

    return [
        f"pushforward plugin: mode={_STATE['mode']}, laplace-torch "
        f"{_STATE.get('laplace_version')}, pushforward from {Path(pushforward.__file__).parent}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread), torchvision "
        + ("stand-in" if _STATE.get("torchvision_stub") else "installed")
    ]


class TestTimeout(Exception):
    """A test ran past ``--pf-test-timeout`` (a hang, e.g. a lock that is never released)."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    seconds = item.config.getoption("--pf-test-timeout")
    if not seconds:
        return (yield)

    def expire(signum: int, frame: Any) -> None:
        raise TestTimeout(f"test still running after {seconds} s (--pf-test-timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return (yield)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    audit.CURRENT["test"] = nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One record per test: its call's outcome, or the setup's/teardown's when that failed or
    skipped (``xfailed``/``xpassed`` for expected failures)."""
    if report.when == "call" or report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.skipped:
            outcome = "skipped"
        elif report.failed and report.when != "call":
            outcome = "error"
        else:
            outcome = report.outcome
        _STATE["records"].append(
            {
                "nodeid": report.nodeid,
                "when": report.when,
                "outcome": outcome,
                "duration": round(report.duration, 3),
                "message": "" if outcome == "passed" else _short(report),
            }
        )


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _STATE["records"].append(
            {
                "nodeid": report.nodeid,
                "when": "collect",
                "outcome": "error",
                "duration": 0.0,
                "message": _short(report),
            }
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--pf-report")
    if not path:
        return
    payload = {
        "mode": _STATE["mode"],
        "laplace_version": _STATE.get("laplace_version"),
        "torchvision_stub": _STATE.get("torchvision_stub"),
        "exitstatus": int(exitstatus),
        "accelerated": _STATE["accelerated"],
        "backends_swapped": _STATE["swapped"],
        "audit": audit.summary() if _STATE.get("compare") else None,
        "finished": time.time(),
        "tests": _STATE["records"],
    }
    Path(path).write_text(json.dumps(payload, indent=1))


# -- the swaps ---------------------------------------------------------------------------------
def _dist_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("laplace-torch")
    except PackageNotFoundError:
        return None


def _patch(owner: Any, name: str, value: Any) -> None:
    _STATE["patches"].append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _originals() -> dict[type, type]:
    """laplace-torch's ``CurvlinopsGGN``/``CurvlinopsEF`` -> ``PushforwardGGN``/``PushforwardEF``
    (taken once, before any name is rebound)."""
    if "swap" not in _STATE:
        import laplace.curvature.curvlinops as curvlinops

        from pushforward.laplace_interop import PushforwardEF, PushforwardGGN

        _STATE["swap"] = {
            curvlinops.CurvlinopsGGN: PushforwardGGN,
            curvlinops.CurvlinopsEF: PushforwardEF,
        }
    return _STATE["swap"]


def _rebind_backend_names() -> None:
    """Make ``from laplace.curvature import CurvlinopsGGN`` (and ``...curvlinops``) give
    pushforward's backends: the test modules construct and parametrize over these names."""
    import laplace.curvature
    import laplace.curvature.curvlinops

    swap = {orig.__name__: ours for orig, ours in _originals().items()}
    for module in (laplace.curvature, laplace.curvature.curvlinops):
        for name, ours in swap.items():
            _patch(module, name, ours)


def _laplace_classes() -> list[type]:
    import laplace  # noqa: F401  (imports every laplace-torch class)
    from laplace.baselaplace import BaseLaplace

    found, todo = [], [BaseLaplace]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def _wrap_laplace_constructors(accelerate: bool, backends: bool) -> None:
    """Wrap the ``__init__`` of every laplace-torch Laplace class; the outermost call (the one
    that constructs the object) swaps the backend and/or accelerates the result."""
    from laplace.baselaplace import BaseFunctionalLaplace, ParametricLaplace

    from pushforward.laplace_interop import accelerate as pf_accelerate

    swap = _originals()  # laplace-torch's class -> ours
    back = {ours: orig for orig, ours in swap.items()}
    ours_default = next(ours for orig, ours in swap.items() if orig.__name__ == "CurvlinopsGGN")

    def construct(init: Any, self: Any, args: tuple, kwargs: dict) -> None:
        functional = isinstance(self, BaseFunctionalLaplace)
        if backends and functional:  # they accept laplace-torch's exact classes only
            args, kwargs = _map_backend(init, self, args, kwargs, back, None)
        elif backends:
            args, kwargs = _map_backend(init, self, args, kwargs, swap, ours_default)
        init(self, *args, **kwargs)
        cls = getattr(self, "_backend_cls", None)
        if backends and cls in swap:
            if not functional:
                raise AssertionError(f"{type(self).__name__} kept laplace-torch's {cls.__name__}")
            self._backend_cls = swap[cls]  # pushforward's README workaround
            self._backend = None
        if backends and self._backend_cls in back:
            _STATE["swapped"] += 1
        if accelerate and isinstance(self, ParametricLaplace):
            pf_accelerate(self)
            _STATE["accelerated"] += 1
            if _STATE["compare"]:
                audit.audit_accelerated(type(self))

    for cls in _laplace_classes():
        init = cls.__dict__.get("__init__")
        if init is None:
            continue

        @functools.wraps(init)
        def wrapped(self: Any, *args: Any, __init: Any = init, **kwargs: Any) -> None:
            outermost = _STATE["depth"] == 0
            _STATE["depth"] += 1
            try:
                if outermost:
                    construct(__init, self, args, kwargs)
                else:
                    __init(self, *args, **kwargs)
            finally:
                _STATE["depth"] -= 1

        _patch(cls, "__init__", wrapped)


def _map_backend(
    init: Any,
    self: Any,
    args: tuple,
    kwargs: dict,
    mapping: dict[type, type],
    for_none: type | None,
) -> tuple[tuple, dict]:
    """``args``/``kwargs`` of ``init`` with its ``backend`` argument mapped by ``mapping``;
    ``None`` (laplace-torch's default, ``CurvlinopsGGN``) becomes ``for_none`` if given."""
    signature = inspect.signature(init)
    if "backend" not in signature.parameters:
        return args, kwargs
    bound = signature.bind_partial(self, *args, **kwargs)
    backend = bound.arguments.get("backend", signature.parameters["backend"].default)
    if backend is None and for_none is not None:
        new = for_none
    elif backend in mapping:
        new = mapping[backend]
    else:
        return args, kwargs
    bound.arguments["backend"] = new
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _short(report: Any, lines: int = 6) -> str:
    text = str(report.longreprtext or "")
    tail = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-lines:]
    return "\n".join(tail[:lines])[:1500]
