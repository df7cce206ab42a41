"""The live peak of a computation: the most bytes its own tensors hold at one time.

A forward-mode product keeps only what is still needed at each step, the primal values and
their tangents side by side, and not the activations autograd saves for a backward. Its memory
follows the forward's *live* tensors. For a deep network (a language model's 22 blocks, say),
these are a few blocks' worth, a small part of the saved activations.

:func:`live_peak_bytes` runs a function under a dispatch mode that sees every tensor an
operation creates. It adds a new storage's bytes when the storage appears and subtracts them
when it is freed (a finalizer on the storage). Storages given as ``known`` (parameters, buffers,
inputs) and views of them are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["live_peak_bytes"]


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages the operations create while they are alive."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known = known  # storages not counted (addresses)
        self.live = self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.known.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.known:  # a view, an in-place result, an input
                continue
            self.known.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def live_peak_bytes(fn: Callable[[], Any], known: Iterable[Tensor]) -> int | None:
    """The most bytes the tensors ``fn()`` creates hold at one time, without gradients.

    Args:
        fn: the computation (e.g. a one-example forward).
        known: tensors whose storages are not counted (parameters, buffers, inputs).

    Returns:
        The peak in bytes, the result included, or ``None`` when it cannot be measured here:
        tensors without storage (``meta``, subclasses), or ``fn`` failing under the dispatch
        mode. The caller then keeps its coarser figure.
    """
    known = list(known)
    if any(t.device.type == "meta" or type(t) not in (Tensor, nn.Parameter) for t in known):
        return None
    mode = _LiveBytes({t.untyped_storage().data_ptr() for t in known})
    try:
        with torch.no_grad(), mode:
            out = fn()
            del out
    except Exception:  # a measurement only: the caller keeps its figure
        return None
    return mode.peak
