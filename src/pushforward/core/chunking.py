"""Chunk schedules over (example, row) pairs, and optional progress bars.

Reverse-mode work is organized as *rows*: one row is one P-vector ``J(x_b)^T u`` for one
example ``b`` and one cotangent ``u``. A chunk holds at most ``chunk_size`` rows: several whole
examples when an example has few rows, or a slice of one example's rows when it has many.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["RowChunk", "progress_bar", "row_chunks", "spans"]

T = TypeVar("T")


@dataclass(frozen=True)
class RowChunk:
    """Examples ``samples`` (a slice of the batch), rows ``rows`` of each of them."""

    samples: slice
    rows: slice


def row_chunks(
    batch_size: int, rows_per_sample: int, chunk_size: int, group_size: int = 1
) -> list[RowChunk]:
    """Cover ``batch_size x rows_per_sample`` rows with chunks of at most ``chunk_size`` rows.

    Chunks come in order and hold at least one row each. With ``group_size = q > 1`` the batch is
    read as groups of ``q`` consecutive examples: a chunk holds whole groups when a group's rows
    fit, and never crosses from one group into the next otherwise (a joint covariance within groups
    needs all rows of a group together).
    """
    chunk_size = max(1, int(chunk_size))
    if rows_per_sample <= 0 or batch_size <= 0:
        return []
    q = max(1, int(group_size))
    if q > 1 and q * rows_per_sample <= chunk_size:
        per = chunk_size // (q * rows_per_sample) * q
        return [
            RowChunk(slice(b, min(b + per, batch_size)), slice(0, rows_per_sample))
            for b in range(0, batch_size, per)
        ]
    if rows_per_sample <= chunk_size:
        per = max(1, chunk_size // rows_per_sample)
        span = q if q > 1 else batch_size  # chunks stay inside one group
        return [
            RowChunk(slice(b, min(b + per, g + span, batch_size)), slice(0, rows_per_sample))
            for g in range(0, batch_size, span)
            for b in range(g, min(g + span, batch_size), per)
        ]
    return [
        RowChunk(slice(b, b + 1), slice(r, min(r + chunk_size, rows_per_sample)))
        for b in range(batch_size)
        for r in range(0, rows_per_sample, chunk_size)
    ]


def spans(total: int, size: int) -> list[slice]:
    """``[0, total)`` in consecutive slices of at most ``size`` (at least 1) items."""
    size = max(1, int(size))
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def progress_bar(
    items: Iterable[T], enabled: bool, desc: str, total: int | None = None
) -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled`` (tqdm is an optional dependency)."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("progress=True needs tqdm: pip install 'pushforward[progress]'") from err
    yield from tqdm(items, desc=desc, total=total, leave=False)
