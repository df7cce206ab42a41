"""Process memory and machine CPU time read from ``/proc`` (Linux): resident set size, its
high-water mark, sampling, and the machine's busy CPU time (to tell when others compete).

The benchmark measures a timed region's peak resident memory three ways and keeps the largest,
since each is a lower bound of the true peak and the first is exact where it is available:

* the kernel's high-water mark ``VmHWM``, reset to the current RSS right before the region by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and read right after it;
* ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` when it grew during the region (it is a
  process-lifetime maximum, so it says nothing when an earlier phase peaked higher — unless the
  reset above also reset it, as it does on Linux);
* a background thread sampling ``VmRSS`` every few milliseconds (misses spikes shorter than that).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading

__all__ = [
    "RssSampler",
    "busy_cpu_seconds",
    "peak_rss_bytes",
    "release_free_memory",
    "reset_peak_rss",
    "rss_bytes",
    "ru_maxrss_bytes",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of process ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark ``VmHWM`` in bytes (since start or the last reset)."""
    try:
        return _status_kib("VmHWM:") * 1024
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` (and ``ru_maxrss``) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``; a no-op where
    there is no glibc). Without it, memory a previous call freed stays resident and a later
    call reuses it without raising RSS, so its peak above the baseline would read near zero."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def ru_maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes of the machine have spent busy since boot (all cores summed;
    ``/proc/stat`` less idle and iowait), or None where it cannot be read."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Sample this process's RSS in a daemon thread; ``max_bytes`` is the largest value seen.

    Use as a context manager around the region to watch.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.max_bytes = max(self.max_bytes, rss_bytes())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.max_bytes = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max_bytes = max(self.max_bytes, rss_bytes())
