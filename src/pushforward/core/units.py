"""Byte counts: reading ``"2GB"``/``"512 MiB"`` and writing ``"1.2 MB"``."""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "parse_bytes"]

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


def parse_bytes(value: int | float | str, what: str = "memory budget") -> int:
    """Bytes from a positive number or a string like ``"2GB"``/``"512 MiB"``.

    Decimal units ``KB``/``MB``/``GB``/``TB``, binary ``KiB``/``MiB``/``GiB``/``TiB``.

    Raises:
        TypeError: ``value`` is neither a number (``bool`` excluded) nor a string.
        ValueError: an unreadable string, or a value that is not positive and finite (naming
            ``what``).
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of bytes or a string like '2GB'")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {what} {value!r}; use bytes or e.g. '2GB'")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise TypeError(
            f"{what} must be a number of bytes or a string like '2GB', got {type(value).__name__}"
        )
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be positive and finite, got {value!r}")
    return int(number)


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
