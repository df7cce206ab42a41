"""Library-wide tunables, set for a block of code (in the style of linear_operator's settings).

::

    with pushforward.settings(chunk_target="32MB", plan_cache=0):
        f, var = pushforward.functional_variance(model, x, cov)

    pushforward.settings.set_default(budget_fraction=0.25)   # for the whole process
    pushforward.settings.current()                           # the values in force here

``print(plan)`` shows the values a plan was made with. The settings are read when a plan is
made; a plan reused from the plan cache was made with the same settings (they are part of its
key).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from pushforward.core.units import format_bytes, parse_bytes

__all__ = ["Settings", "settings"]


@dataclass(frozen=True)
class Settings:
    """The tunables.

    Attributes:
        chunk_target: bytes one chunk of work (rows, tangents, samples) may use on a CPU even
            under a larger memory budget: beyond it larger chunks stop paying off on a CPU's
            caches and only raise the peak. The memory budget caps it from above. A chunk still
            holds at least one example's rows when the budget allows (splitting an example's
            rows over chunks repeats its forward pass).
        gpu_chunk_target: the same on a GPU (any device but the CPU); ``None`` (the default):
            as large as the memory budget allows — a GPU wants the largest chunk that fits (one
            kernel launch for more work), its budget by default a fraction of its free memory.
        traffic: FLOP-equivalents the planner charges per element of a materialized
            parameter-sized vector (a reverse-mode row, a forward-mode tangent): such vectors are
            written, read back and contracted at memory bandwidth, far slower than matmul FLOPs.
        budget_fraction: the default ``memory_budget`` is this fraction of the memory available
            on the device when a plan is made.
        plan_cache: plans kept per model for repeated calls with the same input shapes,
            covariance and options (0 turns the cache off).
        replay: repeated :func:`~pushforward.functional_variance` and per-example
            :func:`~pushforward.functional_covariance` calls on a
            :class:`~pushforward.FunctionalModel` that is a plain chain of linear layers and
            activations replay the captured program (``pushforward.engine.replay``) instead
            of re-checking and re-planning (``False``: every call runs eagerly).
        settle_heap: on Linux with glibc, raise the C heap's dynamic thresholds once per process
            before the first computation (``pushforward.core.heap``), as glibc itself does after
            freeing a large block: the megabyte-sized buffers of repeated calls and data passes
            are then reused instead of returned to the kernel and faulted in again (the process
            may keep up to 64 MiB of freed memory). ``False`` leaves the allocator alone.
    """

    chunk_target: int = 128 * 2**20
    gpu_chunk_target: int | None = None
    traffic: float = 8.0
    budget_fraction: float = 0.5
    plan_cache: int = 64
    replay: bool = True
    settle_heap: bool = True

    def describe(self) -> str:
        """The settings in one line, as ``print(plan)`` shows them."""
        gpu = "the budget" if self.gpu_chunk_target is None else format_bytes(self.gpu_chunk_target)
        return (
            f"chunk target {format_bytes(self.chunk_target)} (CPU) / {gpu} (GPU), traffic "
            f"factor {self.traffic:g}, default budget fraction {self.budget_fraction:g}, plan "
            f"cache {self.plan_cache}, replay {'on' if self.replay else 'off'}"
        )

    def target_for(self, device: torch.device | str | None) -> int | None:
        """The chunk target on ``device`` (``None``: only the budget limits chunks)."""
        if device is None or torch.device(device).type == "cpu":
            return self.chunk_target
        return self.gpu_chunk_target


_DEFAULT = Settings()
_CURRENT: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "pushforward_settings", default=None
)


def _validated(base: Settings, overrides: dict[str, Any]) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown settings {unknown}; the settings are {sorted(names)}")
    values = dict(overrides)
    if "chunk_target" in values:
        values["chunk_target"] = parse_bytes(values["chunk_target"], "chunk_target")
    if values.get("gpu_chunk_target") is not None:
        values["gpu_chunk_target"] = parse_bytes(values["gpu_chunk_target"], "gpu_chunk_target")
    if "traffic" in values:
        t = values["traffic"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"traffic must be a finite number >= 0, got {t!r}")
        values["traffic"] = float(t)
    if "budget_fraction" in values:
        f = values["budget_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"budget_fraction must be a number in (0, 1], got {f!r}")
        values["budget_fraction"] = float(f)
    if "plan_cache" in values:
        n = values["plan_cache"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"plan_cache must be an integer >= 0, got {n!r}")
    for flag in ("replay", "settle_heap"):
        if flag in values and not isinstance(values[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {values[flag]!r}")
    return dataclasses.replace(base, **values)


class settings:
    """Context manager (and decorator) overriding :class:`Settings` fields in a block.

    Args:
        chunk_target: bytes (or a string like ``"64MB"``) per chunk on a CPU, see
            :class:`Settings`.
        gpu_chunk_target: the same on a GPU (``None``: as large as the budget allows).
        traffic: FLOP-equivalents per element of a parameter-sized vector.
        budget_fraction: default memory budget as a fraction of the available memory.
        plan_cache: plans kept per model (0: off).
        replay: replay repeated variance and per-example covariance calls on plain chains
            (``False``: always eager).
        settle_heap: raise glibc's heap thresholds once per process (``False``: leave the C
            allocator alone), see :class:`Settings`.
    """

    def __init__(self, **overrides: Any) -> None:
        self._overrides = overrides
        _validated(_DEFAULT, overrides)  # fail here, not at __enter__
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> Settings:
        value = _validated(settings.current(), self._overrides)
        self._tokens.append(_CURRENT.set(value))
        return value

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._tokens.pop())

    def __call__(self, fn):
        """Use as a decorator: ``fn`` runs with these settings at every call."""
        import functools

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with settings(**self._overrides):
                return fn(*args, **kwargs)

        return wrapped

    @staticmethod
    def current() -> Settings:
        """The settings in force here (the innermost block's, else the process default)."""
        value = _CURRENT.get()
        return _DEFAULT if value is None else value

    @staticmethod
    def set_default(**overrides: Any) -> Settings:
        """Change the process-wide defaults (what holds outside every ``with settings``)."""
        global _DEFAULT
        _DEFAULT = _validated(_DEFAULT, overrides)
        return _DEFAULT
