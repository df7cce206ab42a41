"""Measuring and recording for ``gpu_check.py``: one timed or checked row at a time, guarded.

A :class:`Group` holds one row group's results and its time budget. ``Group.time(row, fn)``
makes a first (cold) call, then warm calls up to ``Env.repeats`` (fewer when they would pass
``Env.row_seconds`` or the group's budget), and records the median warm time and the peak memory
above what was held right before a call: on CUDA ``torch.cuda.max_memory_allocated`` above
``memory_allocated``; on a CPU the process's RSS high-water mark above its RSS (reset before the
call through ``/proc/self/clear_refs``; ``None`` where the kernel refuses). Any exception —
out of memory included — is recorded with its message and the group goes on; a row whose group
budget is spent is recorded as skipped. ``Group.check(what, got, want, tol)`` records the
relative error ``max|got - want| / max|want|``.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from harness import procmem
from torch import Tensor

__all__ = [
    "CallTimeout",
    "Env",
    "Group",
    "describe_error",
    "format_bytes",
    "format_time",
    "free_memory",
    "rel_err",
    "summary",
    "time_limit",
]


@dataclass(frozen=True)
class Env:
    """Where and how the rows run.

    Attributes:
        device: the device measured.
        quick: tiny sizes (a check of the script; its numbers are not measurements).
        repeats: warm calls per row at most.
        row_seconds: warm calls of one row stop once they would take longer than this.
        call_limit: seconds one call may run before it is interrupted (``CallTimeout``, recorded
            as a timeout; a kernel already queued on the GPU still finishes).
        seed: seeds every model, input and posterior.
    """

    device: torch.device
    quick: bool = False
    repeats: int = 5
    row_seconds: float = 10.0
    call_limit: float = 120.0
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def randn(self, *shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
        """Seeded standard normals (drawn on the CPU, the same on every device)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + seed)
        return torch.randn(*shape, generator=g, dtype=dtype).to(self.device)

    def randint(self, high: int, *shape: int, seed: int = 0) -> Tensor:
        """Seeded integers in ``[0, high)`` (drawn on the CPU)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + seed)
        return torch.randint(high, shape, generator=g).to(self.device)


class CallTimeout(BaseException):
    """A call ran past ``Env.call_limit`` (a ``BaseException``, like ``KeyboardInterrupt``, so
    that no ``except Exception`` inside a library swallows it and carries on)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CallTimeout` in the block after ``seconds`` (SIGALRM; main thread only)."""

    def alarm(signum: int, frame: object) -> None:
        raise CallTimeout(f"the call ran past {seconds:g} s and was interrupted")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe_error(err: BaseException) -> dict[str, str]:
    """``status`` ("oom" for failed allocations, "timeout", else "error"), ``error`` (type and
    first line of the message) and the end of the ``traceback``."""
    text = str(err).strip()
    oom = isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
    first = text.splitlines()[0] if text else ""
    status = "oom" if oom else "timeout" if isinstance(err, CallTimeout) else "error"
    return {
        "status": status,
        "error": f"{type(err).__name__}: {first}"[:500],
        "traceback": traceback.format_exc()[-2500:],
    }


def free_memory(env: Env) -> None:
    """Collect garbage and return cached device memory (after a failure)."""
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()


def rel_err(got: Tensor, want: Tensor) -> float:
    """``max|got - want| / max|want|`` in float64 on the CPU."""
    got = torch.as_tensor(got).detach().to("cpu", torch.float64)
    want = torch.as_tensor(want).detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _call(fn: Callable[[], Any], env: Env) -> tuple[float, int | None, Any]:
    """One call of ``fn``: ``(seconds, peak bytes above what was held before, result)``."""
    gc.collect()
    exact = True
    if env.cuda:
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        before = torch.cuda.memory_allocated(env.device)
    else:
        procmem.release_free_memory()
        before = procmem.rss_bytes()
        exact = procmem.reset_peak_rss()
    start = time.perf_counter()
    with time_limit(env.call_limit):
        out = fn()
        env.sync()
    elapsed = time.perf_counter() - start
    if env.cuda:
        peak: int | None = torch.cuda.max_memory_allocated(env.device) - before
    else:
        peak = max(0, procmem.peak_rss_bytes() - before) if exact else None
    return elapsed, peak, out


def _warning_texts(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    texts: list[str] = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        text = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:300]}"
        if text not in texts:
            texts.append(text)
    return texts[:4]


def format_time(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


Ratio = str | tuple[str, float]


@dataclass
class Group:
    """The rows, checks and notes of one row group, with its time budget (seconds)."""

    name: str
    title: str
    budget_s: float
    env: Env
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def note(self, key: str, value: Any) -> None:
        """A fact about the group (sizes, versions, why an anchor is missing)."""
        self.notes[key] = value
        print(f"  [{self.name}] {key}: {value}")

    def skip_if_spent(self, row: str, library: str = "pushforward") -> bool:
        """Whether the group's budget is spent (then ``row`` is recorded as skipped)."""
        if self.remaining() > 0:
            return False
        reason = f"the group's time budget ({self.budget_s:.0f} s) was spent"
        self._add({"row": row, "library": library, "status": "skipped", "error": reason})
        return True

    def fail(
        self, row: str, err: BaseException, library: str = "pushforward", **extra: Any
    ) -> None:
        """Record ``row`` as failed with ``err`` (e.g. its setup raised)."""
        self._add({"row": row, "library": library, **extra, **describe_error(err)})
        free_memory(self.env)

    def skip(self, row: str, reason: str, library: str = "pushforward") -> None:
        """Record ``row`` as not run, with the reason."""
        self._add({"row": row, "library": library, "status": "skipped", "error": reason})

    def time(
        self,
        row: str,
        fn: Callable[[], Any],
        *,
        library: str = "pushforward",
        ratio_to: Sequence[Ratio] = (),
        info: dict[str, Any] | None = None,
        once: bool = False,
        repeats: int | None = None,
    ) -> Any:
        """Time ``fn`` (see the module docstring) and return its last result (``None`` on failure).

        ``ratio_to``: rows of this group (or ``(row, multiple)``) whose median time this row's is
        divided by (``multiple`` times that row's time), recorded under ``ratios``. ``once``: one
        call only (recorded as cold). ``repeats``: warm calls at most (default ``env.repeats``).
        """
        if self.skip_if_spent(row, library):
            return None
        entry: dict[str, Any] = {"row": row, "library": library}
        if info:
            entry["info"] = dict(info)
        out = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                first_s, first_peak, out = _call(fn, self.env)
            times: list[float] = []
            peaks: list[int | None] = []
            if not once and first_s <= max(self.remaining(), 0) + self.env.row_seconds:
                cap = min(self.env.row_seconds, max(self.remaining(), first_s))
                most = self.env.repeats if repeats is None else min(repeats, self.env.repeats)
                while len(times) < most and (not times or sum(times) + times[-1] <= cap):
                    out = None
                    t, peak, out = _call(fn, self.env)
                    times.append(t)
                    peaks.append(peak)
            known = [p for p in peaks if p is not None]
            entry |= {
                "status": "ok",
                "time_s": statistics.median(times) if times else first_s,
                "warm": bool(times),
                "times_s": times,
                "first_call_s": first_s,
                "peak_bytes": (max(known) if known else None) if times else first_peak,
                "first_call_peak_bytes": first_peak,
            }
            texts = _warning_texts(caught)
            if texts:
                entry["warnings"] = texts
        except (Exception, CallTimeout) as err:
            out = None
            entry |= describe_error(err)
            free_memory(self.env)
        self._ratios(entry, ratio_to)
        self._add(entry)
        return out

    def _ratios(self, entry: dict[str, Any], ratio_to: Sequence[Ratio]) -> None:
        if entry.get("status") != "ok" or not ratio_to:
            return
        ratios = {}
        for item in ratio_to:
            name, multiple = (item, 1.0) if isinstance(item, str) else item
            ref = self.row(name)
            if ref is None or ref.get("status") != "ok":
                continue
            label = name if multiple == 1 else f"{multiple:g} × {name}"
            ratios[label] = entry["time_s"] / (multiple * ref["time_s"])
        if ratios:
            entry["ratios"] = ratios

    def row(self, name: str) -> dict[str, Any] | None:
        """The last recorded entry of row ``name``."""
        for entry in reversed(self.rows):
            if entry["row"] == name:
                return entry
        return None

    def check(
        self,
        what: str,
        got: Tensor | Callable[[], Tensor] | None,
        want: Tensor | Callable[[], Tensor] | None,
        tol: float | None = None,
    ) -> float | None:
        """Record ``rel_err(got, want)`` (callables evaluated here, guarded); pass when within
        ``tol``. A missing value (its row failed) is recorded as not compared."""
        entry: dict[str, Any] = {"check": what, "tol": tol}
        err = None
        try:
            g = got() if callable(got) else got
            w = want() if callable(want) else want
            if g is None or w is None:
                entry |= {"status": "not compared", "error": "a value is missing (its row failed)"}
            else:
                err = rel_err(g, w)
                ok = tol is None or err <= tol
                entry |= {"rel_err": err, "status": "pass" if ok else "fail"}
        except Exception as exc:
            entry |= describe_error(exc)
        self.checks.append(entry)
        shown = "" if err is None else f" {err:.2e}"
        print(f"  [{self.name}] check {what}:{shown} {entry['status']}")
        return err

    def _add(self, entry: dict[str, Any]) -> None:
        self.rows.append(entry)
        print(f"  [{self.name}] {summary(entry)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "budget_s": self.budget_s,
            "elapsed_s": self.elapsed(),
            "rows": self.rows,
            "checks": self.checks,
            "notes": self.notes,
        }


def summary(entry: dict[str, Any]) -> str:
    """One line: row, library, time, memory, ratios or the error."""
    head = f"{entry['row']} ({entry['library']})"
    if entry.get("status") != "ok":
        return f"{head}: {entry.get('status')}: {entry.get('error', '')}"
    text = f"{head}: {format_time(entry['time_s'])}, {format_bytes(entry['peak_bytes'])}"
    if not entry["warm"]:
        text += " (cold call only)"
    ratios = entry.get("ratios") or {}
    if ratios:
        text += " [" + "; ".join(f"{v:.3g}× {k}" for k, v in ratios.items()) + "]"
    return text
