"""``torch.einsum`` with its contraction order computed once per equation and shapes.

For three or more operands ``torch.einsum`` asks opt_einsum for the best contraction order on
every call — a Python search that costs milliseconds, far more than the contraction itself for
the small per-chunk tensors of the engine's closed forms. :func:`einsum` caches the order per
``(equation, operand shapes)``; the contraction is the same call PyTorch makes.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import _VF, Tensor

__all__ = ["einsum"]


@functools.lru_cache(maxsize=1024)
def _path(equation: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    if not torch.backends.opt_einsum.is_available() or not torch.backends.opt_einsum.enabled:
        return None
    opt_einsum = torch.backends.opt_einsum.get_opt_einsum()
    path = opt_einsum.contract_path(
        equation, *shapes, shapes=True, optimize=torch.backends.opt_einsum.strategy
    )[0]
    return tuple(itertools.chain.from_iterable(path))


def einsum(equation: str, *operands: Tensor) -> Tensor:
    """``torch.einsum(equation, *operands)``, the contraction order of 3+ operands cached."""
    if len(operands) <= 2:
        return torch.einsum(equation, *operands)
    path = _path(equation, tuple(tuple(t.shape) for t in operands))
    if path is None:
        return torch.einsum(equation, *operands)
    return _VF.einsum(equation, operands, path=list(path))
