"""Job functions the tests share: importable by name in a worker, and light (stdlib only).

A worker imports a job's module before it runs it, so these stay apart from
the test modules and conftest, which import pytest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

JOB_WAIT = 30.0  # a job waiting on a gate gives up after this long (only if a test is broken)


def gated(gate: str, value: Any) -> Any:
    """Say it runs (``gate/started``), then wait for ``gate/go``; return ``value``."""
    Path(gate, "started").touch()
    go = os.path.join(gate, "go")
    end = time.monotonic() + JOB_WAIT
    while not os.path.exists(go):
        if time.monotonic() > end:
            raise TimeoutError(f"{go} never came")
        time.sleep(0.005)
    return value


def lines(log: str | Path) -> list[str]:
    """The lines of a log the jobs append to (none if it does not exist yet)."""
    path = Path(log)
    return path.read_text().splitlines() if path.exists() else []


def slow_square(x: int, delay: float = 0.005) -> int:
    """``x * x`` after ``delay`` seconds: a batch of these stays in flight for a while."""
    time.sleep(delay)
    return x * x


def add(a: Any, b: Any) -> Any:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def crash(code: int) -> None:
    """Kill the worker running it, with exit code ``code``."""
    os._exit(code)


def chatter(gate: str, first: str, last: str) -> None:
    """Print ``first``, wait for ``gate/go`` (see :func:`gated`), then print ``last``."""
    print(first, flush=True)
    gated(gate, None)
    print(last, flush=True)
