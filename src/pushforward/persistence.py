"""Saving and loading fitted posteriors: plain tensors and a small typed header, no code.

::

    pf.save(cov, "posterior.pt")                   # any covariance operator, curvature result...
    cov = pf.load("posterior.pt", model=fm)         # checked against the model's parameters

**The file.** :func:`save` writes, with ``torch.save``, one *envelope*::

    {"format": "pushforward", "format_version": 1, "library_version": "0.1.0",
     "type": "Kronecker",                                  # the registered type name
     "layout": {"names": [...], "shapes": [[...], ...]},   # the parameters it is over, or None
     "state": {...}}                                       # the object's own state

made only of dicts, lists, tuples, strings, numbers, booleans, ``None`` and tensors. An object
nested in a state (an operator inside an operator) is written ``{"type": name, "state": {...}}``
the same way; a dict whose keys are not all strings (or that would read as such a node) is
written ``{"items": [[key, value], ...]}``. Tensors are saved detached, bit for bit and with
their strides (a view of a storage more than twice its size as a copy of its own).

**Loading runs no code from the file.** :func:`load` reads with ``torch.load(...,
weights_only=True)``: PyTorch's restricted unpickler rebuilds tensors and the plain containers
above and refuses anything else, so a file can carry numbers but never code. The object is then
rebuilt by the registered class's ``_from_state`` from those plain values; with ``model=`` the
saved parameter names and shapes are checked against the model's selected parameters first.

**Why ``torch.save`` and not safetensors.** Both can be loaded without running code. PyTorch's
format needs no dependency beyond torch; it stores the nested, typed structure (operators in
operators, layouts, Python numbers, integer index tensors) as it is, with the header and every
tensor of any dtype torch has (bfloat16 included) in one file, where safetensors holds a flat
name -> tensor map with string metadata only (the structure would need a naming scheme and a
JSON header of its own).

**Taking part.** A class is saved by being registered (:func:`register`, as a decorator or a
call) and implementing ``_to_state(self) -> dict`` (plain values, tensors, and registered
objects, which are nested) and the classmethod ``_from_state(cls, state) -> object``; a
``layout`` attribute (:class:`~pushforward.ParamLayout`) is recorded in the envelope. Every
:class:`~pushforward.CovarianceOperator` has a generic implementation from its ``_fields()``.
"""

from __future__ import annotations

import inspect
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TypeVar

import torch
from torch import Tensor, nn

from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.layout import ParamLayout
from pushforward.covariance import (
    BlockDiagonal,
    CovarianceOperator,
    Dense,
    Diagonal,
    Isotropic,
    Kronecker,
    KroneckerEigen,
    KroneckerFactors,
    LowRank,
    LowRankPrecision,
    Marginal,
    PrecisionUpdate,
    Subset,
)
from pushforward.curvature.results import (
    Curvature,
    DenseCurvature,
    DiagonalCurvature,
    KroneckerCurvature,
    LowRankCurvature,
)

__all__ = ["FORMAT_VERSION", "from_state", "load", "register", "save", "to_state"]

#: The envelope format this version writes (and the newest it reads).
FORMAT_VERSION = 1

C = TypeVar("C", bound=type)

_REGISTRY: dict[str, type] = {}
_NAMES: dict[type, str] = {}

#: Keys of a dict that the file reserves for nested objects and escaped dicts.
_OBJECT_KEYS, _ITEMS_KEYS = {"type", "state"}, {"items"}


# -- registry --------------------------------------------------------------------------------
def register(cls: C | str | None = None, name: str | None = None) -> Any:
    """Register a class for :func:`save`/:func:`load` under ``name`` (default: its class name).

    ``@register``, ``@register("Name")``, ``@register(name="Name")`` and ``register(cls,
    "Name")`` all work; the class is returned unchanged. It must implement ``_to_state(self)``
    and the classmethod ``_from_state(cls, state)``. A name belongs to one class (registering
    the same class again, e.g. after a module reload, is allowed).
    """
    if isinstance(cls, str):
        cls, name = None, cls

    def add(cls: C) -> C:
        if not isinstance(cls, type):
            raise TypeError(f"register expects a class, got {type(cls).__name__}")
        for method in ("_to_state", "_from_state"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"{cls.__qualname__} must implement {method} to be registered")
        key = cls.__name__ if name is None else name
        if not isinstance(key, str) or not key:
            raise TypeError(f"a registered name must be a non-empty string, got {key!r}")
        known = _REGISTRY.get(key)
        if known is not None and _qualified(known) != _qualified(cls):
            raise ValueError(f"the type name {key!r} is already registered for {_qualified(known)}")
        _REGISTRY[key] = cls
        _NAMES[cls] = key
        return cls

    return add if cls is None else add(cls)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _name_of(obj: Any) -> str:
    name = _NAMES.get(type(obj))
    if name is None:
        raise TypeError(
            f"cannot save a {type(obj).__qualname__}: its class is not registered "
            "(pushforward.persistence.register, with _to_state and _from_state)"
        )
    return name


def _class_of(name: Any) -> type:
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"the file holds an object of type {name!r}, which no registered class has; known "
            f"types: {sorted(_REGISTRY)} (types of an optional part of pushforward, such as "
            "pushforward.botorch, are registered when that part is imported)"
        )
    return cls


# -- the envelope ------------------------------------------------------------------------------
def to_state(obj: Any) -> dict[str, Any]:
    """The envelope :func:`save` writes for ``obj`` (plain containers and tensors only)."""
    name = _name_of(obj)
    layout = getattr(obj, "layout", None)
    if not isinstance(layout, ParamLayout):  # a tensor's ``layout`` is torch.strided
        layout = getattr(obj, "param_layout", None)
    return {
        "format": "pushforward",
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "type": name,
        "layout": _layout_header(layout) if isinstance(layout, ParamLayout) else None,
        "state": _encode(obj._to_state(), name, {}),
    }


def from_state(state: Mapping[str, Any], *, model: nn.Module | FunctionalModel | None = None):
    """Rebuild the object of an envelope (what :func:`load` does after reading the file).

    With ``model`` (an ``nn.Module``, taken with its trainable parameters, or a
    :class:`~pushforward.FunctionalModel`), the saved parameter names and shapes must be the
    model's selected ones: a mismatch raises ``ValueError`` naming the first differing
    parameter.
    """
    _check_envelope(state)
    if model is not None and state["layout"] is not None:
        _check_layout(state["type"], state["layout"], as_functional_model(model))
    cls = _class_of(state["type"])
    if "model" in inspect.signature(cls._from_state).parameters:  # objects holding a network
        obj = cls._from_state(_decode(state["state"]), model=model)
    else:
        obj = _decode(state["state"], cls)
    if model is not None and state["layout"] is None:
        _check_size(state["type"], obj, as_functional_model(model))
    return obj


def save(obj: Any, f: str | os.PathLike | BinaryIO) -> None:
    """Write ``obj`` to ``f`` as one envelope (see the module docstring).

    Args:
        obj: a registered object (any covariance operator, curvature result, ...).
        f: a path or a binary file; ``torch.load(f, weights_only=True)`` reads it back.
    """
    torch.save(to_state(obj), f)


def load(
    f: str | os.PathLike | BinaryIO,
    *,
    model: nn.Module | FunctionalModel | None = None,
    map_location: Any = None,
) -> Any:
    """Read what :func:`save` wrote and rebuild the object.

    The file is read with ``torch.load(f, weights_only=True)``: no code from the file runs.

    Args:
        f: a path or a binary file.
        model: the model the object belongs to: its selected parameters' names and shapes must
            be the saved ones (``ValueError`` naming the first that differs).
        map_location: as for ``torch.load`` (e.g. ``"cpu"``).

    Raises ``ValueError`` for a file that is not a pushforward envelope, that a newer version
    of pushforward wrote, or that holds anything but plain values and tensors.
    """
    where = f if isinstance(f, (str, os.PathLike)) else "the file"
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{where} is not a pushforward file: it holds objects that only an unrestricted "
            "unpickler would rebuild (running code from the file), which pushforward never "
            f"does ({_first_line(err)})"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(
            f"{where} could not be read by torch.load ({type(err).__name__}: {_first_line(err)}); "
            "pushforward.load reads what pushforward.save wrote"
        ) from err
    return from_state(state, model=model)


def _check_envelope(state: Any) -> None:
    if not isinstance(state, Mapping) or state.get("format") != "pushforward":
        raise ValueError(
            "not a pushforward envelope (no format='pushforward' header); pushforward.load "
            "reads what pushforward.save wrote"
        )
    version = state.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"a pushforward envelope with an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"written by a newer pushforward ({state.get('library_version')!r}, format_version "
            f"{version}); this version ({_library_version()}) reads format_version "
            f"<= {FORMAT_VERSION}: upgrade pushforward to load it"
        )
    missing = [k for k in ("type", "layout", "state") if k not in state]
    if missing:
        raise ValueError(f"a pushforward envelope without {missing}")


def _layout_header(layout: ParamLayout) -> dict[str, list]:
    return {
        "names": list(layout.names),
        "shapes": [[int(d) for d in layout.shapes[n]] for n in layout.names],
    }


def _check_layout(kind: str, header: Mapping[str, Any], fm: FunctionalModel) -> None:
    names, shapes = list(header["names"]), [tuple(s) for s in header["shapes"]]
    ours = fm.layout
    hint = (
        "; was it saved for another model or another params= selection? pass the "
        "FunctionalModel it was fitted with"
    )
    for i, (saved, mine) in enumerate(zip(names, ours.names, strict=False)):
        if saved != mine:
            raise ValueError(
                f"the saved {kind} does not fit this model: its parameter #{i} is {saved!r}, "
                f"the model's is {mine!r}{hint}"
            )
        if shapes[i] != tuple(ours.shapes[mine]):
            raise ValueError(
                f"the saved {kind} does not fit this model: parameter {mine!r} has shape "
                f"{shapes[i]} in the file and {tuple(ours.shapes[mine])} in the model{hint}"
            )
    if len(names) != len(ours.names):
        extra = names[len(ours.names) :] or list(ours.names[len(names) :])
        side = "the file" if len(names) > len(ours.names) else "the model"
        raise ValueError(
            f"the saved {kind} does not fit this model: the file has {len(names)} parameters, "
            f"the model selects {len(ours.names)}; parameter {extra[0]!r} is only in {side}"
            f"{hint}"
        )


def _check_size(kind: str, obj: Any, fm: FunctionalModel) -> None:
    """An object saved without a layout (an unbound operator or curvature) must at least have P."""
    size = None
    if isinstance(obj, CovarianceOperator):
        size = getattr(obj, "_num_params", None)
    elif isinstance(obj, Curvature):
        size = obj.size
    if size is not None and size != fm.num_params:
        raise ValueError(
            f"the saved {kind} has size P={size}, but the model's selected parameters have "
            f"P={fm.num_params}"
        )


def _library_version() -> str:
    """``pushforward.__version__`` (the package is imported whenever this module is)."""
    version = getattr(sys.modules.get("pushforward"), "__version__", None)
    return version if isinstance(version, str) else "unknown"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


# -- plain values ------------------------------------------------------------------------------
def _encode(value: Any, path: str, memo: dict[int, Tensor]) -> Any:
    """``value`` as plain containers and tensors.

    Registered objects are nested as ``{"type", "state"}``; ``memo`` keeps one copy of a tensor
    met twice.
    """
    if isinstance(value, Tensor):
        found = memo.get(id(value))
        if found is None:
            found = memo[id(value)] = _compact(value)
        return found
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, int):  # subclasses (an IntEnum, ...) as the plain value
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, torch.dtype):
        return {"type": "torch.dtype", "state": str(value).removeprefix("torch.")}
    if isinstance(value, ParamLayout):
        return {"type": "ParamLayout", "state": _layout_header(value)}
    if type(value) in _NAMES:
        name = _NAMES[type(value)]
        return {"type": name, "state": _encode(value._to_state(), f"{path}.{name}", memo)}
    if isinstance(value, Mapping):
        plain = all(type(k) is str for k in value) and set(value) not in (_OBJECT_KEYS, _ITEMS_KEYS)
        if plain:
            return {k: _encode(v, f"{path}[{k!r}]", memo) for k, v in value.items()}
        return {
            "items": [
                [_encode(k, f"{path} key", memo), _encode(v, f"{path}[{k!r}]", memo)]
                for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):  # torch.Size and named tuples are written as plain tuples
        return tuple(_encode(v, f"{path}[{i}]", memo) for i, v in enumerate(value))
    if isinstance(value, list):
        return [_encode(v, f"{path}[{i}]", memo) for i, v in enumerate(value)]
    raise TypeError(
        f"cannot save a {type(value).__qualname__} (at {path}): a state holds tensors, dicts, "
        "lists, tuples, strings, numbers, booleans, None and registered objects only"
    )


def _compact(t: Tensor) -> Tensor:
    """``t`` detached, and compact where that changes its file size.

    A view of a storage more than twice its size is copied (``torch.save`` writes a view's
    whole storage); any other tensor is saved as it is, strides and all, so that products of
    the loaded tensors round exactly as before.
    """
    t = t.detach()
    if t.untyped_storage().nbytes() <= 2 * t.numel() * t.element_size():
        return t
    return t.clone()


_BUILTIN: dict[str, Callable[[Any], Any]] = {
    "ParamLayout": lambda s: ParamLayout(
        tuple(s["names"]),
        {n: torch.Size(shape) for n, shape in zip(s["names"], s["shapes"], strict=True)},
    ),
    "torch.dtype": lambda s: _dtype(s),
}


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the file names an unknown torch dtype {name!r}")
    return dtype


def _decode(value: Any, cls: type | None = None) -> Any:
    """The inverse of :func:`_encode`; with ``cls``, ``value`` is that class's state."""
    if cls is not None:
        return cls._from_state(_decode(value))
    if isinstance(value, dict):
        keys = set(value)
        if keys == _OBJECT_KEYS:
            kind = value["type"]
            if kind in _BUILTIN:
                return _BUILTIN[kind](value["state"])
            return _decode(value["state"], _class_of(kind))
        if keys == _ITEMS_KEYS:
            return {_decode(k): _decode(v) for k, v in value["items"]}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    return value


for _operator in (
    BlockDiagonal,
    Dense,
    Diagonal,
    Isotropic,
    Kronecker,
    KroneckerEigen,
    KroneckerFactors,
    LowRank,
    LowRankPrecision,
    Marginal,
    PrecisionUpdate,
    Subset,
):
    register(_operator)

for _curvature in (DenseCurvature, DiagonalCurvature, KroneckerCurvature, LowRankCurvature):
    register(_curvature)
