"""Collectives over a ``torch.distributed`` process group, for data-parallel runs.

The library runs data parallel with a replicated model: every rank holds the whole model and a
shard of the data. Curvature sums are summed over the local shard and all-reduced
(:func:`all_reduce_sum`); per-example results are gathered (:func:`gather_rows`).

A ``process_group`` argument is resolved by :func:`resolve_group`:

* ``"auto"`` (the default of every public function): the default group when
  ``torch.distributed`` is initialized and its world size exceeds one, else nothing (a local
  run);
* ``None``: nothing — this process's data only, even inside a distributed run;
* a ``ProcessGroup``: that group (``torch.distributed`` must be initialized).

Tensors travel on the device the backend needs (CUDA for NCCL, CPU otherwise) and come back on
their own device; each call packs its tensors into one buffer per dtype (one collective per
dtype, whatever the number of tensors).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Group",
    "all_reduce_sum",
    "broadcast_bytes",
    "gather_rows",
    "group_min",
    "refuse_late_start",
    "resolve_group",
]

AUTO = "auto"


class Group:
    """A resolved process group: its members' count and this process's rank in it.

    Attributes:
        group: the ``ProcessGroup`` (``None`` in ``torch.distributed`` calls means the default).
        size: ranks in the group.
        rank: this process's rank in the group.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def device(self, like: torch.device) -> torch.device:
        """Where the backend's tensors must be: CUDA for NCCL, else CPU."""
        if dist.get_backend(self.group) == "nccl":
            return (
                like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
            )
        return torch.device("cpu")

    def global_rank(self, rank: int) -> int:
        """The default group's rank of this group's ``rank``."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def __repr__(self) -> str:
        return f"Group(rank {self.rank} of {self.size})"


def resolve_group(process_group: Any = AUTO) -> Group | None:
    """The group to reduce over (see the module docstring); ``None``: a local computation."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(
                f"process_group must be 'auto', None or a torch.distributed ProcessGroup, got "
                f"{process_group!r}"
            )
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return Group(None)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialized "
            "(call torch.distributed.init_process_group first, or pass process_group=None)"
        )
    return Group(process_group)


def refuse_late_start() -> None:
    """Raise when ``torch.distributed`` now runs several processes that ``"auto"`` did not see.

    ``"auto"`` found no process group when it was resolved; summing this rank's data alone would
    be silently wrong.

    Raises:
        RuntimeError: a process group of more than one process is initialized.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "torch.distributed was initialized after this object resolved process_group='auto' "
            "(to a local computation): create it after init_process_group (or the Accelerator), "
            "or pass process_group=None to sum this rank's data alone"
        )


def all_reduce_sum(tensors: list[Tensor], group: Group | None) -> list[Tensor]:
    """The element-wise sums of ``tensors`` over the group's ranks (the same on every rank).

    Without a group, the tensors themselves. Every rank must pass tensors of the same shapes and
    dtypes in the same order: that is checked first (one small collective), and a mismatch raises
    on every rank rather than hanging.
    """
    if group is None or not tensors:
        return list(tensors)
    layout = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    _check_same(layout, group, "the summed tensors' shapes")
    out: list[Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        picked = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        device = group.device(tensors[picked[0]].device)
        flat = torch.cat([tensors[i].reshape(-1).to(device) for i in picked])
        dist.all_reduce(flat, group=group.group)
        start = 0
        for i in picked:
            t = tensors[i]
            out[i] = flat[start : start + t.numel()].reshape(t.shape).to(t.device)
            start += t.numel()
    return out  # type: ignore[return-value]


def group_min(value: int, group: Group | None) -> int:
    """The smallest ``value`` over the group's ranks (``value`` without a group)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=group.device(torch.device("cpu")))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.group)
    return int(t.item())


def broadcast_bytes(data: Tensor, group: Group | None, src: int = 0) -> Tensor:
    """Rank ``src``'s ``uint8`` tensor ``data``, e.g. a generator's state, on every rank.

    ``data`` has the same length on every rank.
    """
    if group is None:
        return data
    t = data.to(group.device(data.device)).clone()
    dist.broadcast(t, src=group.global_rank(src), group=group.group)
    return t.to(data.device)


def gather_rows(rows: Tensor, group: Group | None, root: int | None = None) -> list[Tensor] | None:
    """Every rank's ``rows`` ``(n_rank, *shape)``, in rank order.

    ``n_rank`` may differ between ranks; the trailing shape and dtype may not. The rows are gathered
    on every rank (``root=None``) or on rank ``root`` only (the others get ``None``).
    """
    if group is None:
        return [rows]
    device = group.device(rows.device)
    counts = torch.zeros(group.size, dtype=torch.int64, device=device)
    counts[group.rank] = rows.shape[0]
    dist.all_reduce(counts, group=group.group)
    _check_same([(tuple(rows.shape[1:]), str(rows.dtype))], group, "the gathered rows' shapes")
    most = int(counts.max())
    padded = rows.new_zeros(most, *rows.shape[1:], device=device)
    padded[: rows.shape[0]] = rows.to(device)
    if root is None:
        parts = [torch.empty_like(padded) for _ in range(group.size)]
        dist.all_gather(parts, padded, group=group.group)
    else:
        parts = (
            [torch.empty_like(padded) for _ in range(group.size)] if group.rank == root else None
        )
        dist.gather(padded, parts, dst=group.global_rank(root), group=group.group)
        if parts is None:
            return None
    return [p[: int(c)].to(rows.device) for p, c in zip(parts, counts.tolist(), strict=True)]


def _check_same(layout: list, group: Group, what: str) -> None:
    """Raise on every rank when ``layout`` differs between ranks (one all-gather of a checksum)."""
    mine = zlib.crc32(repr(layout).encode())
    device = group.device(torch.device("cpu"))
    sums = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(group.size)]
    dist.all_gather(sums, torch.tensor([mine], dtype=torch.int64, device=device), group=group.group)
    differ = [r for r, s in enumerate(sums) if int(s) != int(sums[0])]
    if differ:
        raise RuntimeError(
            f"{what} differ between ranks 0 and {differ[0]} (this is rank {group.rank}: "
            f"{_short(layout)}): every rank must run the same model on data of the same "
            "structure (a rank with no examples at all has no K-FAC factors)"
        )


def _short(layout: list) -> str:
    text = repr(layout)
    return text if len(text) < 200 else text[:200] + "..."
