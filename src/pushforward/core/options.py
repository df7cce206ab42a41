"""How one computation runs: the options every public function takes, as one value.

The public functions keep their keyword arguments (``strategy=``, ``memory_budget=``,
``differentiable=``, ``progress=``, ``chunk_size=``); they build one :class:`Options` from them
and pass it down, so the engine's signatures carry one value instead of the same five keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pushforward.core.budget import parse_memory
from pushforward.core.cost import Budget

__all__ = ["Options", "check_generator", "check_positive_int"]


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """``value`` as an int, checked to be a positive integer (or ``None`` when allowed).

    Raises:
        TypeError: ``value`` is not an integer (``bool`` included), naming ``name``.
        ValueError: ``value`` is not positive, naming ``name``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def check_generator(generator: Any, device: torch.device) -> None:
    """Raise unless ``generator`` is ``None`` or a ``torch.Generator`` on ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"generator is on {generator.device} but the inputs are on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


@dataclass(frozen=True)
class Options:
    """How one computation runs.

    Attributes:
        strategy: ``"auto"`` (the planner chooses) or a strategy name.
        memory_budget: bytes or a string like ``"2GB"`` bounding the memory a call allocates
            (its result included); ``None``: ``settings.budget_fraction`` of the available
            memory.
        differentiable: keep the autograd graph (gradients to the inputs, the model's parameters
            and the covariance's tensors).
        progress: show tqdm progress bars over chunks.
        chunk_size: at most this many rows/tangents/samples per chunk (``None``: as many as the
            budget and ``settings.chunk_target`` allow).
    """

    strategy: str = "auto"
    memory_budget: int | float | str | None = None
    differentiable: bool = False
    progress: bool = False
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str):
            raise TypeError(f"strategy must be a string, got {type(self.strategy).__name__}")
        for name in ("differentiable", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_positive_int(self.chunk_size, "chunk_size", allow_none=True)
        if self.memory_budget is not None:
            parse_memory(self.memory_budget)  # a clear error now rather than at the first chunk

    def budget_bytes(self, device: torch.device | None = None) -> int:
        """The memory budget in bytes on ``device``."""
        return parse_memory(self.memory_budget, device)

    def budget(self, device: torch.device | None = None) -> Budget:
        """The ``Budget`` (bytes and chunk target) of these options on ``device``."""
        return Budget.of(self.budget_bytes(device), self.chunk_size, device)

    @classmethod
    def resolve(cls, options: Options | None, **keywords: Any) -> Options:
        """``options`` when given, else the keywords as one :class:`Options`.

        This is what the public functions do with their ``options=`` and their individual keywords:
        when ``options`` is given, every keyword must be left at its default.
        """
        if options is None:
            return cls(**keywords)
        if not isinstance(options, Options):
            raise TypeError(f"options must be a pushforward.Options, got {type(options).__name__}")
        default = cls()
        given = sorted(k for k, v in keywords.items() if v != getattr(default, k))
        if given:
            raise ValueError(f"pass either options=... or {given}, not both")
        return options
