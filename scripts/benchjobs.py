"""The benchmark's job functions, in a module of their own.

A worker started as a fresh interpreter (loky, procsched) imports a job's
module before it can run the job; keeping these apart from ``bench.py``
(which imports argparse, subprocess, importlib.metadata, ...) means the
cold-start row measures the pool, not the harness's imports. For the same
reason it imports only ``os`` and ``time`` (``typing`` and ``signal`` would
cost a fresh worker's first job about 14 ms here).
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_SIGKILL = 9


def noop(x: Any = None) -> Any:
    return x


def wall_clock(_: Any = None) -> float:
    """When the job started, by the wall clock (delayed jobs are due by it)."""
    return time.time()


def spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def pause(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def crash() -> None:
    os.kill(os.getpid(), _SIGKILL)


def nbytes_of(a: Any) -> int:
    return int(a.nbytes)


def make_array(nbytes: int) -> Any:
    import numpy as np

    return np.ones(nbytes // 8)


def burn(seconds: float) -> float:
    """Keep a CPU busy for ``seconds`` (a CPU-bound job of a known length)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def crash_noted(path: str) -> None:
    """Write the wall-clock time, then SIGKILL ourselves (how fast is a crash reported?)."""
    with open(path, "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), _SIGKILL)
