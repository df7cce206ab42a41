"""Data sets for curvature: re-iterable collections of ``(x, y)`` batches.

A curvature operator passes over its data once per product (every mat-vec of a Lanczos run, for
instance), so the data must be iterable again and again: a ``DataLoader``, a list of batches, any
object whose ``__iter__`` starts afresh. A batch is ``(x, y)`` — ``x`` a tensor, a tuple of
positional tensors or a mapping of keyword arguments (a Hugging Face batch) — or a mapping that
holds the targets under ``target_key`` (``"labels"``) next to the model's keyword arguments.
Tensors are moved to the model's device.

Small data sets are kept after the first complete pass (up to ``cache_bytes`` of tensors, on
the device): products that pass over the data many times (Lanczos) then skip the loader's own
per-example work (a ``TensorDataset`` indexes every example in Python).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pushforward.core.inputs import Inputs

__all__ = ["Batch", "Batches"]


@dataclass(frozen=True)
class Batch:
    """One batch: its position in the data, the model inputs and the targets."""

    index: int
    inputs: Inputs
    y: Tensor


class Batches:
    """The batches of ``data`` (see the module docstring), on ``device``.

    Args:
        data: a re-iterable collection of batches.
        device: where the model is.
        target_key: the targets' key in mapping batches.
        cache_bytes: keep the batches after a complete pass when their tensors take at most this
            many bytes (0: never).
    """

    def __init__(
        self,
        data: Iterable,
        device: torch.device,
        target_key: str = "labels",
        cache_bytes: int = 0,
    ) -> None:
        if isinstance(data, (Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                "data must be a re-iterable collection of (x, y) batches (a DataLoader or a "
                f"list of batches), got {type(data).__name__}"
            )
        if iter(data) is data:
            raise TypeError(
                "data is a one-shot iterator (a generator?): curvature passes over the data once "
                "per product, so pass a DataLoader or a list of batches"
            )
        self.data, self.device, self.target_key = data, torch.device(device), target_key
        self.cache_bytes = cache_bytes
        self._kept: list[Batch] | None = None

    def __iter__(self) -> Iterator[Batch]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[Batch] | None = [] if self.cache_bytes > 0 else None
        size = 0
        for batch in self._batches():
            if kept is not None:
                size += sum(
                    t.numel() * t.element_size() for t in [*batch.inputs.tensors(), batch.y]
                )
                if size <= self.cache_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._kept = kept

    def __len__(self) -> int:
        """The number of batches (when the data says)."""
        return len(self.data)  # type: ignore[arg-type]

    def _batches(self) -> Iterator[Batch]:
        for index, batch in enumerate(self.data):
            x, y = self._split(batch, index)
            inputs = Inputs.from_user(x).map(lambda t: t.to(self.device))
            if not isinstance(y, Tensor):
                raise TypeError(f"batch {index}: targets must be a tensor, got {type(y).__name__}")
            y = y.to(self.device)
            if y.dim() == 0 or y.shape[0] != inputs.batch_size:
                raise ValueError(
                    f"batch {index}: targets of shape {tuple(y.shape)} do not match the batch of "
                    f"{inputs.batch_size} inputs (their first dimension must be the batch)"
                )
            yield Batch(index, inputs, y)

    def _split(self, batch: Any, index: int) -> tuple[Any, Any]:
        if isinstance(batch, Mapping):
            if self.target_key not in batch:
                raise KeyError(
                    f"batch {index} is a mapping without the targets' key {self.target_key!r} "
                    f"(keys {list(batch)}); pass target_key=..."
                )
            x = {k: v for k, v in batch.items() if k != self.target_key}
            return x, batch[self.target_key]
        if isinstance(batch, Sequence) and not isinstance(batch, (str, Tensor)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(
            f"batch {index} must be (x, y) or a mapping with key {self.target_key!r}, got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
        )
