"""Side-by-side comparison of every swapped call with laplace-torch's own result (``--pf-compare``).

A test of laplace-torch's suite that passes shows that its assertions hold with pushforward in
place; it does not show that pushforward was used, nor how close the numbers are (many tests
check shapes or loose tolerances). With ``--pf-compare`` each call that pushforward answers is
also answered by laplace-torch's own code, on the same object and arguments and from the same
random state, and the two results are compared:

* ``accelerate``: ``la(x, pred_type="glm", ...)`` and ``la._glm_predictive_distribution(...)``
  (the GLM moments behind ``functional_samples``/``predictive_samples``) of an accelerated
  object against the same call with the object restored (:func:`restore`, then
  :func:`accelerate` again);
* ``backends``: ``jacobians``, ``last_layer_jacobians``, ``selected_output_jacobians``,
  ``gradients``, ``diag`` and ``full`` of ``PushforwardGGN``/``PushforwardEF`` against the same
  method of a laplace-torch ``CurvlinopsGGN``/``CurvlinopsEF`` built with the same settings
  (``kron`` is laplace-torch's own code in both).

The random state (torch's global generator) is saved before pushforward's call, restored for
laplace-torch's, and left as pushforward's call left it, so the test sees what it would without
the comparison. Calls whose results are random by design in different ways are counted but not
compared: ``link_approx="mc"`` with a ``generator`` (laplace-torch 0.3 ignores the generator).
Results are compared in float64 as ``max |ours - ref| / max(max |ref|, tiny)``; differences above
``tolerance(dtype)`` (of the least precise floating dtype among the results) are recorded as
mismatches with the test id and call.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

TINY = 1e-30
BACKEND_METHODS = (
    "jacobians",
    "last_layer_jacobians",
    "selected_output_jacobians",
    "gradients",
    "diag",
    "full",
)

STATS: dict[str, Any] = {
    "compared": {},
    "not_compared": {},
    "mismatches": [],
    "reference_errors": [],
    "max_rel": {},
}
CURRENT = {"test": None}


def tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between two computations in ``dtype`` (a few hundred
    rounding units: the two sum in different orders)."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 2e-2)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _rel(ours: Any, ref: Any) -> tuple[float, torch.dtype | None, str]:
    """``(relative difference, the least precise floating dtype, description)`` of two results;
    ``inf`` where their structure, shapes or non-finite entries differ."""
    a, b = _tensors(ours), _tensors(ref)
    if len(a) != len(b):
        return float("inf"), None, f"{len(a)} tensors vs laplace-torch's {len(b)}"
    floats = [t.dtype for t in a if t.is_floating_point()]
    dtype = max(floats, key=lambda d: torch.finfo(d).eps) if floats else None
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            what = f"shape {tuple(x.shape)} vs laplace-torch's {tuple(y.shape)}"
            return float("inf"), dtype, what
        x, y = x.detach().double(), y.detach().double()
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return float("inf"), dtype, "non-finite entries differ"
        x, y = torch.nan_to_num(x), torch.nan_to_num(y)
        scale = max(y.abs().max().item() if y.numel() else 0.0, TINY)
        diff = (x - y).abs().max().item() if y.numel() else 0.0
        worst = max(worst, diff / scale)
    return worst, dtype, str(dtype).replace("torch.", "")


def _record(kind: str, ours: Any, ref: Any, call: str) -> None:
    rel, dtype, what = _rel(ours, ref)
    STATS["compared"][kind] = STATS["compared"].get(kind, 0) + 1
    if rel != float("inf"):
        key = f"{kind} ({what})"
        STATS["max_rel"][key] = max(STATS["max_rel"].get(key, 0.0), rel)
    if rel > tolerance(dtype):
        STATS["mismatches"].append(
            {"test": CURRENT["test"], "kind": kind, "call": call, "rel": rel, "detail": what}
        )


def _skip(kind: str, why: str) -> None:
    key = f"{kind}: {why}"
    STATS["not_compared"][key] = STATS["not_compared"].get(key, 0) + 1


@contextlib.contextmanager
def _same_randomness() -> Iterator[Callable[[], None]]:
    """Run pushforward's call, then (``rewind()``) laplace-torch's from the same random state;
    afterwards the state is the one pushforward's call left."""
    start = torch.get_rng_state()
    box: dict[str, torch.Tensor] = {}

    def rewind() -> None:
        box["after"] = torch.get_rng_state()
        torch.set_rng_state(start)

    try:
        yield rewind
    finally:
        if "after" in box:
            torch.set_rng_state(box["after"])


def _describe(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        return repr(v) if not callable(v) else getattr(v, "__name__", "fn")

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)[:300]


# -- accelerate ------------------------------------------------------------------------------
def audit_accelerated(cls: type) -> None:
    """Wrap ``__call__`` and ``_glm_predictive_distribution`` of an accelerated class (made by
    pushforward's ``accelerate``; once per class)."""
    if cls.__dict__.get("_pf_audited"):
        return
    from pushforward.laplace_interop import accelerate, restore

    ours_call = cls.__call__
    ours_moments = cls._glm_predictive_distribution

    def reference(self: Any, method: str, args: tuple, kwargs: dict) -> Any:
        restore(self)
        try:
            return getattr(self, method)(*args, **kwargs)
        finally:
            accelerate(self)

    @functools.wraps(ours_call)
    def call(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        bound = _call_arguments(args, kwargs)
        pred_type = _value(bound["pred_type"])
        if pred_type != "glm":
            return ours_call(self, x, *args, **kwargs)
        if _value(bound["link_approx"]) == "mc" and bound["generator"] is not None:
            _skip("la(x) glm", "link_approx='mc' with a generator")
            return ours_call(self, x, *args, **kwargs)
        with _same_randomness() as rewind:
            ours = ours_call(self, x, *args, **kwargs)
            rewind()
            try:
                ref = reference(self, "__call__", (x, *args), kwargs)
            except Exception as e:
                STATS["reference_errors"].append(
                    {"test": CURRENT["test"], "kind": "la(x) glm", "error": repr(e)[:300]}
                )
                return ours
        _record("la(x) glm", ours, ref, _describe((x, *args), kwargs))
        return ours

    @functools.wraps(ours_moments)
    def moments(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _same_randomness() as rewind:
            ours = ours_moments(self, *args, **kwargs)
            rewind()
            try:
                ref = reference(self, "_glm_predictive_distribution", args, kwargs)
            except Exception as e:
                STATS["reference_errors"].append(
                    {"test": CURRENT["test"], "kind": "glm moments", "error": repr(e)[:300]}
                )
                return ours
        _record("glm moments", ours, ref, _describe(args, kwargs))
        return ours

    cls.__call__ = call
    cls._glm_predictive_distribution = moments
    cls._pf_audited = True


NAMES = ("pred_type", "joint", "link_approx", "n_samples", "diagonal_output", "generator")
DEFAULTS = ("glm", False, "probit", 100, False, None)


def _call_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``la.__call__``'s arguments after ``x`` by name (laplace-torch 0.3's order)."""
    bound = dict(zip(NAMES, DEFAULTS, strict=True))
    bound.update(zip(NAMES, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in bound})
    return bound


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


# -- backends --------------------------------------------------------------------------------
def audit_backends(swap: dict[type, type], patch: Callable[[Any, str, Any], None]) -> None:
    """Wrap the methods of ``PushforwardGGN``/``PushforwardEF`` (the values of ``swap``) that
    they compute themselves; ``swap`` maps laplace-torch's class to ours."""
    for orig, ours in swap.items():
        for name in BACKEND_METHODS:
            method = getattr(ours, name)
            patch(ours, name, _backend_method(orig, name, method))


#: laplace-torch's own backend answering the same calls, per audited backend object (kept out of
#: the object itself, which laplace-torch's serialization tests pickle).
_REFERENCES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _reference_backend(orig: type, backend: Any) -> Any:
    ref = _REFERENCES.get(backend)
    if ref is None or ref.subnetwork_indices is not backend.subnetwork_indices:
        extra = {"stochastic": backend.stochastic} if hasattr(backend, "stochastic") else {}
        ref = orig(
            backend.model,
            backend.likelihood,
            last_layer=backend.last_layer,
            subnetwork_indices=backend.subnetwork_indices,
            dict_key_x=backend.dict_key_x,
            dict_key_y=backend.dict_key_y,
            **extra,
        )
        _REFERENCES[backend] = ref
    return ref


def _backend_method(orig: type, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    kind = f"{orig.__name__}.{name}"

    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _same_randomness() as rewind:
            ours = method(self, *args, **kwargs)
            rewind()
            try:
                ref = getattr(_reference_backend(orig, self), name)(*args, **kwargs)
            except Exception as e:
                STATS["reference_errors"].append(
                    {"test": CURRENT["test"], "kind": kind, "error": repr(e)[:300]}
                )
                return ours
        _record(kind, ours, ref, _describe(args, kwargs))
        return ours

    return wrapped


def summary() -> dict[str, Any]:
    return {
        "compared": STATS["compared"],
        "not_compared": STATS["not_compared"],
        "max_rel": STATS["max_rel"],
        "mismatches": STATS["mismatches"],
        "reference_errors": STATS["reference_errors"],
    }
