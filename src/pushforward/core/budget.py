"""Memory budgets: parsing ``"2GB"``, reading what is available, formatting byte counts.

The engine sizes its chunks so that the memory a call allocates stays under a budget (see
:mod:`pushforward.core.cost`). The budget is given in bytes or as a string (``"512MB"``,
``"2GiB"``); by default it is a fraction (``settings.budget_fraction``, 0.5) of the memory
available on the device.
"""

from __future__ import annotations

import math
import re

import torch

from pushforward.core.settings import settings

__all__ = ["available_memory", "format_bytes", "parse_memory"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
}


def parse_memory(budget: int | float | str | None, device: torch.device | None = None) -> int:
    """Bytes from ``budget``: a number of bytes, a string like ``"2GB"``/``"512 MiB"``, or
    ``None`` for the default (``settings.budget_fraction`` of the memory available on
    ``device``)."""
    if budget is None:
        return int(settings.current().budget_fraction * available_memory(device))
    if isinstance(budget, bool):
        raise TypeError("memory_budget must be a number of bytes or a string like '2GB'")
    if isinstance(budget, (int, float)):
        value = float(budget)
    elif isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read memory budget {budget!r}; use bytes or e.g. '2GB'")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise TypeError(
            f"memory_budget must be a number of bytes or a string like '2GB', got "
            f"{type(budget).__name__}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory budget must be positive and finite, got {budget!r}")
    return int(value)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes available for new allocations on ``device`` (CPU: ``MemAvailable``)."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
