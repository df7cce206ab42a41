"""Memory budgets: the default (a fraction of what is available on the device) and parsing.

The engine sizes its chunks so that the memory a call allocates stays under a budget (see
:mod:`pushforward.core.cost`). The budget is given in bytes or as a string (``"512MB"``,
``"2GiB"``); by default it is a fraction (``settings.budget_fraction``, 0.5) of the memory
available on the device.
"""

from __future__ import annotations

import torch

from pushforward.core.settings import settings
from pushforward.core.units import parse_bytes

__all__ = ["available_memory", "parse_memory"]


def parse_memory(budget: int | float | str | None, device: torch.device | None = None) -> int:
    """Bytes from ``budget``, or the default budget of ``device``.

    ``budget`` is a number of bytes, a string like ``"2GB"``/``"512 MiB"``, or ``None`` for the
    default (``settings.budget_fraction`` of the memory available on ``device``).
    """
    if budget is None:
        return int(settings.current().budget_fraction * available_memory(device))
    return parse_bytes(budget, "memory budget")


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
