"""The supervisor's timers against an injected clock: delayed jobs and retry backoff, no waiting.

The loop is not started: the test drives ``_admit`` and ``_fire_timers``
itself with the times it chooses, so what is due when is exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import procsched.supervisor as supervisor_module
from procsched.futures import JobFuture
from procsched.ipc import oob
from procsched.jobs import Job
from procsched.model import JobOptions, PoolConfig, RetryPolicy, make_options
from procsched.supervisor import Supervisor


class Clock:
    """Stands in for the ``time`` module inside the supervisor: wall and monotonic move together."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t - 999_000.0


@pytest.fixture
def sup(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Supervisor, Clock]]:
    clock = Clock()
    monkeypatch.setattr(supervisor_module, "time", clock)
    s = Supervisor(PoolConfig(max_workers=1), oob.pool_prefix("timers"))
    try:
        yield s, clock
    finally:
        s.bell.close()


def _job(job_id: int, opts: JobOptions = JobOptions(), not_before: float = 0.0) -> Job:
    fut = JobFuture()
    fut.job_id = job_id
    job = Job(job_id, fut, f"j{job_id}", b"", 0, b"", b"", opts)
    job.not_before = not_before
    return job


def _queued(s: Supervisor) -> list[int]:
    out = []
    while s.queue.cold:
        out.append(s.queue.pop_cold())
    return out


@pytest.mark.timeout(10)
def test_delayed_jobs_queue_exactly_when_due_with_their_priority(sup: tuple[Supervisor, Clock]) -> None:
    s, clock = sup
    now = clock.monotonic()
    s._admit(_job(1, not_before=clock.t + 30), now)
    s._admit(_job(2, make_options(JobOptions(), {"priority": 5}), not_before=clock.t + 10), now)
    s._admit(_job(3), now)
    assert [s.jobs[i].state for i in (1, 2, 3)] == ["pending", "pending", "queued"]
    assert _queued(s) == [3]
    for seconds, expected in ((9.999, []), (10.0, [2]), (29.9, []), (30.0, [1])):
        clock.t = 1_000_000.0 + seconds
        s._fire_timers(clock.monotonic())
        assert _queued(s) == expected, seconds
    s._admit(_job(4, not_before=clock.t - 5), clock.monotonic())  # already due: queued at once
    assert _queued(s) == [4]


@pytest.mark.timeout(10)
def test_a_retry_waits_its_backoff_then_goes_first(sup: tuple[Supervisor, Clock], monkeypatch: pytest.MonkeyPatch) -> None:
    s, clock = sup
    monkeypatch.setattr(s._rng, "random", lambda: 0.5)  # no jitter
    retry = make_options(JobOptions(), {"retries": RetryPolicy.make(3, backoff=2.0, factor=3.0)})
    job = _job(1, retry)
    s._admit(job, clock.monotonic())
    s._admit(_job(2), clock.monotonic())
    assert _queued(s) == [1, 2]
    job.state, job.dispatched = "running", True
    waits = []
    for attempt in (1, 2, 3):
        s._failed(job, "crash", RuntimeError("boom"), (), clock.monotonic())
        assert job.state == "pending" and job.attempt == attempt + 1
        due = s.timers[0][0]
        waits.append(round(due - clock.monotonic(), 6))
        clock.t += waits[-1] - 0.001
        s._fire_timers(clock.monotonic())
        assert _queued(s) == [], "not before its backoff"
        clock.t += 0.001
        s._fire_timers(clock.monotonic())
        assert _queued(s) == [1]
        job.state = "running"
    assert waits == [2.0, 6.0, 18.0]

