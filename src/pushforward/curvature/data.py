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

**Data parallelism.** With a process group (see :mod:`pushforward.core.collectives`), the
batches are this rank's shard and :meth:`Batches.finish` sums what a pass computed over every
rank's shard (the only place curvature sums cross ranks). A ``DataLoader`` must then shard with
a ``DistributedSampler`` of the group's size and rank: one without it would give every rank the
whole data set (counted once per rank), so it is refused. A ``DistributedSampler`` that pads
its shards to equal length (``drop_last=False``) repeats examples at the end of some shards:
those are dropped here, so the union of the shards is the data set, each example once (also
without a group). Other collections (a list of batches, an ``IterableDataset``) are taken as
this rank's shard as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from pushforward.core.collectives import (
    Group,
    all_reduce_sum,
    gather_rows,
    group_min,
    refuse_late_start,
)
from pushforward.core.inputs import Inputs
from pushforward.core.shards import (
    distributed_sampler,
    real_examples,
    refuse_accelerate_shards,
    split_batch,
)

__all__ = ["Batch", "Batches", "check_samplers_agree", "refuse_on_every_rank"]


@dataclass(frozen=True)
class Batch:
    """One batch: its position in the data, the model inputs and the targets.

    Attributes:
        index: the batch's position among every rank's batches when the data is sharded (it
            seeds the batch's Monte Carlo draws), else in the data.
        inputs: the model inputs, on the model's device.
        y: the targets.
    """

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
        group: the process group whose ranks hold the other shards (``None``: all the data is
            here).
        auto: ``group`` was resolved from ``process_group="auto"``: when it is ``None`` and
            ``torch.distributed`` starts several processes later, passes raise instead of
            summing this rank's data alone.

    Every pass is accounted for (:meth:`finish`): a pass over no example at all, or over another
    number of examples than the first pass (data that can be iterated once only — a stream, a
    loader over an ``IterableDataset`` handing out one stored iterator — yields nothing the
    second time), raises instead of giving a curvature of the wrong data.
    """

    def __init__(
        self,
        data: Iterable,
        device: torch.device,
        target_key: str = "labels",
        cache_bytes: int = 0,
        group: Group | None = None,
        auto: bool = False,
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
        self.cache_bytes, self.group = cache_bytes, group
        self._auto_local = auto and group is None
        self.sampler = distributed_sampler(data)
        self._check_sharding()
        self._kept: list[Batch] | None = None
        self._seen = 0  # examples of the pass under way
        self._examples: int | None = None  # of every rank's shard, from the first pass

    def _check_sharding(self) -> None:
        """Refuse a loader that does not shard as the group says — on every rank at once.

        A rank raising alone would leave the others waiting in their first collective.
        """
        group, sampler = self.group, self.sampler
        if group is None or group.size == 1:
            return
        problem = None
        try:
            refuse_accelerate_shards(self.data)
        except TypeError as err:
            problem = str(err)
        unsharded = isinstance(self.data, DataLoader) and sampler is None
        # an IterableDataset shards itself
        if problem is None and unsharded and getattr(self.data, "_dataset_kind", None) != 1:
            problem = (
                f"data is a DataLoader without a DistributedSampler while the curvature is "
                f"summed over {group.size} ranks: every rank would pass over the whole data "
                "set and each example would count once per rank. Use DataLoader(dataset, "
                "sampler=DistributedSampler(dataset)), or process_group=None for this "
                "rank's data alone"
            )
        mismatched = sampler is not None and (sampler.num_replicas, sampler.rank) != (
            group.size,
            group.rank,
        )
        if problem is None and mismatched:
            problem = (
                f"the DistributedSampler shards for rank {sampler.rank} of "
                f"{sampler.num_replicas}, but this process is rank {group.rank} of "
                f"{group.size} in the process group the curvature is summed over"
            )
        refuse_on_every_rank(None if problem is None else ValueError(problem), group)
        check_samplers_agree(sampler, group)

    def finish(self, values: list[Tensor]) -> tuple[list[Tensor], int]:
        """Sum a pass's ``values`` over every rank's shard and count the pass's examples.

        Args:
            values: this shard's sums of the pass just made.

        Returns:
            ``(sums, N)``: ``values`` summed over every rank's shard, and the number of examples of
            the pass over all shards.

        Raises:
            ValueError: the pass saw no example, or another number of examples than the first pass
                (see the class docstring).
        """
        count = torch.tensor([self._seen], dtype=torch.float64, device=self.device)
        *sums, total = all_reduce_sum([*values, count], self.group)
        examples = int(total.item())
        if self._examples is None and examples == 0:
            raise ValueError(
                "the data hold no example (an empty loader, or empty batches): a curvature "
                "needs at least one"
            )
        if self._examples is None:
            self._examples = examples
        elif examples != self._examples:
            raise ValueError(
                f"this pass over the data saw {examples:,} examples, "
                f"{'fewer' if examples < self._examples else 'more'} examples than the first "
                f"pass ({self._examples:,}): the data changed between passes, or can be iterated "
                "once only (a stream, a loader over an IterableDataset handing out one stored "
                "iterator); pass a re-iterable collection (a list of batches, a DataLoader over "
                "a map-style dataset)"
            )
        return sums, examples

    def __iter__(self) -> Iterator[Batch]:
        if self._auto_local:
            refuse_late_start()
        self._seen = 0
        if self._kept is not None:
            for batch in self._kept:
                self._seen += batch.inputs.batch_size
                yield batch
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
            self._seen += batch.inputs.batch_size
            yield batch
        if kept is not None:
            self._kept = kept

    def __len__(self) -> int:
        """The number of batches (when the data says)."""
        return len(self.data)  # type: ignore[arg-type]

    def _batches(self) -> Iterator[Batch]:
        left = None if self.sampler is None else real_examples(self.sampler)
        for index, batch in enumerate(self.data):
            if left == 0:  # only the sampler's padding is left
                break
            x, y = split_batch(batch, self.target_key, index=index)
            inputs = Inputs.from_user(x).map(lambda t: t.to(self.device))
            if not isinstance(y, Tensor):
                raise TypeError(f"batch {index}: targets must be a tensor, got {type(y).__name__}")
            y = y.to(self.device)
            if y.dim() == 0 or y.shape[0] != inputs.batch_size:
                raise ValueError(
                    f"batch {index}: targets of shape {tuple(y.shape)} do not match the batch of "
                    f"{inputs.batch_size} inputs (their first dimension must be the batch)"
                )
            if left is not None:
                if inputs.batch_size > left:
                    inputs, y = inputs.slice(0, left), y[:left]
                left -= inputs.batch_size
            yield Batch(self._global_index(index), inputs, y)

    def _global_index(self, index: int) -> int:
        """A batch's index among every rank's batches.

        It seeds the batch's Monte Carlo draws: the ranks' batches must not share them.
        """
        if self.group is None:
            return index
        return index * self.group.size + self.group.rank


def refuse_on_every_rank(problem: Exception | None, group: Group | None) -> None:
    """Raise ``problem`` (this rank's, or ``None``) here and a ``ValueError`` on the others.

    Together, in one collective: a rank raising alone would leave the others waiting in their
    next collective until the backend's timeout, or failing with the backend's own error
    ("connection closed by peer").
    """
    if group is None or group.size == 1:
        if problem is not None:
            raise problem
        return
    if not group_min(int(problem is None), group):
        if problem is not None:
            raise problem
        raise ValueError(
            "the data of another rank are not sharded as the process group says (its error "
            "names the problem); every rank refuses them"
        )


#: What two ranks' ``DistributedSampler`` must agree on, and how a difference is named.
_SAMPLER_FIELDS = (
    ("examples", "its data set has {} examples"),
    ("num_replicas", "num_replicas={}"),
    ("shuffle", "shuffle={}"),
    ("seed", "seed {}"),
    ("epoch", "epoch {} (set_epoch)"),
    ("drop_last", "drop_last={}"),
)


def check_samplers_agree(sampler: DistributedSampler | None, group: Group | None) -> None:
    """Raise on every rank when the ranks' samplers would not split one data set into shards.

    A ``DistributedSampler`` with another data set size, ``num_replicas``, ``shuffle``, seed,
    epoch or ``drop_last`` on some rank than on the others shuffles or pads differently: the
    shards overlap, and examples would be counted twice or not at all. Ranks without a sampler
    (other collections, taken as their shard as they are) are not compared. One all-gather of
    seven integers per rank.
    """
    if group is None or group.size == 1:
        return
    mine = [-1] * (len(_SAMPLER_FIELDS) + 1)
    if sampler is not None:
        mine = [
            1,
            len(sampler.dataset),  # type: ignore[arg-type]
            sampler.num_replicas,
            int(sampler.shuffle),
            int(sampler.seed),
            int(sampler.epoch),
            int(sampler.drop_last),
        ]
    rows = gather_rows(torch.tensor([mine], dtype=torch.int64), group)
    assert rows is not None  # gathered on every rank
    values = [r[0].tolist() for r in rows]
    with_sampler = [r for r, v in enumerate(values) if v[0] == 1]
    if sampler is None or not with_sampler:
        return
    first = with_sampler[0]
    odd = next((r for r in with_sampler if values[r] != values[first]), None)
    if odd is None:
        return
    me = group.rank

    def describe(rank: int, other: int) -> str:
        """What ``rank``'s sampler has where ``other``'s differs."""
        return ", ".join(
            text.format(bool(v) if name in ("shuffle", "drop_last") else v)
            for (name, text), v, w in zip(
                _SAMPLER_FIELDS, values[rank][1:], values[other][1:], strict=True
            )
            if v != w
        )

    if values[me] != values[first]:
        where = (
            f"this rank's ({me}) DistributedSampler differs from rank {first}'s: "
            f"{describe(me, first)} (rank {first}: {describe(first, me)})"
        )
    else:
        where = (
            f"the DistributedSampler of another rank ({odd}) differs from this rank's ({me}): "
            f"{describe(odd, me)} (this rank: {describe(me, odd)})"
        )
    raise ValueError(
        f"{where}; every rank must shard the same data set with the same num_replicas, shuffle, "
        "seed, epoch and drop_last (only rank= differs), or the shards overlap and examples are "
        "counted twice or not at all"
    )
