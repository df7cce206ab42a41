"""The library helpers the harness uses (byte counts, memory budgets), from whichever version of
pushforward is importable: this checkout's, or an older one measured for before/after figures
(``PYTHONPATH=<older checkout>/src``), where they lived in ``pushforward.memory``."""

from __future__ import annotations

try:
    from pushforward.core.budget import available_memory, parse_memory
    from pushforward.core.units import format_bytes
except ImportError:  # pushforward before its core/ layout
    from pushforward.memory import available_memory, format_bytes, parse_memory

__all__ = ["available_memory", "format_bytes", "parse_memory"]
