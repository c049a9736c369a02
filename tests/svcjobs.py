"""Job functions for the service tests: importable by the service's workers (stdlib only)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def crash(code: int) -> None:
    os._exit(code)


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def touch_then_square(gate: str, x: int) -> int:
    """Mark that it started, then wait for ``gate/go`` (at most 30 s); x squared."""
    Path(gate, f"started-{x}").touch()
    end = time.monotonic() + 30
    while not os.path.exists(os.path.join(gate, "go")) and time.monotonic() < end:
        time.sleep(0.005)
    return x * x
