"""Batches of a data set and the shards of a data-parallel run.

What is read here: one batch, and what a ``DataLoader``'s ``DistributedSampler`` says about the
examples of this rank.

* :func:`split_batch` — the one reader of a batch: ``x``, ``(x,)``, ``(x, y)``, or a mapping
  holding the model's keyword arguments and (for a loss) the targets under a key;
* :func:`distributed_sampler`, :func:`real_examples` — the sampler of a loader and how many of
  its examples for this rank are not the padding a ``drop_last=False`` sampler repeats;
* :func:`refuse_accelerate_shards` — accelerate's prepared loaders pad with repeated examples
  that cannot be told apart, so they are refused in runs of several processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["distributed_sampler", "real_examples", "refuse_accelerate_shards", "split_batch"]


def split_batch(
    batch: Any, target_key: str = "labels", *, targets: bool = True, index: int | None = None
) -> tuple[Any, Any]:
    """``(x, y)`` of one batch.

    The batch is ``(x, y)``, or a mapping with the targets under ``target_key`` (the rest are the
    model's keyword arguments). Without ``targets`` (an evaluation batch) also ``x`` alone or
    ``(x,)``, and ``y`` may be missing (``None``).

    Raises:
        TypeError / KeyError: a batch of another form, naming it (and its position ``index``).
    """
    where = "a batch" if index is None else f"batch {index}"
    if isinstance(batch, Mapping):
        if target_key not in batch and targets:
            raise KeyError(
                f"{where} is a mapping without the targets' key {target_key!r} (keys "
                f"{list(batch)}); pass target_key=..."
            )
        x = {k: v for k, v in batch.items() if k != target_key}
        return x, batch.get(target_key)
    if not targets and isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, Tensor)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if not targets and len(batch) == 1:
            return batch[0], None
    forms = f"(x, y) or a mapping with key {target_key!r}"
    if not targets:
        forms = f"x, (x,), {forms}"
    raise TypeError(
        f"{where} must be {forms}, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
    )


def distributed_sampler(data: Any) -> DistributedSampler | None:
    """The ``DistributedSampler`` a ``DataLoader`` draws its examples from, if any."""
    if not isinstance(data, DataLoader):
        return None
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def refuse_accelerate_shards(data: Any) -> None:
    """Raise for a ``DataLoader`` prepared by accelerate (in a run of several processes)."""
    if type(data).__module__.split(".")[0] == "accelerate":
        raise TypeError(
            "data is a DataLoader prepared by accelerate, which shards batches itself and pads "
            "the last ones with repeated examples that cannot be told apart: build the "
            "DataLoader with a torch DistributedSampler(dataset, "
            "num_replicas=accelerator.num_processes, rank=accelerator.process_index) and pass "
            "it without accelerator.prepare"
        )


def real_examples(sampler: DistributedSampler) -> int:
    """How many of the sampler's examples for its rank come first and are not padding.

    A ``drop_last=False`` sampler pads the shards to equal length by repeating examples, which then
    come last in some shards.
    """
    if sampler.drop_last:
        return sampler.num_samples
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]
