"""What the supervisor remembers beyond its live jobs: dead letters and timings.

``DeadLetters`` keeps each job that ran out of attempts after a crash or a
timeout, with its call (so it can be submitted again) and its failure
history; with a journal the same jobs come back from it after a restart.
``Timings`` keeps the recent wait and run times and finish times that
``pool.stats()`` turns into percentiles and a throughput.

Both belong to the supervisor's loop; callers see copies through
``pool.dead_letters()`` and ``pool.stats()``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from .model import JobOptions, Key

#: how many recent waits, runs and finishes the timings keep
WINDOW = 10_000


class DeadLetter(NamedTuple):
    job: int
    label: str
    key: Key | None
    fn: bytes
    flags: int
    args: bytes
    buffers: list[bytes]
    opts: JobOptions
    state: str  # "crashed" or "timed_out"
    history: list[tuple[int, str, str, float]]  # (attempt, kind, message, wall time) per failed attempt
    at: float

    def describe(self) -> dict[str, Any]:
        return {
            "job": self.job, "name": self.label, "key": self.key, "state": self.state, "attempts": len(self.history),
            "error": self.history[-1][2] if self.history else None, "history": [list(h) for h in self.history],
            "at": self.at,
        }  # fmt: skip


class DeadLetters:
    def __init__(self) -> None:
        self.by_job: dict[int, DeadLetter] = {}

    def add(self, letter: DeadLetter) -> None:
        self.by_job[letter.job] = letter

    def take(self, job: int) -> DeadLetter:
        letter = self.by_job.pop(job, None)
        if letter is None:
            raise KeyError(f"no dead letter for job {job}")
        return letter

    def purge(self, job: int | None) -> list[int]:
        """Forget one dead letter, or all of them; the jobs forgotten."""
        if job is None:
            gone = list(self.by_job)
            self.by_job.clear()
            return gone
        return [job] if self.by_job.pop(job, None) is not None else []

    def listing(self) -> list[dict[str, Any]]:
        return [d.describe() for d in self.by_job.values()]


class Timings:
    def __init__(self) -> None:
        self.waits: deque[float] = deque(maxlen=WINDOW)  # queued -> placed on a worker, seconds
        self.runs: deque[float] = deque(maxlen=WINDOW)  # run time the worker measured, seconds
        self.finishes: deque[float] = deque(maxlen=WINDOW)  # monotonic times jobs finished

    def summary(self, now: float) -> dict[str, Any]:
        # (list() and sorted() copy in one C call: safe while the loop appends)
        out: dict[str, Any] = {"wait_s": _percentiles(self.waits), "run_s": _percentiles(self.runs)}
        recent = [t for t in list(self.finishes) if t >= now - 10.0]
        out["throughput_per_s"] = round(len(recent) / 10.0, 1) if recent else 0.0
        return out


def _percentiles(values: deque[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    return {f"p{p}": round(ordered[min(n - 1, n * p // 100)], 6) for p in (50, 90, 99)}
