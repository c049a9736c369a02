"""Scheduling with real worker processes: priorities, aging, hot and cold jobs.

Given a pool whose only worker is held by a job blocked on a gate file,
when jobs are queued behind it and the gate opens, then they run in the
order the ready queue promises (higher priority first, FIFO among equals,
aging lifting old jobs); and when a hot job arrives, the running cold job
yields at its next checkpoint (or is killed after its grace, for
``preempt="kill"``), the hot job runs, and the cold job resumes from its
checkpoint without spending an attempt.

Order is asserted only among jobs that were queued in the supervisor while
the worker was busy: a job already handed to a worker (prefetch) is
committed. Tests that need a strict order set ``max_prefetch=0``; the
others account for the prefetch explicitly.

Jobs announce progress through files and block on gate files; the test
waits for files with a deadline and never for a fixed time, except for the
short observation windows of negative assertions ("this did not happen"),
which only make such a test pass more slowly, never fail spuriously.
``Gates`` opens every gate on exit, so a failing assertion cannot leave a
pool's shutdown waiting for a blocked job.
"""

from __future__ import annotations

import ast
import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import procsched
from conftest import await_file, wait_for

JOB_WAIT = 30.0  # a job blocked on a gate gives up after this long (only if a test is broken)
WAIT = 30.0  # the test's deadline for anything it waits on


# -- helpers shared by jobs and tests ---------------------------------------


def _touch(path: str | Path) -> None:
    with open(path, "a"):
        pass


def _append(path: str | Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _lines(path: str | Path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


# -- job functions (run in workers) -----------------------------------------


def blocker(started: str, release: str) -> str:
    """Holds its worker until ``release`` exists; never checkpoints."""
    _append(started, str(os.getpid()))
    await_file(release, JOB_WAIT)
    return "blocker"


def record(order: str, label: str) -> str:
    _append(order, label)
    return label


def stamp(_: Any = None) -> int:
    return time.monotonic_ns()


def tiny(i: int, mark_at: int, mark: str, gate: str = "") -> int:
    """A stamp; job ``mark_at`` also says it runs (``mark``), then waits for ``gate``, if any."""
    if i == mark_at:
        _touch(mark)
        if gate:
            await_file(gate, JOB_WAIT)
    return time.monotonic_ns()


def busy_stamp(i: int, seconds: float, mark_at: int, mark: str) -> int:
    start = time.monotonic_ns()
    if i == mark_at:
        _touch(mark)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return start


def cold_job(progress: str, preempted: str, finish: str, big: bool, helpers: bool = False) -> tuple[Any, int, int]:
    """Checkpoints each step; returns (resume_from, attempt, last step).

    Through ``current_job().checkpoint()`` every step, or with ``helpers``
    through the module-level ``cancel_requested()``/``checkpoint()``,
    checkpointing only when asked to yield.
    """
    ctx = procsched.current_job()
    first = ctx.resume_from
    i = 0 if first is None else _step(first)
    tag = "resumed" if first is not None else "first"
    try:
        while True:
            if not helpers:
                ctx.checkpoint(_big_state(i) if big else i)
            elif procsched.cancel_requested():
                procsched.checkpoint(_big_state(i) if big else i)
            _append(progress, f"{tag} {i}")
            if os.path.exists(finish):
                return (_summary(first), ctx.attempt, i)
            i += 1
            time.sleep(0.001)
    except procsched.Preempted as p:
        _append(preempted, repr(_summary(p.state)))
        raise


BIG = 300_000  # a checkpoint this large (top-level bytes) is pickled with an out-of-band buffer


def _big_state(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"\x07" * BIG


def _step(state: Any) -> int:
    return int.from_bytes(state[:8], "little") if isinstance(state, bytes) else int(state)


def _summary(state: Any) -> Any:
    """A checkpoint as a small comparable value (a big one: its step, size and a content check)."""
    if isinstance(state, bytes):
        return (_step(state), len(state), state[8:] == b"\x07" * BIG)
    return state


def cold_stubborn(started: str, release: str) -> tuple[Any, int, int]:
    """Streams one checkpoint, then ignores every yield request until released."""
    ctx = procsched.current_job()
    if ctx.resume_from is not None:
        return (ctx.resume_from, ctx.attempt, os.getpid())
    ctx.checkpoint("state-A")  # with preempt="kill" this is streamed to the supervisor
    _append(started, str(os.getpid()))
    await_file(release, JOB_WAIT)  # never looks at should_yield()
    return ("never preempted", ctx.attempt, os.getpid())


def cold_ignoring(started: str, asked: str, release: str) -> tuple[int, int, bool, int]:
    """Sees the yield request, and keeps running anyway (cooperative: it may)."""
    ctx = procsched.current_job()
    _append(started, str(os.getpid()))
    seen = False
    end = time.monotonic() + JOB_WAIT
    while not os.path.exists(release):
        if not seen and ctx.should_yield():
            seen = True
            _touch(asked)
        if time.monotonic() > end:
            raise TimeoutError("never released")
        time.sleep(0.002)
    return (ctx.attempt, os.getpid(), seen, time.monotonic_ns())


def hot_holder(started: str, release: str) -> tuple[int, bool]:
    """A hot job that holds its worker and notes whether it was ever asked to yield."""
    _append(started, str(os.getpid()))
    asked = False
    end = time.monotonic() + JOB_WAIT
    while not os.path.exists(release):
        asked = asked or procsched.cancel_requested()
        if time.monotonic() > end:
            raise TimeoutError("never released")
        time.sleep(0.002)
    asked = asked or procsched.cancel_requested()
    return (time.monotonic_ns(), asked)


def resumable(order: str, label: str, started: str) -> str:
    """Runs until preempted; its resumed run records itself and returns."""
    ctx = procsched.current_job()
    if ctx.resume_from is not None:
        _append(order, label)
        return label
    _append(started, str(os.getpid()))
    end = time.monotonic() + JOB_WAIT
    i = 0
    while time.monotonic() < end:
        ctx.checkpoint(i)
        i += 1
        time.sleep(0.001)
    raise TimeoutError("never preempted")


# -- test helpers ------------------------------------------------------------


class Gates:
    """Gate and marker files in one directory; every gate opens on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gates: list[Path] = []

    def gate(self, name: str) -> str:
        path = self.root / f"gate-{name}"
        self.gates.append(path)
        return str(path)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def open(self, gate: str) -> None:
        _touch(gate)

    def open_all(self) -> None:
        for g in self.gates:
            _touch(g)


@contextmanager
def gates(root: Path) -> Iterator[Gates]:
    g = Gates(root)
    try:
        yield g
    finally:
        g.open_all()


def hold(pool: procsched.PoolView | procsched.Pool, g: Gates, name: str = "blocker") -> tuple[procsched.JobFuture, str]:
    """Occupy a worker with a blocker; returns its future and its gate, once it runs."""
    started, release = g.path(f"{name}-started"), g.gate(name)
    fut = pool.submit(blocker, started, release)
    wait_for(lambda: _lines(started), WAIT, f"{name} to start")
    return fut, release


def _resumed(progress: str) -> bool:
    return any(line.startswith("resumed") for line in _lines(progress))


def queued(pool: procsched.Pool) -> int:
    return int(pool.stats()["queued"])


def observe(window: float, *, fail_if: Any, what: str) -> None:
    """Watch for ``window`` seconds that ``fail_if()`` stays false (a negative assertion)."""
    end = time.monotonic() + window
    while time.monotonic() < end:
        assert not fail_if(), what
        time.sleep(0.01)


# -- priorities ---------------------------------------------------------------


@pytest.mark.timeout(40)
def test_priority_order_and_fifo_ties(tmp_path: Path) -> None:
    order = str(tmp_path / "order")
    jobs = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 10), ("g", 5), ("h", 0), ("i", -1)]
    with procsched.Pool(1, max_prefetch=0, aging_rate=0) as pool, gates(tmp_path) as g:
        held, release = hold(pool, g)
        futs = [pool.options(priority=p).submit(record, order, label) for label, p in jobs]
        wait_for(lambda: queued(pool) == len(jobs), WAIT, "every job to be queued")
        assert _lines(order) == []  # nothing ran past the blocker
        g.open(release)
        assert [f.result(timeout=WAIT) for f in futs] == [label for label, _ in jobs]
        assert held.result(timeout=WAIT) == "blocker"
    assert _lines(order) == ["f", "b", "d", "g", "a", "c", "h", "e", "i"]


@pytest.mark.timeout(40)
def test_priority_order_with_default_prefetch(tmp_path: Path) -> None:
    """The prefetched fillers are committed; everything queued after them runs by priority."""
    order = str(tmp_path / "order")
    config = procsched.PoolConfig()
    fillers = config.max_prefetch + 8  # more than a worker can ever hold
    jobs = [("low", 1), ("high", 9), ("mid", 5), ("high2", 9), ("low2", 1)]
    with procsched.Pool(1, aging_rate=0) as pool, gates(tmp_path) as g:
        held, release = hold(pool, g)
        filler = pool.options(priority=-100)
        fill_futs = [filler.submit(record, order, f"filler{i}") for i in range(fillers)]
        futs = [pool.options(priority=p).submit(record, order, label) for label, p in jobs]
        g.open(release)
        for f in futs + fill_futs:
            f.result(timeout=WAIT)
        held.result(timeout=WAIT)
    ran = _lines(order)
    assert len(ran) == fillers + len(jobs)
    mine = [label for label in ran if not label.startswith("filler")]
    assert mine == ["high", "high2", "mid", "low", "low2"]
    # the queued fillers ran in FIFO order, and after the jobs that outranked them
    filled = [int(label[len("filler") :]) for label in ran if label.startswith("filler")]
    assert filled == sorted(filled)
    assert ran.index("low2") < ran.index(f"filler{fillers - 1}")


@pytest.mark.timeout(40)
def test_urgent_job_not_stuck_behind_a_prefetched_backlog(tmp_path: Path) -> None:
    """With the default prefetch a worker holds hundreds of tiny jobs; an urgent one passes them."""
    n, warm = 20_000, 2_000
    mark = str(tmp_path / "warm")
    config = procsched.PoolConfig()
    bound = 2 * (config.max_prefetch + 1) + 1  # what the worker held, plus one dispatch round
    with procsched.Pool(1) as pool, gates(tmp_path) as g:
        held, release = hold(pool, g)
        pause = g.gate("pause")  # job `warm` holds the backlog up until the urgent one is in
        backlog = [pool.submit(tiny, i, warm, mark, pause) for i in range(n)]  # one job each
        g.open(release)
        wait_for(lambda: os.path.exists(mark), WAIT, "the backlog to be flowing")
        submitted = time.monotonic_ns()
        urgent = pool.options(priority=10).submit(stamp)
        g.open(pause)
        ran_at = urgent.result(timeout=WAIT)
        stamps = [f.result(timeout=WAIT) for f in backlog]
        held.result(timeout=WAIT)
    before = sum(1 for s in stamps if submitted <= s < ran_at)
    after = sum(1 for s in stamps if s > ran_at)
    assert before <= bound, f"the urgent job waited behind {before} tiny jobs"
    assert after > 0, "the urgent job ran only after the whole backlog"
    assert stamps == sorted(stamps)  # the backlog itself stayed FIFO


@pytest.mark.timeout(40)
@pytest.mark.parametrize(("aging_rate", "expected"), [(100.0, ["old-low", "new-high"]), (0.0, ["new-high", "old-low"])])
def test_aging_lifts_an_old_low_priority_job(aging_rate: float, expected: list[str], tmp_path: Path) -> None:
    """Coarse end to end; the arithmetic is in the ReadyQueue unit tests."""
    order = str(tmp_path / "order")
    with procsched.Pool(1, max_prefetch=0, aging_rate=aging_rate) as pool, gates(tmp_path) as g:
        held, release = hold(pool, g)
        low = pool.options(priority=0).submit(record, order, "old-low")
        wait_for(lambda: queued(pool) == 1, WAIT, "the low job to be queued")
        queued_at = time.monotonic()
        # 10 points at 100/s take 0.1 s of waiting: give it five times that
        wait_for(lambda: time.monotonic() - queued_at > 0.5, WAIT, "the low job to age")
        high = pool.options(priority=10).submit(record, order, "new-high")
        wait_for(lambda: queued(pool) == 2, WAIT, "the high job to be queued")
        g.open(release)
        low.result(timeout=WAIT)
        high.result(timeout=WAIT)
        held.result(timeout=WAIT)
    assert _lines(order) == expected


# -- hot and cold: cooperative --------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("helpers", [False, True], ids=["context", "helpers"])
@pytest.mark.parametrize("big", [False, True], ids=["small-state", "big-state"])
def test_cold_job_yields_to_hot_job_and_resumes(helpers: bool, big: bool, tmp_path: Path) -> None:
    progress, preempted, finish = (str(tmp_path / n) for n in ("progress", "preempted", "finish"))
    with procsched.Pool(1) as pool, gates(tmp_path) as g:
        g.gates.append(Path(finish))
        cold = pool.submit(cold_job, progress, preempted, finish, big, helpers)
        wait_for(lambda: len(_lines(progress)) >= 5, WAIT, "the cold job to make progress")
        hot = pool.options(hot=True).submit(stamp)
        hot_ran_at = hot.result(timeout=WAIT)
        assert not cold.done(), "the cold job cannot finish before it is let to"
        wait_for(lambda: _resumed(progress) or cold.done(), WAIT, "the cold job to resume")
        _touch(finish)
        resumed_from, attempt, last = cold.result(timeout=WAIT)  # a failed resume raises here
        stats = pool.stats()
    assert hot_ran_at > 0
    saved = _lines(preempted)
    assert len(saved) == 1, saved
    assert repr(resumed_from) == saved[0], "the resumed run must see the state of the last checkpoint"
    step = resumed_from[0] if big else resumed_from
    if big:
        assert resumed_from == (step, BIG + 8, True)
    assert attempt == 1, "a preemption does not spend an attempt"
    assert last >= step
    lines = _lines(progress)
    first_run = [int(x.split()[1]) for x in lines if x.startswith("first")]
    resumed_run = [int(x.split()[1]) for x in lines if x.startswith("resumed")]
    assert first_run == list(range(len(first_run)))
    assert resumed_run[0] == step, "the resumed run starts at its checkpoint"
    assert stats["preempted"] == 1
    assert stats["restarts"] == 0, "a cooperative yield kills no worker"
    assert stats["succeeded"] == 2


@pytest.mark.timeout(40)
def test_preempted_job_resumes_before_the_jobs_queued_behind_it(tmp_path: Path) -> None:
    """The preempted job and its recalled prefetch go back to the front, in their order."""
    order, started = str(tmp_path / "order"), str(tmp_path / "started")
    with procsched.Pool(1, aging_rate=0) as pool, gates(tmp_path):  # equal ranks: only the order decides
        for f in [pool.submit(stamp) for _ in range(50)]:  # seen to be short: the prefetch grows
            f.result(timeout=WAIT)
        first = pool.submit(resumable, order, "cold", started)
        wait_for(lambda: _lines(started), WAIT, "the cold job to start")
        behind = [pool.submit(record, order, label) for label in ("x1", "x2", "x3", "x4")]
        wait_for(lambda: pool.stats()["workers"][0]["queued"] == 5, WAIT, "the four to be prefetched by the worker")
        hot = pool.options(hot=True).submit(record, order, "hot")
        assert hot.result(timeout=WAIT) == "hot"
        assert first.result(timeout=WAIT) == "cold"
        assert [f.result(timeout=WAIT) for f in behind] == ["x1", "x2", "x3", "x4"]
        assert pool.stats()["preempted"] == 1
    assert _lines(order) == ["hot", "cold", "x1", "x2", "x3", "x4"]


@pytest.mark.timeout(40)
def test_cooperative_cold_job_that_never_yields_is_left_running(tmp_path: Path) -> None:
    started, asked = str(tmp_path / "started"), str(tmp_path / "asked")
    with procsched.Pool(1, preempt_grace=0.2) as pool, gates(tmp_path) as g:
        release = g.gate("cold")
        cold = pool.submit(cold_ignoring, started, asked, release)
        wait_for(lambda: _lines(started), WAIT, "the cold job to start")
        hot = pool.options(hot=True).submit(stamp)
        wait_for(lambda: os.path.exists(asked), WAIT, "the cold job to be asked to yield")
        # past the (kill) grace, several times over: a cooperative job is never killed
        observe(1.0, fail_if=lambda: hot.done() or cold.done(), what="the hot job must wait for the cold one")
        g.open(release)
        attempt, pid, seen, cold_end = cold.result(timeout=WAIT)
        hot_start = hot.result(timeout=WAIT)
        stats = pool.stats()
    assert seen and attempt == 1
    assert pid == int(_lines(started)[0])
    assert hot_start > cold_end
    assert stats["preempted"] == 0 and stats["restarts"] == 0


# -- hot and cold: kill ---------------------------------------------------------


@pytest.mark.timeout(40)
def test_cold_job_that_ignores_the_request_is_killed_and_rerun(tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    with procsched.Pool(1, preempt_grace=0.3) as pool, gates(tmp_path) as g:
        release = g.gate("never")  # opened only on exit: the cold job must be killed first
        cold = pool.options(preempt="kill").submit(cold_stubborn, started, release)
        wait_for(lambda: _lines(started), WAIT, "the cold job to start")
        first_pid = int(_lines(started)[0])
        hot_start = pool.options(hot=True).submit(stamp).result(timeout=WAIT)
        resume_from, attempt, pid = cold.result(timeout=WAIT)
        stats = pool.stats()
    assert resume_from == "state-A", "the rerun resumes from the last streamed checkpoint"
    assert attempt == 1, "a preemption does not spend an attempt"
    assert pid != first_pid, "the first run's worker was killed and replaced"
    assert hot_start > 0
    assert stats["preempted"] == 1
    assert stats["failed"] == 0 and stats["crashed"] == 0


@pytest.mark.timeout(40)
def test_kill_policy_job_that_yields_in_time_is_not_killed(tmp_path: Path) -> None:
    progress, preempted, finish = (str(tmp_path / n) for n in ("progress", "preempted", "finish"))
    with procsched.Pool(1, preempt_grace=5.0) as pool, gates(tmp_path) as g:
        g.gates.append(Path(finish))
        cold = pool.options(preempt="kill").submit(cold_job, progress, preempted, finish, False)
        wait_for(lambda: len(_lines(progress)) >= 3, WAIT, "the cold job to make progress")
        pool.options(hot=True).submit(stamp).result(timeout=WAIT)
        wait_for(lambda: _resumed(progress), WAIT, "the cold job to resume")
        _touch(finish)
        resumed_from, attempt, _ = cold.result(timeout=WAIT)
        stats = pool.stats()
    assert repr(resumed_from) == _lines(preempted)[0]
    assert attempt == 1
    assert stats["preempted"] == 1 and stats["restarts"] == 0


@pytest.mark.timeout(40)
def test_cancelled_hot_job_preempts_nothing(tmp_path: Path) -> None:
    """A hot job cancelled while it waits no longer needs a worker: nobody is killed for it."""
    started = str(tmp_path / "started")
    with procsched.Pool(1, preempt_grace=0.3) as pool, gates(tmp_path) as g:
        release = g.gate("cold")
        cold = pool.options(preempt="kill").submit(cold_stubborn, started, release)
        wait_for(lambda: _lines(started), WAIT, "the cold job to start")
        hot = pool.options(hot=True).submit(stamp)
        assert hot.cancel()
        # well past the grace: a kill for the cancelled job would have happened by now
        observe(1.5, fail_if=lambda: pool.stats()["preempted"] or len(_lines(started)) > 1 or cold.done(), what="the cold job was preempted for a cancelled hot job")
        g.open(release)
        resume_from, attempt, pid = cold.result(timeout=WAIT)
        stats = pool.stats()
    assert (resume_from, attempt, pid) == ("never preempted", 1, int(_lines(started)[0]))
    assert stats["preempted"] == 0 and stats["restarts"] == 0


# -- hot jobs among themselves, and against a backlog ----------------------------


@pytest.mark.timeout(40)
def test_hot_job_never_preempts_a_hot_job(tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    with procsched.Pool(1, preempt_grace=0.2) as pool, gates(tmp_path) as g:
        release = g.gate("hot1")
        hot = pool.options(hot=True)
        first = hot.submit(hot_holder, started, release)
        wait_for(lambda: _lines(started), WAIT, "the first hot job to start")
        second = hot.submit(stamp)
        wait_for(lambda: queued(pool) == 1, WAIT, "the second hot job to be queued")
        third = hot.submit(stamp)  # admitted a turn later: the turn that saw the second is over
        wait_for(lambda: queued(pool) == 2, WAIT, "the third hot job to be queued")
        observe(0.5, fail_if=lambda: first.done() or second.done(), what="a hot job was displaced")
        g.open(release)
        first_end, asked = first.result(timeout=WAIT)
        second_start = second.result(timeout=WAIT)
        third.result(timeout=WAIT)
        stats = pool.stats()
    assert not asked, "a running hot job was asked to yield"
    assert second_start > first_end
    assert stats["preempted"] == 0 and stats["restarts"] == 0


@pytest.mark.timeout(40)
def test_hot_job_runs_before_a_large_cold_backlog(tmp_path: Path) -> None:
    with procsched.Pool(2, max_prefetch=0) as pool, gates(tmp_path) as g:
        held = [hold(pool, g, "one"), hold(pool, g, "two")]
        backlog = [pool.submit(stamp) for _ in range(300)]
        wait_for(lambda: queued(pool) == 300, WAIT, "the backlog to be queued")
        hot = pool.options(hot=True).submit(stamp)
        wait_for(lambda: queued(pool) == 301, WAIT, "the hot job to be queued")
        g.open(held[0][1])  # one worker comes free
        hot_start = hot.result(timeout=WAIT)
        g.open(held[1][1])
        cold_starts = [f.result(timeout=WAIT) for f in backlog]
    assert hot_start < min(cold_starts)


@pytest.mark.timeout(40)
def test_hot_job_starts_promptly_on_a_pool_busy_with_cold_work(tmp_path: Path) -> None:
    """Workers full of prefetched cold work: the hot job waits for one cold job, not the backlog."""
    n, mark = 1500, str(tmp_path / "warm")
    with procsched.Pool(2) as pool:
        backlog = [pool.submit(busy_stamp, i, 0.001, 50, mark) for i in range(n)]  # one job each
        wait_for(lambda: os.path.exists(mark), WAIT, "the backlog to be flowing")
        submitted = time.monotonic_ns()
        hot_start = pool.options(hot=True).submit(stamp).result(timeout=WAIT)
        cold_starts = [f.result(timeout=WAIT) for f in backlog]
    before = sum(1 for s in cold_starts if submitted <= s < hot_start)
    after = sum(1 for s in cold_starts if s > hot_start)
    # the yielding worker finishes its current job; the other runs what it already held
    # (a few jobs of prefetch at 1 ms each); nothing new is dispatched while a hot job waits
    assert before <= 30, f"the hot job waited behind {before} cold jobs"
    assert after > 0, "the hot job ran only after the whole backlog"


def cooperative_long(started: str, release: str) -> str:
    """Checkpoints every few ms until ``release`` exists; yields when asked."""
    _append(started, str(os.getpid()))
    end = time.monotonic() + JOB_WAIT
    while not os.path.exists(release) and time.monotonic() < end:
        procsched.checkpoint("state")
        time.sleep(0.002)
    return "done"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["cooperative", "kill"])
def test_a_cold_job_whose_prefetch_was_taken_back_still_yields_to_a_hot_one(policy: str, tmp_path: Path) -> None:
    """Taking back the jobs queued behind a long job (for an idle worker) leaves a recall
    pending on its worker until that job ends; a hot job must still be able to preempt it,
    and one hot job preempts one cold job."""
    with procsched.Pool(2, aging_rate=0.0, preempt_grace=0.3) as pool, gates(tmp_path) as g:
        assert [f.result(timeout=WAIT) for f in [pool.submit(stamp) for _ in range(300)]]  # jobs are short
        low_started, low_release = g.path("low-started"), g.gate("low")
        low = pool.options(preempt=policy).submit(cooperative_long, low_started, low_release)
        wait_for(lambda: _lines(low_started), WAIT, "the low job to start")
        quick = [pool.submit(stamp) for _ in range(300)]  # prefetched behind it, then taken back
        assert all(f.result(timeout=WAIT) for f in quick)
        high_started, high_release = g.path("high-started"), g.gate("high")
        high = pool.options(priority=10, preempt=policy).submit(cooperative_long, high_started, high_release)
        wait_for(lambda: _lines(high_started), WAIT, "the high job to start")
        hot = pool.options(hot=True).submit(stamp)
        assert hot.result(timeout=10)  # the low job yields (or is killed): the hot one runs now
        assert not high.done()
        stats = pool.stats()
        assert stats["preempted"] == 1, stats
        g.open(low_release)
        g.open(high_release)
        assert low.result(timeout=WAIT) == "done" and high.result(timeout=WAIT) == "done"


def checkpointing_call(log: str, x: int) -> int:
    """A mapped call that checkpoints four times and logs how it (re)started."""
    _append(log, repr((x, procsched.current_job().resume_from)))
    for i in range(4):
        time.sleep(0.02)
        procsched.checkpoint(("state", x, i))
    return x


@pytest.mark.timeout(60)
def test_preempted_map_batch_resumes_at_the_call_that_yielded(tmp_path: Path) -> None:
    # map batches its calls (12 calls, 1 worker: batches of 3). A hot job
    # preempts a batch mid-way: the calls it finished must not run again, and
    # the call that yielded must get its own checkpoint back, nobody else's.
    log = str(tmp_path / "calls")
    with procsched.Pool(1) as pool:
        it = pool.map(functools.partial(checkpointing_call, log), range(12))
        wait_for(lambda: os.path.exists(log) and len(open(log).read().splitlines()) >= 5, 30, "the map to be under way")
        assert pool.options(hot=True).submit(abs, -1).result(timeout=30) == 1
        assert list(it) == list(range(12))
        assert pool.stats()["preempted"] == 1
    starts = [ast.literal_eval(line) for line in open(log).read().splitlines()]  # (call, resume_from)
    calls = [x for x, _ in starts]
    assert sorted(set(calls)) == list(range(12))
    again = [x for x in set(calls) if calls.count(x) > 1]
    assert len(again) == 1, starts  # only the call that yielded ran twice
    (x,) = again
    resumed = [r for c, r in starts if c == x][1]
    assert resumed is not None and resumed[:2] == ("state", x)
    assert all(r is None for c, r in starts if c != x)
