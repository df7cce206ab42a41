"""Data-dependent control flow under ``vmap`` over examples: split the batch by branch.

``vmap`` runs one program for all examples, so Python control flow that reads a tensor's value
(``if mask.all():``, ``.item()``) cannot be batched and ``vmap`` refuses it. Often the value is
the same for every example of the batch (Hugging Face's attention-mask helpers ask "is nothing
padded?" to pick a faster kernel) — then the program *is* the same for all of them, and the value
can be answered. :func:`vmap_examples` runs ``vmap`` with a torch-function mode that answers a
Python ``bool``/``item`` of a value batched over the examples when all examples agree; when they
do not, the batch is split into groups of examples that agree, each group runs on its own
(recursively: a later branch may split a group again), and the results are put back in order.
Every example runs exactly the branch it would run alone: the examples are independent (checked
by :meth:`~pushforward.FunctionalModel.check_examples`), so splitting the batch changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._C._functorch as functorch
from torch import Tensor
from torch.func import vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["DivergentBranch", "vmap_examples"]

#: The Tensor methods that read a value into Python.
_READS = {
    Tensor.__bool__: bool,
    Tensor.item: lambda t: t.item(),
    Tensor.__int__: int,
    Tensor.__float__: float,
    Tensor.__index__: int,
}


class DivergentBranch(RuntimeError):
    """Examples of a ``vmap`` batch read different values into Python control flow.

    Attributes:
        values: the value each example read (a list, one per example).
    """

    def __init__(self, values: list[Any]) -> None:
        super().__init__(f"examples take different branches ({len(set(values))} distinct values)")
        self.values = values


class _UniformReads(TorchFunctionMode):
    """Answer value reads of tensors batched at vmap level ``level`` that agree across examples.

    A read whose value is the same for every example is answered with it; otherwise
    :class:`DivergentBranch` is raised.
    """

    def __init__(self) -> None:
        super().__init__()
        self.level: int | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = _READS.get(func)
        if read is None or self.level is None or not args:
            return func(*args, **kwargs)
        t = args[0]
        while isinstance(t, Tensor) and functorch.is_gradtrackingtensor(t):
            t = functorch.get_unwrapped(t)  # a value read sees through autograd's wrappers
        if not (
            isinstance(t, Tensor)
            and functorch.is_batchedtensor(t)
            and functorch.maybe_get_level(t) == self.level
        ):
            return func(*args, **kwargs)
        physical = functorch.get_unwrapped(t)
        while functorch.is_gradtrackingtensor(physical):  # vmap inside a grad transform
            physical = functorch.get_unwrapped(physical)
        if functorch.is_batchedtensor(physical):
            return func(*args, **kwargs)  # batched at other levels too: vmap's own error
        per_example = physical.movedim(functorch.maybe_get_bdim(t), 0)
        if per_example[0].numel() != 1:
            return func(*args, **kwargs)  # a multi-element read: torch's own error
        values = [read(v) for v in per_example.reshape(per_example.shape[0])]
        if all(v == values[0] for v in values):
            return values[0]
        raise DivergentBranch(values)


def vmap_examples(fn: Callable[..., Any], inputs: Sequence[Any]) -> Any:
    """``vmap(fn)(*inputs)`` over dim 0 of every input, with data-dependent Python branches.

    ``inputs`` are tensors or pytrees of them. Value reads in Python control flow are answered per
    group of examples that agree (see the module docstring). ``fn`` sees one example per call, as
    under ``vmap``; the result is a pytree of tensors batched along dim 0, in the examples' order
    (differentiable).
    """
    mode = _UniformReads()

    def one(*args: Any) -> Any:
        leaves = [t for t in tree_flatten(args)[0] if isinstance(t, Tensor)]
        batched = [t for t in leaves if functorch.is_batchedtensor(t)]
        mode.level = functorch.maybe_get_level(batched[0]) if batched else None
        return fn(*args)

    try:
        with mode:
            return vmap(one, randomness="error")(*inputs)
    except DivergentBranch as split:
        groups: dict[Any, list[int]] = {}
        for i, v in enumerate(split.values):
            groups.setdefault(v, []).append(i)
        order = [i for idx in groups.values() for i in idx]
        parts = []
        for idx in groups.values():
            index = torch.tensor(idx)
            parts.append(vmap_examples(fn, [_take(x, index) for x in inputs]))
        leaves = [tree_flatten(p)[0] for p in parts]
        spec = tree_flatten(parts[0])[1]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        merged = [
            torch.cat(column).index_select(0, inverse.to(column[0].device))
            for column in zip(*leaves, strict=True)
        ]
        return tree_unflatten(merged, spec)


def _take(x: Any, index: Tensor) -> Any:
    """Examples ``index`` of every tensor in the pytree ``x``."""
    leaves, spec = tree_flatten(x)
    taken = [t.index_select(0, index.to(t.device)) if isinstance(t, Tensor) else t for t in leaves]
    return tree_unflatten(taken, spec)
