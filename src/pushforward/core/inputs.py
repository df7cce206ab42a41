"""Model inputs: a tensor, a tuple of tensors, or a mapping passed as keyword arguments.

Every tensor in the input is batched along its first dimension (the *batch* of independent
examples); anything that is not a tensor (flags, ``None``, configuration) is passed through
unchanged. :class:`Inputs` normalizes the three forms, slices batches into chunks and
rebuilds per-example calls for ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Inputs"]


@dataclass(frozen=True)
class Inputs:
    """Normalized model inputs ``model(*args, **kwargs)``.

    Attributes:
        args: positional arguments (tensors batched along dim 0, or static values).
        kwargs: keyword arguments (same convention).
        batch_size: size of dim 0 shared by every tensor.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    batch_size: int

    @classmethod
    def from_user(cls, x: Any) -> Inputs:
        """Normalize ``x`` into positional and keyword arguments.

        ``x`` is a tensor, a tuple/list of positional arguments, or a mapping (e.g. a Hugging Face
        ``BatchEncoding``) of keyword arguments.
        """
        if isinstance(x, Inputs):
            return x
        if isinstance(x, Tensor):
            if x.dim() == 1:
                raise ValueError(
                    f"x has shape {tuple(x.shape)}: one dimension cannot say which is the batch. "
                    f"A batch of {x.shape[0]} scalar inputs is x[:, None] (shape "
                    f"({x.shape[0]}, 1)); one example with {x.shape[0]} features is x[None] "
                    f"(shape (1, {x.shape[0]}))"
                )
            args, kwargs = (x,), {}
        elif isinstance(x, Mapping):
            args, kwargs = (), dict(x.items())
        elif isinstance(x, Sequence) and not isinstance(x, str):
            args, kwargs = tuple(x), {}
        else:
            raise TypeError(
                f"inputs must be a tensor, a tuple of tensors or a mapping of keyword "
                f"arguments, got {type(x).__name__}"
            )
        sizes = {
            name: value.shape[0] if value.dim() > 0 else None
            for name, value in _named_tensors(args, kwargs)
        }
        if not sizes:
            raise ValueError("inputs contain no tensor: cannot tell the batch size")
        distinct = set(sizes.values())
        if None in distinct or len(distinct) != 1:
            raise ValueError(
                "every input tensor must be batched along its first dimension with the same "
                f"batch size; got first-dimension sizes {sizes}"
            )
        batch_size = distinct.pop()
        if batch_size == 0:
            raise ValueError(
                f"x is an empty batch (batch size 0, tensors {sizes}); pass at least one example"
            )
        return cls(args, kwargs, batch_size)

    # -- tensor leaves ---------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """The batched tensors, in a fixed order (positional first, then keywords)."""
        return [value for _, value in _named_tensors(self.args, self.kwargs)]

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of the batched tensors (``"args[0]"``, a keyword), as :meth:`tensors`."""
        return list(_named_tensors(self.args, self.kwargs))

    def with_tensors(self, tensors: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` with the batched tensors replaced by ``tensors`` (same order)."""
        it = iter(tensors)
        args = tuple(next(it) if isinstance(a, Tensor) else a for a in self.args)
        kwargs = {k: next(it) if isinstance(v, Tensor) else v for k, v in self.kwargs.items()}
        return args, kwargs

    def map(self, fn) -> Inputs:
        """Apply ``fn`` to every batched tensor; the batch size is read from the result."""
        new = [fn(t) for t in self.tensors()]
        args, kwargs = self.with_tensors(new)
        return Inputs(args, kwargs, new[0].shape[0])

    def slice(self, start: int, stop: int) -> Inputs:
        """Examples ``start:stop`` of the batch."""
        return self.map(lambda t: t[start:stop])

    def take(self, index: Sequence[int]) -> Inputs:
        """Examples ``index`` of the batch, in that order."""
        return self.map(lambda t: t[torch.as_tensor(index, dtype=torch.long, device=t.device)])

    def describe(self) -> str:
        """The batched tensors' names, shapes and dtypes, e.g. ``"x: (5, 3) float64"``.

        A lone tensor is ``x``, positional ones ``x[i]``, keyword ones ``x['name']``.
        """
        named = list(_named_tensors(self.args, self.kwargs))
        lone = len(named) == 1 and not self.kwargs

        def label(name: str) -> str:
            if lone:
                return "x"
            if name.startswith("args["):
                return "x" + name.removeprefix("args")
            return f"x[{name!r}]"

        return ", ".join(
            f"{label(n)}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in named
        )

    def detach(self) -> Inputs:
        """The same inputs with every tensor detached from autograd."""
        return self.map(Tensor.detach)

    @property
    def device(self) -> torch.device:
        """The device of the first tensor."""
        return self.tensors()[0].device

    def signature(self, with_batch: bool = False) -> tuple:
        """What one example's computation depends on besides the values, as a hashable key.

        Each tensor's shape (without the batch dimension unless ``with_batch``) and dtype, and the
        static arguments (flags, configuration).
        """
        tensors = tuple(
            (tuple(t.shape if with_batch else t.shape[1:]), t.dtype, t.device.type)
            for t in self.tensors()
        )
        static = tuple(
            (name, _static_key(value))
            for name, value in [*enumerate(self.args), *self.kwargs.items()]
            if not isinstance(value, Tensor)
        )
        return tensors, static


def _named_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]):
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            yield f"args[{i}]", a
    for k, v in kwargs.items():
        if isinstance(v, Tensor):
            yield k, v


def _static_key(value: Any) -> Any:
    """A hashable stand-in for a static argument."""
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return value
