"""The flat parameter layout: names, shapes and slices of the parameter vector of size P."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ParamLayout", "match_names"]


def match_names(names: Sequence[str], wanted: Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
    """Match ``wanted`` names or prefixes against ``names``: ``(hits, missing)``.

    ``hits`` are the entries of ``names`` equal to, or under the prefix ``w.`` of, any ``w`` in
    ``wanted`` (``"head"`` matches ``"head.weight"`` and ``"head.bias"``), in the order of
    ``names``; ``missing`` are the entries of ``wanted`` that match nothing.
    """
    wanted = list(wanted)

    def hit(n: str, w: str) -> bool:
        return n == w or n.startswith(w + ".")

    missing = [w for w in wanted if not any(hit(n, w) for n in names)]
    return tuple(n for n in names if any(hit(n, w) for w in wanted)), missing


@dataclass(frozen=True)
class ParamLayout:
    """Parameter tensors ``names`` with ``shapes``, concatenated (row-major) into one vector.

    Attributes:
        names: parameter names in flat order.
        shapes: ``{name: shape}``.
        slices: ``{name: slice}`` of each parameter in the flat vector.
        num_params: P, the flat size.
    """

    names: tuple[str, ...]
    shapes: Mapping[str, torch.Size]
    slices: Mapping[str, slice] = field(init=False, repr=False, compare=False)
    num_params: int = field(init=False)

    def __post_init__(self) -> None:
        if set(self.names) != set(self.shapes) or len(set(self.names)) != len(self.names):
            raise ValueError("layout names and shapes must list the same distinct parameters")
        slices, offset = {}, 0
        for n in self.names:
            size = math.prod(self.shapes[n])
            slices[n] = slice(offset, offset + size)
            offset += size
        object.__setattr__(self, "shapes", {n: torch.Size(self.shapes[n]) for n in self.names})
        object.__setattr__(self, "slices", slices)
        object.__setattr__(self, "num_params", offset)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> ParamLayout:
        """The layout of ``tensors`` ``{name: tensor}``, in their order."""
        return cls(tuple(tensors), {n: t.shape for n, t in tensors.items()})

    def sizes(self) -> list[int]:
        """Each parameter's number of entries, in layout order."""
        return [self.slices[n].stop - self.slices[n].start for n in self.names]

    def sub(self, names: Iterable[str]) -> ParamLayout:
        """The layout of a subset of parameters, kept in this layout's order."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise KeyError(f"unknown parameters {sorted(unknown)}")
        kept = tuple(n for n in self.names if n in wanted)
        return ParamLayout(kept, {n: self.shapes[n] for n in kept})

    def index(self, names: Iterable[str]) -> Tensor:
        """Flat indices of ``names`` (in this layout's order)."""
        return torch.cat(
            [torch.arange(self.slices[n].start, self.slices[n].stop) for n in self.sub(names).names]
        )

    def split(self, vector: Tensor) -> dict[str, Tensor]:
        """``(..., P)`` -> ``{name: (..., *shape)}``."""
        if vector.shape[-1] != self.num_params:
            raise ValueError(
                f"expected trailing size P={self.num_params}, got {tuple(vector.shape)}"
            )
        lead = vector.shape[:-1]
        return {n: vector[..., self.slices[n]].reshape(*lead, *self.shapes[n]) for n in self.names}

    def join(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: (..., *shape)}`` -> ``(..., P)``."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"missing parameters {missing}")
        first = self.names[0]
        lead = tensors[first].shape[: tensors[first].dim() - len(self.shapes[first])]
        parts = []
        for n in self.names:
            t = tensors[n]
            if t.shape != (*lead, *self.shapes[n]):
                raise ValueError(
                    f"tensor for {n!r} has shape {tuple(t.shape)}, expected {(*lead, *self.shapes[n])}"
                )
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)
