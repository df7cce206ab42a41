"""The C heap under PyTorch's CPU tensors: large buffers reused across calls, not faulted in again.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc's ``malloc`` hands a block
larger than its *mmap threshold* (128 KiB at start) to the kernel as a fresh mapping, and gives
the top of its heap back to the kernel once more than its *trim threshold* of it is free. Every
page the kernel hands out again is zeroed and faulted in on first touch. A data pass or a
repeated call allocates and frees the same few megabyte-sized buffers (the rows of a chunk,
their squares) again and again: with the starting thresholds the kernel maps, faults, zeroes and
unmaps them every time — a third of an MLP's curvature pass was spent in the kernel.

glibc raises both thresholds by itself, once a mapped block larger than the current threshold
is freed (to that block's size, at most 32 MiB; the trim threshold to twice that). A process
that has never freed such a block keeps the starting ones. :func:`settle_heap` frees one such
block once per process — the very adjustment glibc makes on its own, done before the first
call rather than by chance — so later buffers up to 32 MiB come from the heap and stay there.
The cost: up to 64 MiB of freed memory the process may keep instead of returning it. Where the
thresholds were set by hand (``mallopt``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``)
glibc adjusts nothing and neither does this; without glibc (macOS, musl, Windows) it does
nothing. ``pushforward.settings(settle_heap=False)`` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import sys
import threading

from pushforward.core.settings import settings

__all__ = ["settle_heap"]

#: glibc's ceiling for its dynamic mmap threshold on 64-bit systems
#: (``DEFAULT_MMAP_THRESHOLD_MAX``).
_CEILING = 32 * 2**20
#: The block freed: just under the ceiling (with glibc's header and page rounding), so that the
#: threshold rises to about 32 MiB.
_BLOCK = _CEILING - 2**16

_lock = threading.Lock()
_settled = False


def settle_heap() -> None:
    """Raise glibc's dynamic mmap and trim thresholds once per process (see the module docstring).

    Cheap after the first call; a no-op without glibc or with ``settings(settle_heap=False)``.
    """
    global _settled
    if _settled or not settings.current().settle_heap:
        return
    with _lock:
        if _settled:
            return
        _settled = True
        libc = _glibc()
        if libc is None:
            return
        block = libc.malloc(_BLOCK)  # a fresh mapping, never touched: no page is faulted in
        if block:
            libc.free(block)  # unmapped; glibc raises its thresholds to its size


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the one with dynamic thresholds), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: no library search, no subprocess
        libc.gnu_get_libc_version  # noqa: B018 — only glibc has it
    except (OSError, AttributeError):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    return libc
