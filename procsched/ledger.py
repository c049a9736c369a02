"""What the supervisor remembers beyond its live jobs: dead letters and timings.

``DeadLetters`` keeps each job that ran out of attempts after a crash or a
timeout, with its call (so it can be submitted again) and its failure
history; with a journal the same jobs come back from it after a restart.
``Timings`` keeps the recent wait and run times and finish times that
``pool.stats()`` turns into percentiles and a throughput, and, since the
pool started, a cumulative histogram of each (:class:`Histogram`: fixed
bucket bounds, one ``bisect`` and two additions per sample) that a metrics
endpoint exports as it is (``procsched.metrics``; the journal's writer
keeps one more, of its fsyncs).

The supervisor appends samples as a job is placed and as its run ends
(``timings.waits.append``): :class:`Samples` is the window and the
histogram in one, so that call feeds both (in batches).

Both belong to the supervisor's loop; callers see copies through
``pool.dead_letters()`` and ``pool.stats()``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from .model import JobOptions, Key

#: how many recent waits, runs and finishes the timings keep
WINDOW = 10_000

#: upper bounds (seconds, inclusive) of the wait and run histograms' buckets; above the last: +Inf
BOUNDS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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


class Histogram:
    """Cumulative counts of samples by bucket, and their sum, since it was made.

    One thread observes; any thread may read a :meth:`snapshot` (a copy of
    the counts, so its buckets and count agree; its sum may be a sample
    ahead or behind, which a metric tolerates).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = BOUNDS) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram bounds must be increasing: {self.bounds}")
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bounds are inclusive: value <= bound
        self.sum += value

    def observe_many(self, values: list[float]) -> None:
        """``observe`` each of ``values`` (sorted in place: one bisect per bound, not per value)."""
        values.sort()
        counts = self.counts
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(values, bound)  # (inclusive bounds: value <= bound)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(values) - below
        self.sum += sum(values)

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [[bound, cumulative count], ...], "count": n, "sum": s}`` (+Inf's count is ``count``)."""
        counts = self.counts.copy()
        total = self.sum
        buckets: list[list[float]] = []
        running = 0
        for bound, n in zip(self.bounds, counts):
            running += n
            buckets.append([bound, running])
        return {"buckets": buckets, "count": running + counts[-1], "sum": total}


class Samples:
    """The recent samples (a bounded window, for percentiles) and a :class:`Histogram` of all of them.

    ``append`` is a plain list's: the loop appends two samples per job. They
    reach the window and the histogram in batches (:meth:`fold`), once many
    have come (the loop calls :meth:`tidy` once a turn) or when someone reads;
    a batch is sorted once and counted with one bisect per bucket bound,
    rather than one per sample. Any thread may fold: only the samples it
    copied are taken out, so appends that race it stay for the next fold.
    """

    __slots__ = ("window", "hist", "pending", "append", "_lock")

    #: a turn folds past this many pending samples
    BATCH = 4096

    def __init__(self, maxlen: int = WINDOW, bounds: Iterable[float] = BOUNDS) -> None:
        self.window: deque[float] = deque((), maxlen)
        self.hist = Histogram(bounds)
        self.pending: list[float] = []
        self.append = self.pending.append
        self._lock = threading.Lock()

    def fold(self) -> None:
        with self._lock:
            pending = self.pending
            n = len(pending)
            if not n:
                return
            batch = pending[:n]
            del pending[:n]
            self.window.extend(batch)
            self.hist.observe_many(batch)

    def tidy(self) -> None:
        if len(self.pending) >= self.BATCH:
            self.fold()

    def recent(self) -> list[float]:
        """The window, with every sample appended so far."""
        self.fold()
        return list(self.window)

    def snapshot(self) -> dict[str, Any]:
        """The histogram's :meth:`Histogram.snapshot`, with every sample appended so far."""
        self.fold()
        with self._lock:  # (a fold on the loop meanwhile would tear its count from its sum)
            return self.hist.snapshot()


class Timings:
    def __init__(self) -> None:
        self.waits = Samples()  # queued -> placed on a worker, seconds (one per placement)
        self.runs = Samples()  # run time the worker measured, seconds (one per attempt that returned or raised)
        self.finishes: deque[float] = deque(maxlen=WINDOW)  # monotonic times jobs finished

    def tidy(self) -> None:
        """Once a turn: fold the samples of a long stretch of jobs (see :class:`Samples`)."""
        self.waits.tidy()
        self.runs.tidy()

    def summary(self, now: float) -> dict[str, Any]:
        # (list() copies in one C call: safe while the loop appends)
        out: dict[str, Any] = {"wait_s": _percentiles(self.waits.recent()), "run_s": _percentiles(self.runs.recent())}
        out["wait_histogram"] = self.waits.snapshot()
        out["run_histogram"] = self.runs.snapshot()
        recent = [t for t in list(self.finishes) if t >= now - 10.0]
        out["throughput_per_s"] = round(len(recent) / 10.0, 1) if recent else 0.0
        return out


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    return {f"p{p}": round(ordered[min(n - 1, n * p // 100)], 6) for p in (50, 90, 99)}
