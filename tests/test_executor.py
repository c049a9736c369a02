"""The Executor contract of ``procsched.Pool``, with real worker processes.

Given a pool, when a caller uses it as a ``concurrent.futures.Executor``
(``submit``, ``map``, futures, ``shutdown``, ``options``), then it behaves as
that contract says, with procsched's additions: pickling errors raised by
``submit()`` itself, remote tracebacks, large buffers out of band.

Jobs that must stay running while the test looks block on a gate file (the
test creates it to release them) and announce their start with a marker
file; the test waits for markers with a deadline, never for a fixed time,
except for the short observation windows of negative assertions ("this job
is not marked running"), which can only let a bug go unseen, never fail a
correct pool. ``Gate`` opens itself on exit, so a failing assertion cannot
leave a pool waiting for a blocked job at shutdown.

Job functions live at module level so workers import them by name; numpy
is imported only by the tests that use it, so a worker that imports this
module for a tiny job does not pay for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import procsched
from conftest import await_file, children, our_segments, wait_for

GATE_DEADLINE = 30.0  # a blocked job gives up after this long (only if a test is broken)
WAIT = 30.0  # generous deadline for anything the test waits on


# -- job functions (run in workers) -----------------------------------------


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def identity(x: Any) -> Any:
    return x


def reverse(b: bytes | bytearray) -> bytes | bytearray:
    return b[::-1]


def make_bytes(n: int, kind: str) -> bytes | bytearray:
    data = (bytes(range(251)) * (n // 251 + 1))[:n]
    return bytearray(data) if kind == "bytearray" else data


def touch(path: str) -> str:
    Path(path).touch()
    return path


def blocker(started: str, gate: str, value: Any) -> Any:
    """Announce the start, then wait for the gate to open."""
    Path(started).touch()
    await_file(gate, GATE_DEADLINE)
    return value


def maybe_block(x: int, gate: str | None, done_dir: str) -> int:
    if gate is not None:
        await_file(gate, GATE_DEADLINE)
    Path(done_dir, f"done{x}").touch()
    return x * 10


class Boom(ValueError):
    pass


def boom(message: str) -> None:
    raise Boom(message)


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


class NeedsTwoArgs(Exception):
    """Pickles fine, but cannot be rebuilt from its ``args`` on the caller's side."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_needs_two_args() -> None:
    raise NeedsTwoArgs("left", "right")


def return_lock() -> Any:
    return threading.Lock()


def array_roundtrip(a: Any) -> Any:
    return a


def array_times_two(a: Any) -> Any:
    return a * 2


def zero_out(a: Any) -> int:
    a[...] = 0
    return int(a.sum())


def make_adder(n: int) -> Any:
    def adder(x: int) -> int:
        return x + n

    return adder


_FACTOR = 2  # read by a by-value lambda; rebound by a test

INIT_STATUS = "uninitialized"  # set in a worker by its pool's initializer


def init_status(value: str) -> None:
    global INIT_STATUS
    INIT_STATUS = value


def init_status_and_pid() -> tuple[str, int]:
    return INIT_STATUS, os.getpid()


def put_in(queue: Any, x: Any) -> Any:
    queue.put(x)
    return x


def failing_initializer(gate: str, marks: str) -> None:
    Path(marks, f"init{os.getpid()}").touch()
    await_file(gate, GATE_DEADLINE)  # (until the test has submitted: the pool is not broken before)
    raise ValueError("error in initializer")


def dying_initializer(gate: str) -> None:
    await_file(gate, GATE_DEADLINE)
    os._exit(3)


_INIT_CACHE: dict[str, str] = {}  # filled by a by-value initializer in a test (in its own copy)


# -- helpers ----------------------------------------------------------------


class Gate:
    """A file the blocked jobs wait for; opened on exit whatever happened."""

    def __init__(self, tmp_path: Path, name: str = "gate") -> None:
        self.path = tmp_path / name
        self.tmp_path = tmp_path

    def open(self) -> None:
        self.path.touch()

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.open()


def start_blocker(pool: procsched.Pool, gate: Gate, name: str = "blocker") -> cf.Future[Any]:
    """Submit a job that blocks on ``gate``; return once it runs."""
    started = gate.tmp_path / f"{name}.started"
    fut = pool.submit(blocker, str(started), str(gate), name)
    wait_for(started.exists, WAIT, f"{name} to start")
    return fut


# A job queued behind a running one on a pool of one worker has not begun,
# so the Executor contract lets cancel() take it back, whatever the pool did
# before. A fresh pool prefetches nothing until it has seen a job finish; a
# pool that has run short jobs prefetches several behind the running one
# (the default config); max_prefetch=0 never does.
QUEUED_CASES = [
    pytest.param({}, 0, id="fresh-pool"),
    pytest.param({"max_prefetch": 0}, 100, id="no-prefetch"),
]


def warm_up(pool: procsched.Pool, jobs: int) -> int:
    """Run short jobs first, so the pool knows jobs to be short; how many ran."""
    assert [f.result(timeout=WAIT) for f in [pool.submit(square, i) for i in range(jobs)]] == [i * i for i in range(jobs)]
    return jobs


def stats_reach(pool: procsched.Pool, **expected: int) -> None:
    wait_for(lambda: all(pool.stats()[k] == v for k, v in expected.items()), WAIT, f"stats {expected}")


def not_begun(pool: procsched.Pool, futures: Sequence[cf.Future[Any]], submitted: int) -> None:
    """Assert that queued jobs stay not running once the loop has taken them in.

    The loop admits a job and dispatches it in the same turn; a short window
    after the admission shows what it decided. (A window can only make a
    wrong decision go unseen, never fail a right one.)
    """
    stats_reach(pool, submitted=submitted)
    end = time.monotonic() + 0.2
    while True:
        running = [i for i, f in enumerate(futures) if f.running()]
        assert not running, f"queued jobs {running} were marked running behind a job that has not ended"
        if time.monotonic() > end:
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def closed_pool() -> Iterator[procsched.Pool]:
    """A pool already shut down (no process left): enough to validate options on."""
    with procsched.Pool(1) as pool:
        pass
    yield pool


# -- submit and futures -----------------------------------------------------


@pytest.mark.timeout(30)
def test_submit_returns_result_with_args_and_kwargs() -> None:
    with procsched.Pool(1) as pool:
        assert pool.submit(square, 7).result(timeout=WAIT) == 49
        assert pool.submit(add, 2, b=3).result(timeout=WAIT) == 5
        assert pool.submit(echo, 1, "two", x=[3]).result(timeout=WAIT) == ((1, "two"), {"x": [3]})


@pytest.mark.timeout(30)
def test_submit_accepts_a_kwarg_named_fn() -> None:
    with procsched.Pool(1) as pool:
        assert pool.submit(echo, fn="f", self="s").result(timeout=WAIT) == ((), {"fn": "f", "self": "s"})
        assert pool.options(priority=1).submit(echo, 1, fn=2).result(timeout=WAIT) == ((1,), {"fn": 2})


@pytest.mark.timeout(30)
def test_submit_rejects_a_non_callable() -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(TypeError, match="not callable"):
            pool.submit(42)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_futures_are_concurrent_futures_and_wait_all_completed() -> None:
    with procsched.Pool(1) as pool:
        futs = [pool.submit(square, i) for i in range(20)]
        assert all(isinstance(f, cf.Future) for f in futs)
        done, not_done = cf.wait(futs, timeout=WAIT, return_when=cf.ALL_COMPLETED)
        assert done == set(futs) and not not_done
        assert [f.result() for f in futs] == [i * i for i in range(20)]
        assert all(f.done() and not f.cancelled() and not f.running() for f in futs)


@pytest.mark.timeout(30)
def test_wait_first_completed_returns_before_a_blocked_job(tmp_path: Path) -> None:
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        slow = pool.submit(blocker, str(tmp_path / "s"), str(gate), "slow")
        quick = pool.submit(square, 3)
        done, not_done = cf.wait([slow, quick], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
        assert done == {quick} and not_done == {slow}
        gate.open()
        assert slow.result(timeout=WAIT) == "slow"


@pytest.mark.timeout(30)
def test_wait_first_exception_returns_on_a_failure(tmp_path: Path) -> None:
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        slow = pool.submit(blocker, str(tmp_path / "s"), str(gate), "slow")
        ok = pool.submit(square, 2)
        assert ok.result(timeout=WAIT) == 4
        bad = pool.submit(boom, "first exception")
        done, not_done = cf.wait([slow, ok, bad], timeout=WAIT, return_when=cf.FIRST_EXCEPTION)
        assert done == {ok, bad} and not_done == {slow}
        assert isinstance(bad.exception(), Boom)


@pytest.mark.timeout(30)
def test_as_completed_yields_in_completion_order(tmp_path: Path) -> None:
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        slow = pool.submit(blocker, str(tmp_path / "s"), str(gate), "slow")
        quick = pool.submit(square, 5)
        both: list[cf.Future[Any]] = [slow, quick]
        it = cf.as_completed(both, timeout=WAIT)
        assert next(it) is quick
        gate.open()
        assert next(it) is slow
        assert slow.result() == "slow" and quick.result() == 25


@pytest.mark.timeout(30)
def test_add_done_callback_fires_even_if_one_raises() -> None:
    seen: list[tuple[cf.Future[Any], Any]] = []
    chained: list[cf.Future[Any]] = []
    fired = threading.Event()

    with procsched.Pool(1) as pool:

        def broken(f: cf.Future[Any]) -> None:
            raise RuntimeError("a callback's bug must not hurt the pool")

        def record(f: cf.Future[Any]) -> None:
            seen.append((f, f.result()))
            chained.append(pool.submit(square, f.result()))  # submitting from a callback works
            fired.set()

        fut = pool.submit(square, 3)
        fut.add_done_callback(broken)
        fut.add_done_callback(record)
        assert fired.wait(WAIT)
        assert seen == [(fut, 9)]
        assert chained[0].result(timeout=WAIT) == 81

        late: list[cf.Future[Any]] = []
        fut.add_done_callback(late.append)  # added after completion: runs at once, here
        assert late == [fut]
        assert pool.submit(square, 4).result(timeout=WAIT) == 16


@pytest.mark.timeout(30)
def test_result_timeout_raises_timeout_error_for_a_slow_job(tmp_path: Path) -> None:
    with procsched.Pool(1) as pool, Gate(tmp_path) as gate:
        fut = pool.submit(blocker, str(tmp_path / "s"), str(gate), "finally")
        with pytest.raises(cf.TimeoutError):  # the builtin one on 3.11+
            fut.result(timeout=0.2)
        with pytest.raises(cf.TimeoutError):  # the builtin one on 3.11+
            fut.exception(timeout=0.05)
        assert not fut.done()
        gate.open()
        assert fut.result(timeout=WAIT) == "finally"


# -- map --------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [None, 1, 7, 10_000])
def test_map_results_are_ordered_and_iterables_zip_to_the_shortest(chunksize: int | None) -> None:
    with procsched.Pool(2) as pool:
        assert list(pool.map(square, range(200), chunksize=chunksize)) == [i * i for i in range(200)]
        assert list(pool.map(square, (i for i in range(7)), chunksize=chunksize)) == [i * i for i in range(7)]
        assert list(pool.map(square, [], chunksize=chunksize)) == []
        assert list(pool.map(add, [1, 2, 3, 4], [10, 20, 30], chunksize=chunksize)) == [11, 22, 33]
        assert list(pool.map(add, range(100), iter(range(1000)), chunksize=chunksize)) == [2 * i for i in range(100)]
        assert list(pool.map(add, range(5), [], chunksize=chunksize)) == []


@pytest.mark.timeout(30)
def test_map_keeps_order_when_a_later_item_finishes_first(tmp_path: Path) -> None:
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        it = pool.map(maybe_block, [0, 1], [str(gate), None], [str(tmp_path)] * 2, chunksize=1)
        wait_for((tmp_path / "done1").exists, WAIT, "item 1 to finish")
        assert not (tmp_path / "done0").exists()
        gate.open()
        assert list(it) == [0, 10]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_map_yields_early_results_while_the_last_job_runs(tmp_path: Path, chunksize: int | None) -> None:
    n = 40
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        gates = [None] * (n - 1) + [str(gate)]
        it = pool.map(maybe_block, range(n), gates, [str(tmp_path)] * n, chunksize=chunksize)
        assert [next(it) for _ in range(n - 5)] == [x * 10 for x in range(n - 5)]
        assert not (tmp_path / f"done{n - 1}").exists(), "the last job is still blocked on its gate"
        gate.open()
        assert list(it) == [x * 10 for x in range(n - 5, n)]
        assert (tmp_path / f"done{n - 1}").exists()


@pytest.mark.timeout(30)
def test_map_timeout_raises_timeout_error(tmp_path: Path) -> None:
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        it = pool.map(blocker, [str(tmp_path / "s")], [str(gate)], ["v"], timeout=0.3)
        with pytest.raises(cf.TimeoutError):  # the builtin one on 3.11+
            next(it)
        gate.open()
    assert not children()


@pytest.mark.timeout(30)
def test_map_exception_surfaces_at_its_item() -> None:
    with procsched.Pool(2) as pool:
        it = pool.map(fail_on, range(8), [3] * 8, chunksize=1)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="item 3 is bad") as info:
            next(it)
        assert isinstance(info.value.__cause__, procsched.RemoteTraceback)
        assert "fail_on" in str(info.value.__cause__)
        assert list(it) == []  # a map that raised is finished

        # the default sends calls in batches, yet each call keeps its own outcome
        it = pool.map(fail_on, range(200), [150] * 200)
        assert [next(it) for _ in range(150)] == list(range(150))
        with pytest.raises(ValueError, match="item 150 is bad"):
            next(it)

        # an explicit chunksize > 1 makes a chunk one job: it fails as a whole
        it = pool.map(fail_on, range(200), [155] * 200, chunksize=10)
        assert [next(it) for _ in range(150)] == list(range(150))
        with pytest.raises(ValueError, match="item 155 is bad"):
            next(it)
        assert pool.submit(square, 2).result(timeout=WAIT) == 4


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [0, -1, "x", 1.5, True])
def test_map_rejects_an_invalid_chunksize(chunksize: Any) -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(square, range(3), chunksize=chunksize)


# -- shutdown and lifecycle -------------------------------------------------


@pytest.mark.timeout(30)
def test_shutdown_wait_waits_for_running_and_queued_work(tmp_path: Path) -> None:
    with procsched.Pool(1) as pool, Gate(tmp_path) as gate:  # the exit is a second shutdown
        first = start_blocker(pool, gate)
        queued = [pool.submit(touch, str(tmp_path / f"q{i}")) for i in range(5)]
        closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
        closer.start()
        closer.join(0.2)
        assert closer.is_alive(), "shutdown(wait=True) returned while a job was blocked"
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit(square, 1)  # closed at once, even while it drains
        gate.open()
        closer.join(WAIT)
        assert not closer.is_alive()
    assert first.result(timeout=0) == "blocker"
    assert [f.result(timeout=0) for f in queued] == [str(tmp_path / f"q{i}") for i in range(5)]
    assert not children(), "shutdown(wait=True) returned before its workers were gone"
    assert our_segments() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("config", "warm"), QUEUED_CASES)
def test_shutdown_cancel_futures_cancels_queued_and_finishes_running(
    tmp_path: Path, config: dict[str, Any], warm: int
) -> None:
    with procsched.Pool(1, **config) as pool, Gate(tmp_path) as gate:  # the exit is a second shutdown
        ran = warm_up(pool, warm)
        running = start_blocker(pool, gate)
        queued = [pool.submit(touch, str(tmp_path / f"q{i}")) for i in range(5)]
        not_begun(pool, queued, submitted=ran + 6)
        pool.shutdown(wait=False, cancel_futures=True)
        wait_for(lambda: all(f.cancelled() for f in queued), WAIT, "the queued futures to be cancelled")
        assert not running.done()
        gate.open()
        pool.shutdown(wait=True)
    assert running.result(timeout=0) == "blocker"
    for f in queued:
        with pytest.raises(cf.CancelledError):
            f.result(timeout=0)
    assert not any(tmp_path.glob("q*")), "a cancelled job ran"
    assert (pool.stats()["cancelled"], pool.stats()["succeeded"]) == (5, ran + 1)


@pytest.mark.timeout(30)
def test_submit_and_map_after_shutdown_raise_runtime_error_and_leak_nothing() -> None:
    pool = procsched.Pool(1)
    pool.shutdown()
    big = os.urandom(1 << 20)  # would travel out of band: a segment must not be left behind
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(square, 2)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(identity, big)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.map(square, range(3))
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.map(identity, [big, big], chunksize=1)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.options(priority=1).submit(square, 2)
    assert our_segments() == []


@pytest.mark.timeout(30)
def test_shutdown_twice_is_fine() -> None:
    with procsched.Pool(1) as pool:
        assert pool.submit(square, 3).result(timeout=WAIT) == 9
        pool.shutdown(wait=True)
    pool.shutdown(wait=True)
    # the loop is gone: these must not ring its closed doorbell (an fd number
    # that may already belong to another file)
    pool.shutdown(wait=False, cancel_futures=True)
    pool.terminate()
    assert not children()

    with procsched.Pool(1) as pool:  # and twice while the loop still runs
        pool.shutdown(wait=False)
        pool.shutdown(wait=False, cancel_futures=True)
        pool.shutdown(wait=True)
    assert not children()


@pytest.mark.timeout(30)
def test_a_pool_dropped_without_shutdown_finishes_its_jobs_then_stops(tmp_path: Path) -> None:
    # As the stdlib's executors do once collected: the last reference going is
    # shutdown(wait=False), not workers that live until the interpreter exits.
    with Gate(tmp_path) as gate:
        pool = procsched.Pool(2)
        running = start_blocker(pool, gate)
        queued = pool.submit(square, 7)
        loop = pool._sup.thread
        gone = weakref.ref(pool)
        gc.disable()  # no cycle keeps it: it goes with its last reference, not at a collection
        try:
            del pool
            assert gone() is None, "the dropped pool is still referenced"
        finally:
            gc.enable()
        assert children(), "the workers went before the accepted jobs ran"
        with procsched.Pool(1) as other:  # its segments are its own while the dropped loop runs on
            assert other.submit(len, os.urandom(1 << 20)).result(timeout=WAIT) == 1 << 20
        gate.open()
        assert running.result(timeout=WAIT) == "blocker"
        assert queued.result(timeout=WAIT) == 49
        loop.join(WAIT)
        assert not loop.is_alive(), "the loop of a dropped pool runs on"
    assert not children(), "a dropped pool's workers outlived its loop"
    assert our_segments() == []


@pytest.mark.timeout(30)
def test_context_manager_shuts_down_and_waits(tmp_path: Path) -> None:
    with procsched.Pool(1) as pool:
        assert pool.submit(square, 2).result(timeout=WAIT) == 4
        futs = [pool.submit(touch, str(tmp_path / f"f{i}")) for i in range(10)]
    assert all(f.done() for f in futs)
    assert len(list(tmp_path.glob("f*"))) == 10
    assert not children()
    with pytest.raises(RuntimeError):
        pool.submit(square, 2)
    assert "closed" in repr(pool)


@pytest.mark.timeout(30)
def test_max_workers_defaults_to_the_loky_cpu_count() -> None:
    import loky

    with procsched.Pool() as pool:
        assert pool.max_workers == loky.cpu_count()
        assert len(pool.stats()["workers"]) == loky.cpu_count()
        assert sorted(pool.map(square, range(10))) == [i * i for i in range(10)]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_invalid_max_workers_is_rejected(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_workers"):
        procsched.Pool(value)
    assert not children()


@pytest.mark.timeout(10)
def test_unknown_pool_keyword_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="max_worker_count"):
        procsched.Pool(2, max_worker_count=3)
    assert not children()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("option", "value"),
    [("ring_bytes", 10), ("max_prefetch", -1), ("kill_grace", -0.5), ("stop_timeout", "5"), ("max_tasks_per_child", 1.5), ("idle_spin", -1e-4)],
)
def test_invalid_pool_option_names_it(option: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=option):
        procsched.Pool(1, **{option: value})
    assert not children()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("config", "warm"), QUEUED_CASES)
def test_cancel_a_queued_job_prevents_it_from_running(tmp_path: Path, config: dict[str, Any], warm: int) -> None:
    victim_ran = tmp_path / "victim"
    with procsched.Pool(1, **config) as pool, Gate(tmp_path) as gate:
        ran = warm_up(pool, warm)
        first = start_blocker(pool, gate)
        victim = pool.submit(touch, str(victim_ran))
        not_begun(pool, [victim], submitted=ran + 2)
        assert victim.cancel() is True
        assert victim.cancelled() and victim.done()
        assert first.cancel() is False, "a running job cannot be cancelled"
        gate.open()
        assert first.result(timeout=WAIT) == "blocker"
        # FIFO: once a later job has run, the victim would have run before it.
        assert pool.submit(touch, str(tmp_path / "after")).result(timeout=WAIT)
        stats_reach(pool, cancelled=1, succeeded=ran + 2)
    assert not victim_ran.exists()
    with pytest.raises(cf.CancelledError):
        victim.result()


@pytest.mark.timeout(30)
def test_on_a_warm_pool_only_the_small_prefetch_counts_as_running(tmp_path: Path) -> None:
    # A pool that knows its jobs to be short hands a worker a few more behind
    # the running one; like ProcessPoolExecutor's call queue, those count as
    # running (cancel() returns False). Everything past that stays cancellable.
    with procsched.Pool(1) as pool, Gate(tmp_path) as gate:
        ran = warm_up(pool, 200)
        first = start_blocker(pool, gate)
        queued = [pool.submit(square, i) for i in range(2000)]
        stats_reach(pool, submitted=ran + 1 + len(queued))
        wait_for(lambda: first.running(), WAIT, "the blocker to be running")
        prefetched = sum(f.running() for f in queued)
        assert prefetched <= pool._config.max_prefetch
        assert all(f.cancel() for f in queued[prefetched:])
        gate.open()
        assert [f.result(timeout=WAIT) for f in queued[:prefetched]] == [i * i for i in range(prefetched)]
        stats_reach(pool, cancelled=len(queued) - prefetched)


@pytest.mark.timeout(60)
def test_jobs_queued_behind_a_long_job_move_to_an_idle_worker(tmp_path: Path) -> None:
    # The pool knows jobs to be short, so each worker gets a prefetch; one of them
    # then runs a job that blocks. The short jobs placed behind it must not wait
    # for it while the other worker has nothing to do.
    with procsched.Pool(2) as pool, Gate(tmp_path) as gate:
        warm_up(pool, 200)
        first = start_blocker(pool, gate)
        quick = [pool.submit(square, i) for i in range(300)]
        assert [f.result(timeout=WAIT) for f in quick] == [i * i for i in range(300)]
        assert not first.done()
        gate.open()
        assert first.result(timeout=WAIT) == "blocker"


def _worker_of(pool: procsched.Pool, fut: cf.Future[Any]) -> int | None:
    """Which worker holds a job now (None: not placed on one)."""
    job = pool._sup.jobs.get(fut.job_id)  # type: ignore[attr-defined]
    return pool._sup.backend.worker_of(job.run) if job is not None and job.run else None


@pytest.mark.timeout(60)
def test_cancelling_a_job_queued_behind_a_long_one_lets_the_rest_move_on(tmp_path: Path) -> None:
    # Two workers, both inside jobs that block; short jobs are prefetched behind both.
    # Cancelling one queued behind the long job takes back everything behind it: the
    # cancelled one ends cancelled, and the others run on the other worker once it is free,
    # not after the long job.
    # (a generous prefetch_s: a worker's first job imports this module and skews how long
    # jobs seem, which would otherwise leave the short ones unprefetched)
    with procsched.Pool(2, prefetch_s=1.0) as pool, Gate(tmp_path, "long") as long_gate, Gate(tmp_path, "short") as short_gate:
        warm_up(pool, 200)
        long_job = start_blocker(pool, long_gate, "long")
        short_job = start_blocker(pool, short_gate, "short")
        quick = [pool.submit(square, i) for i in range(40)]
        held_by_long = _worker_of(pool, long_job)
        behind = wait_for(lambda: [f for f in quick if _worker_of(pool, f) == held_by_long], WAIT, "a quick job behind the long one")
        assert isinstance(behind, list)
        victim = behind[-1]
        assert pool.cancel(victim) is True
        short_gate.open()
        rest = [f for f in quick if f is not victim]
        assert [f.result(timeout=WAIT) for f in rest] == [i * i for i, f in enumerate(quick) if f is not victim]
        assert victim.cancelled()
        assert not long_job.done()  # (the rest did not wait for it)
        long_gate.open()
        assert long_job.result(timeout=WAIT) == "long" and short_job.result(timeout=WAIT) == "short"


@pytest.mark.timeout(60)
def test_cancelling_a_job_that_ran_says_so_even_before_its_outcome_is_read(tmp_path: Path) -> None:
    # A job's outcome is in its worker's ring, not yet read by the loop, and the worker has
    # begun the next job: a cancel of the first must answer False (it ran), not take it back.
    with procsched.Pool(1) as pool, Gate(tmp_path, "first") as first_gate, Gate(tmp_path, "second") as second_gate:
        warm_up(pool, 50)
        first = start_blocker(pool, first_gate, "first")
        second = pool.submit(blocker, str(tmp_path / "second.started"), str(second_gate), "second")
        wait_for(second.running, WAIT, "the second job to be placed on the worker")
        sup = pool._sup
        sup.baton.acquire()  # the loop runs no turn: the first job's outcome stays unread
        try:
            first_gate.open()  # the first job ends while the loop is held, and the second begins
            wait_for(lambda: (tmp_path / "second.started").exists(), WAIT, "the second job to start")
            assert not first.done(), "the loop read the outcome meanwhile"
            answers: list[bool] = []
            asking = threading.Thread(target=lambda: answers.append(pool.cancel(first)))
            asking.start()
            wait_for(lambda: sup.intake, WAIT, "the cancel to be posted")
        finally:
            sup.baton.release()
        asking.join(WAIT)
        assert answers == [False]
        assert first.result(timeout=WAIT) == "first"
        second_gate.open()
        assert second.result(timeout=WAIT) == "second"


# -- initializer (as ProcessPoolExecutor's) ----------------------------------------


@pytest.mark.timeout(30)
def test_the_initializer_runs_in_every_worker_before_its_first_job() -> None:
    # positional as the stdlib's: max_workers, mp_context, initializer, initargs
    with procsched.Pool(1, None, init_status, ("initialized",), max_tasks_per_child=1) as pool:
        seen = [pool.submit(init_status_and_pid).result(timeout=WAIT) for _ in range(3)]
    assert [status for status, _ in seen] == ["initialized"] * 3
    assert len({pid for _, pid in seen}) == 3, "each job was to run in a replacement worker"


@pytest.mark.timeout(30)
def test_a_failing_initializer_breaks_the_pool(tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    pool = procsched.Pool(2, initializer=failing_initializer, initargs=(str(gate), str(tmp_path)))
    futs = [pool.submit(square, i) for i in range(4)]
    gate.open()
    for f in futs:
        with pytest.raises(procsched.BrokenPool, match="initializer raised ValueError: error in initializer") as caught:
            f.result(timeout=WAIT)
        assert isinstance(caught.value, cf.BrokenExecutor)
    assert "error in initializer" in str(caught.value.__cause__), "the initializer's traceback is the cause"
    assert list(tmp_path.glob("init*")), "no worker ran the initializer"
    with pytest.raises(procsched.BrokenPool):
        pool.submit(square, 1)  # and from now on, every submit
    pool.shutdown(wait=True)
    assert not children()
    assert our_segments() == []


@pytest.mark.timeout(30)
def test_a_worker_that_dies_in_its_initializer_breaks_the_pool(tmp_path: Path) -> None:
    # As ProcessPoolExecutor's, not a boot failure respawned with backoff for ever.
    gate = Gate(tmp_path)
    pool = procsched.Pool(1, initializer=dying_initializer, initargs=(str(gate),))
    fut = pool.submit(square, 3)
    gate.open()
    with pytest.raises(procsched.BrokenPool, match="died in the pool's initializer with exit code 3"):
        fut.result(timeout=WAIT)
    with pytest.raises(procsched.BrokenPool):
        pool.submit(square, 1)
    pool.shutdown(wait=True)
    assert not children()


@pytest.mark.timeout(30)
def test_initializer_mistakes_raise_in_the_constructor() -> None:
    with pytest.raises(TypeError, match="initializer must be a callable"):
        procsched.Pool(1, initializer=3)
    with pytest.raises(TypeError, match="mp_context"):
        procsched.Pool(1, "spawn")
    with pytest.raises(procsched.SerializationError, match="initializer init_status"):
        procsched.Pool(1, initializer=init_status, initargs=(threading.Lock(),))
    assert not children()


@pytest.mark.timeout(30)
def test_a_by_value_initializer_that_sets_globals_is_warned_about() -> None:
    def init_local() -> None:  # (a nested function travels by value, as one from __main__ does)
        global INIT_STATUS
        INIT_STATUS = "set"

    def fill_local() -> None:
        _INIT_CACHE["model"] = "loaded"  # (state changed in place, not assigned)

    with pytest.warns(RuntimeWarning, match=r"init_local travels by value.*\(INIT_STATUS\)"):
        pool = procsched.Pool(1, initializer=init_local)
    pool.shutdown()
    with pytest.warns(RuntimeWarning, match=r"fill_local travels by value.*\(_INIT_CACHE\)"):
        pool = procsched.Pool(1, initializer=fill_local)
    pool.shutdown()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        procsched.Pool(1, initializer=init_status, initargs=("x",)).shutdown()  # importable: no warning


@pytest.mark.timeout(60)
def test_a_managers_proxy_passed_to_a_job_connects_back() -> None:
    # A Manager's proxy authenticates with the process's authkey, which
    # multiprocessing's own children inherit; the workers are given it.
    import multiprocessing

    with multiprocessing.Manager() as manager, procsched.Pool(1) as pool:
        queue = manager.Queue()
        assert pool.submit(put_in, queue, "sent").result(timeout=WAIT) == "sent"
        assert queue.get(timeout=WAIT) == "sent"


# -- job options -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_options_are_accepted_and_jobs_run_with_them() -> None:
    policy = procsched.RetryPolicy.make(2, backoff=0.01, on=[KeyError])
    with procsched.Pool(1) as pool:
        view = pool.options(priority=5, hot=True, timeout=10, retries=policy, preempt="kill", name="job", tags=["a", "b"])
        opts = view.job_options
        assert (opts.priority, opts.hot, opts.timeout, opts.retries, opts.preempt, opts.name, opts.tags) == (
            5, True, 10.0, policy, "kill", "job", ("a", "b"),
        )
        assert isinstance(opts.timeout, float)
        assert view.submit(square, 6).result(timeout=WAIT) == 36
        assert list(view.map(square, range(5))) == [0, 1, 4, 9, 16]
        assert pool.options(retries=3).job_options.retries.retries == 3
        assert pool.options(timeout=None, name=None).job_options.timeout is None
        assert pool.options(tags=(t for t in ["g1", "g2"])).job_options.tags == ("g1", "g2")
        assert pool.options(tags=[]).job_options.tags == ()


@pytest.mark.timeout(10)
def test_options_chain_and_leave_the_pool_unchanged() -> None:
    with procsched.Pool(1) as pool:
        view = pool.options(priority=1).options(timeout=5).options(tags=("x",))
        opts = view.job_options
        assert (opts.priority, opts.timeout, opts.tags) == (1, 5.0, ("x",))
        assert view.options(priority=2).job_options.timeout == 5.0
        assert opts.priority == 1, "a derived view does not change its parent"
        assert pool.options().job_options == procsched.JobOptions()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"priority": "high"}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": True}, "priority"),
        ({"hot": "yes"}, "hot"),
        ({"hot": 1}, "hot"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"retries": "3"}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": True}, "retries"),
        ({"preempt": "maybe"}, "preempt"),
        ({"preempt": None}, "preempt"),
        ({"name": 3}, "name"),
        ({"tags": "abc"}, "tags"),
        ({"tags": [1, 2]}, "tags"),
        ({"tags": 5}, "tags"),
        ({"tags": None}, "tags"),
        ({"priorty": 1}, "priorty"),
    ],
)
def test_invalid_option_raises_naming_the_option(closed_pool: procsched.Pool, changes: dict[str, Any], name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        closed_pool.options(**changes)
    with pytest.raises((ValueError, TypeError), match=name):
        closed_pool.options(priority=1).options(**changes)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": "3"}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"backoff": float("nan")}, "backoff"),
        ({"factor": 0.5}, "factor"),
        ({"max_backoff": float("inf")}, "max_backoff"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": "0.1"}, "jitter"),
        ({"on": [42]}, "on"),
        ({"on": [int]}, "on"),
        ({"on": 42}, "on"),
        ({"crashes": "no"}, "crashes"),
        ({"timeouts": None}, "timeouts"),
    ],
)
def test_retry_policy_make_validates(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        procsched.RetryPolicy.make(**kwargs)


@pytest.mark.timeout(10)
def test_retry_policy_make_normalises() -> None:
    p = procsched.RetryPolicy.make(3, backoff=1, on=ValueError, crashes=False)
    assert (p.retries, p.backoff, p.on, p.crashes, p.timeouts) == (3, 1.0, ("builtins.ValueError",), False, True)
    assert procsched.RetryPolicy.make(on=["pkg.MyError", KeyError]).on == ("pkg.MyError", "builtins.KeyError")


# -- cloudpickle ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_lambdas_closures_and_nested_functions_run() -> None:
    k = 7

    def nested(x: int) -> int:
        return x * k

    with procsched.Pool(1) as pool:
        assert pool.submit(lambda x: x + 1, 41).result(timeout=WAIT) == 42
        assert pool.submit(make_adder(5), 10).result(timeout=WAIT) == 15
        assert pool.submit(make_adder(6), 10).result(timeout=WAIT) == 16
        assert pool.submit(nested, 6).result(timeout=WAIT) == 42
        assert list(pool.map(lambda x: x * 3, range(10))) == [x * 3 for x in range(10)]
        assert list(pool.map(nested, range(10), chunksize=1)) == [x * 7 for x in range(10)]
        assert pool.submit(identity, lambda: "made here").result(timeout=WAIT)() == "made here"


@pytest.mark.timeout(30)
def test_a_rebound_global_is_seen_by_later_submits(monkeypatch: pytest.MonkeyPatch) -> None:
    by_value = lambda x: x * _FACTOR  # noqa: E731 - pickled by value, with the globals it reads
    with procsched.Pool(1) as pool:
        assert pool.submit(by_value, 3).result(timeout=WAIT) == 6
        monkeypatch.setattr(sys.modules[__name__], "_FACTOR", 10)
        assert pool.submit(by_value, 3).result(timeout=WAIT) == 30
        monkeypatch.setattr(sys.modules[__name__], "_FACTOR", 5)
        assert pool.submit(by_value, 3).result(timeout=WAIT) == 15
        assert list(pool.map(by_value, range(3))) == [0, 5, 10]


MAIN_SCRIPT = """
import functools
import os
import sys

import procsched

FACTOR = 2


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm2(self):
        return self.x ** 2 + self.y ** 2


def scale(p, k):
    return Point(p.x * k, p.y * k)


def times_factor(x):
    return x * FACTOR


if __name__ == "__main__":
    with procsched.Pool(2) as pool:
        p = pool.submit(scale, Point(1, 2), 3).result(timeout=30)
        print("point", type(p).__name__, isinstance(p, Point), p.x, p.y, p.norm2())
        print("map", list(pool.map(times_factor, range(5))))
        print("map1", list(pool.map(scale, [Point(1, 1)], [5], chunksize=1))[0].norm2())
        FACTOR = 10
        print("rebound", pool.submit(times_factor, 4).result(timeout=30))
        print("pid-ok", pool.submit(os.getpid).result(timeout=30) != os.getpid())
    sys.stdout.flush()
"""


@pytest.mark.timeout(60)
def test_functions_and_classes_defined_in_main_run(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    with subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=50)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "point Point True 3 6 45",
        "map [0, 2, 4, 6, 8]",
        "map1 50",
        "rebound 40",
        "pid-ok True",
    ]
    assert our_segments(proc.pid) == []


@pytest.mark.timeout(30)
def test_unpicklable_argument_raises_serialization_error_from_submit() -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(procsched.SerializationError, match="identity") as info:
            pool.submit(identity, threading.Lock())
        assert isinstance(info.value, pickle.PicklingError)
        assert isinstance(info.value, procsched.ProcschedError)

        lock = threading.Lock()
        with pytest.raises(procsched.SerializationError):
            pool.submit(lambda: lock)  # the function itself cannot be pickled
        with pytest.raises(procsched.SerializationError):
            pool.map(identity, [1, threading.Lock()], chunksize=1)
        with pytest.raises(procsched.SerializationError):
            pool.map(identity, [1, threading.Lock()], chunksize=2)

        assert pool.submit(square, 3).result(timeout=WAIT) == 9
        assert list(pool.map(square, range(4))) == [0, 1, 4, 9]
        stats_reach(pool, failed=0, jobs=0)
        assert pool.stats()["submitted"] == pool.stats()["succeeded"], "a call that failed to pickle was posted"


@pytest.mark.timeout(30)
def test_unpicklable_argument_in_map_leaves_no_segment() -> None:
    big = os.urandom(1 << 20)
    with procsched.Pool(1) as pool:
        with pytest.raises(procsched.SerializationError):
            pool.map(identity, [big, big, threading.Lock()], chunksize=1)
        assert our_segments() == []
        assert pool.submit(len, big).result(timeout=WAIT) == len(big)


@pytest.mark.timeout(30)
def test_unpicklable_result_fails_that_job_alone() -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(procsched.SerializationError, match="lock"):
            pool.submit(return_lock).result(timeout=WAIT)
        assert pool.submit(square, 5).result(timeout=WAIT) == 25


# -- job exceptions ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_job_exception_keeps_its_type_with_the_remote_traceback_as_cause() -> None:
    with procsched.Pool(1) as pool:
        fut = pool.submit(boom, "it went wrong")
        with pytest.raises(Boom, match="it went wrong") as info:
            fut.result(timeout=WAIT)
        cause = info.value.__cause__
        assert isinstance(cause, procsched.RemoteTraceback)
        assert "boom" in str(cause) and "it went wrong" in str(cause)
        exc = fut.exception(timeout=0)
        assert type(exc) is Boom and exc is info.value, "exception() returns the same decoded error"
        assert fut.done() and not fut.cancelled()

        with pytest.raises(ZeroDivisionError):
            pool.submit(divmod, 1, 0).result(timeout=WAIT)


@pytest.mark.timeout(30)
def test_job_exception_that_cannot_be_rebuilt_arrives_as_remote_error() -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(procsched.RemoteError) as info:
            pool.submit(raise_needs_two_args).result(timeout=WAIT)
        err = info.value
        assert err.type_name.endswith("NeedsTwoArgs")
        assert err.message == "left/right"
        assert "raise_needs_two_args" in str(err.__cause__)


# -- large buffers out of band -------------------------------------------------


@pytest.mark.timeout(60)
def test_large_numpy_arrays_round_trip_exactly() -> None:
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2048, 2048))  # 32 MiB of float64
    assert a.nbytes == 32 * 2**20
    with procsched.Pool(1) as pool:
        back = pool.submit(array_roundtrip, a).result(timeout=WAIT)
        assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
        doubled = pool.submit(array_times_two, a[:512]).result(timeout=WAIT)
        assert np.array_equal(doubled, a[:512] * 2)
        ints = np.arange(1 << 20, dtype=np.int32).reshape(1024, 1024)
        assert np.array_equal(pool.submit(array_roundtrip, ints.T).result(timeout=WAIT), ints.T)
        del back, doubled
        wait_for(lambda: our_segments() == [], WAIT, "argument and result segments to be unlinked")
    assert our_segments() == []


@pytest.mark.timeout(30)
def test_a_job_mutating_its_argument_array_does_not_change_the_callers() -> None:
    np = pytest.importorskip("numpy")
    a = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: out of band
    original = a.copy()
    with procsched.Pool(1) as pool:
        assert pool.submit(zero_out, a).result(timeout=WAIT) == 0
        assert np.array_equal(a, original)
        assert np.array_equal(pool.submit(array_roundtrip, a).result(timeout=WAIT), original)
    assert our_segments() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_large_bytes_and_bytearray_round_trip(kind: str) -> None:
    data = os.urandom(1 << 20)
    value = bytearray(data) if kind == "bytearray" else data
    with procsched.Pool(1) as pool:
        back = pool.submit(identity, value).result(timeout=WAIT)
        assert type(back) is type(value) and back == value
        rev = pool.submit(reverse, value).result(timeout=WAIT)
        assert type(rev) is type(value) and rev == value[::-1]
        made = pool.submit(make_bytes, 1 << 20, kind).result(timeout=WAIT)
        assert type(made) is type(value) and made == make_bytes(1 << 20, kind)
        assert pool.submit(len, value).result(timeout=WAIT) == 1 << 20
        del back, rev, made
        wait_for(lambda: our_segments() == [], WAIT, "argument and result segments to be unlinked")
    assert our_segments() == []


# -- throughput sanity (correctness only, never speed) -----------------------------


@pytest.mark.timeout(120)
def test_many_tiny_jobs_via_submit_all_complete() -> None:
    n = 100_000
    with procsched.Pool(2) as pool:
        futs = [pool.submit(square, i) for i in range(n)]
        assert sum(f.result(timeout=WAIT) for f in futs) == sum(i * i for i in range(n))
        stats_reach(pool, succeeded=n, failed=0)


@pytest.mark.timeout(120)
def test_many_tiny_jobs_via_map_all_complete() -> None:
    n = 100_000
    with procsched.Pool(2) as pool:
        assert sum(pool.map(square, range(n))) == sum(i * i for i in range(n))
        assert sum(pool.map(add, range(n), range(n), chunksize=500)) == n * (n - 1)


# -- stats -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stats_count_outcomes() -> None:
    with procsched.Pool(1) as pool:
        ok = [pool.submit(square, i) for i in range(3)]
        bad = [pool.submit(boom, "x") for _ in range(2)]
        cf.wait([*ok, *bad], timeout=WAIT)
        stats_reach(pool, submitted=5, succeeded=3, failed=2, cancelled=0, jobs=0, queued=0)
    s = pool.stats()
    assert (s["submitted"], s["succeeded"], s["failed"]) == (5, 3, 2)


# -- import hygiene ------------------------------------------------------------------


def _modules_after(statement: str, names: list[str]) -> list[str]:
    code = f"import sys\n{statement}\nprint([n for n in {names!r} if n in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
def test_supervisor_import_does_not_load_cloudpickle() -> None:
    assert _modules_after("import procsched.supervisor", ["cloudpickle"]) == []


@pytest.mark.timeout(30)
def test_a_pool_loads_croniter_only_with_its_first_cron_schedule() -> None:
    assert _modules_after("import procsched; p = procsched.Pool(1); p.submit(int, 1).result(); p.shutdown()", ["croniter"]) == []
    assert _modules_after("import procsched.schedule as s; s.CronSchedule('* * * * *')", ["croniter"]) == ["croniter"]


@pytest.mark.timeout(30)
def test_worker_import_loads_only_the_stdlib() -> None:
    heavy = ["msgspec", "structlog", "loky", "cloudpickle"]
    assert _modules_after("import procsched.worker", heavy) == []
    # nor the stdlib modules a worker's boot can do without (~15 ms of it on a small machine);
    # -S: with site's own imports (an editable install's hook loads re) out of the picture
    code = f"import sys; sys.path[:0] = {sys.path!r}; before = set(sys.modules); import procsched.worker; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert {"pickle", "re", "enum", "signal", "typing"} & set(eval(out.stdout)) == set()
    assert "msgspec" in _modules_after("import procsched.executor", heavy), "the check can see an import"


def interpreter() -> dict[str, Any]:
    """What site and the interpreter's flags set up at startup (self-contained: it also runs in a
    fresh interpreter, from its source)."""
    import builtins
    import sys

    def finder(f: Any) -> str:
        cls = f if isinstance(f, type) else type(f)  # (some finders are classes)
        return f"{cls.__module__}.{cls.__qualname__}"

    return {
        "flags": [sys.flags.no_site, sys.flags.isolated, sys.flags.no_user_site],  # (what a job's own children inherit)
        "prefix": (sys.prefix, sys.exec_prefix),
        "builtins": [name for name in ("exit", "quit", "help", "copyright") if hasattr(builtins, name)],
        # the import hooks the .pth files installed (an editable install of procsched's aside, and
        # the worker's own, which hands multiprocessing its authkey)
        "finders": [name for name in map(finder, sys.meta_path) if not name.startswith(("__editable___procsched", "procsched.worker."))],
    }


@pytest.mark.timeout(30)
def test_a_worker_runs_site_as_the_supervisor_did() -> None:
    """A worker's interpreter is set up as a fresh supervisor's would be: the venv, site's builtins,
    the .pth files' import hooks, and the flags its own child processes are started with (a
    worker started with -S would pass -S on to a job's multiprocessing children). The
    comparison is with a fresh interpreter: this one holds whatever the suite has imported."""
    import inspect
    import textwrap

    code = f"from typing import Any\n{textwrap.dedent(inspect.getsource(interpreter))}\nprint(repr(interpreter()))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert fresh.returncode == 0, fresh.stderr
    with procsched.Pool(1) as pool:
        theirs = pool.submit(interpreter).result(timeout=WAIT)
        their_path = pool.submit(_path).result(timeout=WAIT)
    assert theirs == eval(fresh.stdout)
    assert their_path == sys.path, "a worker imports from the supervisor's paths"


def _path() -> list[str]:
    return list(sys.path)


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


@pytest.mark.timeout(30)
@pytest.mark.parametrize("star", [False, True], ids=["one-iterable", "two-iterables"])
def test_batched_map_keeps_each_calls_outcome(star: bool) -> None:
    # 1,000 calls on two workers go out in batches of ~125: the failure of
    # call 500 must still surface exactly at call 500, after 0..499.
    with procsched.Pool(2) as pool:
        if star:
            it = pool.map(fail_at, range(1000), [500] * 1000)
        else:
            it = pool.map(functools.partial(fail_at, bad=500), range(1000))
        got = [next(it) for _ in range(500)]
        assert got == list(range(500))
        with pytest.raises(ValueError, match="bad item 500") as info:
            next(it)
        assert isinstance(info.value.__cause__, procsched.RemoteTraceback)
        assert pool.stats()["submitted"] < 100  # batched, not one job per call


def lock_at(x: int, bad: int) -> Any:
    return threading.Lock() if x == bad else x


@pytest.mark.timeout(30)
def test_batched_map_fails_only_the_call_whose_result_cannot_be_pickled() -> None:
    # As ProcessPoolExecutor.map: results 0..4 arrive, then the error at call 5.
    with procsched.Pool(1) as pool:
        it = pool.map(functools.partial(lock_at, bad=5), range(40))
        assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(procsched.SerializationError, match="lock"):
            next(it)
        assert pool.stats()["submitted"] < 40  # it was batched


def test_a_month_long_delay_or_timeout_leaves_the_loop_running() -> None:
    # poll() takes an int32 of milliseconds: a far timer must not overflow it
    with procsched.Pool(1) as pool:
        far = pool.options(delay=30 * 86400).submit(abs, -1)
        long = pool.options(timeout=30 * 86400.0).submit(abs, -2)
        assert long.result(10) == 2
        assert pool.submit(abs, -3).result(10) == 3
        assert pool.cancel(far)


class CountsPickles:
    pickled = 0

    def __reduce__(self) -> tuple[Any, ...]:
        CountsPickles.pickled += 1
        return (CountsPickles, ())


@pytest.mark.timeout(30)
def test_a_batched_map_pickles_its_function_once() -> None:
    # The batches carry the function's cached pickle: cloudpickle runs once per map,
    # not once per batch (it was most of a no-op map's cost in the caller).
    marker = CountsPickles()

    def double(x: int) -> int:
        assert type(marker) is CountsPickles  # in the closure: pickling double pickles it
        return x * 2

    CountsPickles.pickled = 0
    with procsched.Pool(2) as pool:
        assert list(pool.map(double, range(1000))) == [2 * x for x in range(1000)]
        assert pool.stats()["submitted"] >= 8, "the map went out in batches"
    assert CountsPickles.pickled == 1


def fail_or_wait(x: int, bad: int, gate: str) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    if x >= 10:  # every batch after the first waits for the test
        await_file(gate)
    return x


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["error", "close"])
def test_a_batched_map_that_ends_early_cancels_the_batches_after_it(tmp_path: Path, how: str) -> None:
    # 40 calls on one worker: batches of 10. As with the stdlib's map, an error (or close())
    # ends the iteration and cancels what has not started; the running batch finishes.
    gate = tmp_path / "gate"
    with procsched.Pool(1) as pool:
        it = pool.map(functools.partial(fail_or_wait, bad=3 if how == "error" else -1, gate=str(gate)), range(40))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        if how == "error":
            with pytest.raises(ValueError, match="bad item 3"):
                next(it)
        else:
            it.close()  # type: ignore[attr-defined]
        assert list(it) == []
        gate.touch()  # the running batch ends; the loop drops the cancelled ones it comes to
        wait_for(lambda: pool.stats()["cancelled"] + pool.stats()["succeeded"] == 4, WAIT, "every batch to end")
        assert pool.stats()["cancelled"] >= 1, "the batches not started were cancelled"


@pytest.mark.timeout(30)
def test_a_map_sees_what_changed_in_place_since_the_last_map() -> None:
    # A function pickled by value is pickled afresh for each map (as ProcessPoolExecutor
    # pickles it for every call), and later submits reuse that fresher pickle.
    cfg = {"k": 1}

    def scaled(x: int) -> int:
        return x * cfg["k"]

    with procsched.Pool(2) as pool:
        assert list(pool.map(scaled, range(100))) == list(range(100))
        cfg["k"] = 100
        assert list(pool.map(scaled, range(100))) == [100 * x for x in range(100)]
        assert pool.submit(scaled, 2).result(timeout=WAIT) == 200


@pytest.mark.timeout(30)
def test_reconfigure_from_a_done_callback_applies_by_the_next_turn(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    answers: list[Any] = []
    with procsched.Pool(2) as pool:
        fut = pool.submit(blocker, str(started), str(gate), 7)
        wait_for(started.exists, WAIT, "the job to start")
        fut.add_done_callback(lambda _: answers.append(pool.reconfigure({"max_workers": 1})))
        gate.touch()
        assert fut.result(timeout=WAIT) == 7
        wait_for(lambda: answers, WAIT, "the callback to run")
        assert answers == [["max_workers"]] and pool.max_workers == 1
        wait_for(lambda: len(pool.stats()["workers"]) == 1, WAIT, "the pool to shrink to one worker")
        assert pool.submit(square, 5).result(timeout=WAIT) == 25
