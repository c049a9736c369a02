"""Plain-text output for the command line: aligned tables, one-line cells, times, sizes.

Shared by ``cli.py`` (journal listings) and ``commands.py`` (the service's
commands). Pure formatting: no I/O besides writing to the stream it is given.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

#: columns (and fields) that hold a wall-clock time, shown as local date and time
TIMES = frozenset({"submitted", "finished", "at", "retry_at", "not_before", "last", "next"})
_WIDTH = 60


def when(t: float) -> str:
    """A wall-clock time as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float) -> str:
    """``4.2 s``, ``3m 05s``, ``2h 07m``, ``3d 04h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cell(column: str, value: Any) -> str:
    """``value`` as one short line: ``-`` for none, yes/no, times as dates, lists joined by commas,
    long text cut at 60 characters."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column in TIMES and isinstance(value, (int, float)):
        return when(value)
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value)) or "-"
    text = " ".join(str(value).split())  # one line per row: newlines and tabs become spaces
    return text if len(text) <= _WIDTH else text[: _WIDTH - 3] + "..."


def table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
