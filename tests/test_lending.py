"""A caller that waits runs the loop itself while the loop's thread sleeps (``lending.py``).

Given a pool whose loop sleeps, when a caller submits a job and waits for
it, then the turns that place the job and settle its future run on the
caller's own thread; and whatever else happens meanwhile (other threads'
jobs, a crash, a Ctrl-C, a done-callback that asks the pool something) is
handled as well as when the loop's thread does it.

The Ctrl-C cases run as scripts of their own, so that a KeyboardInterrupt
that escapes cannot stop this test session.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import alive, await_file, wait_for

import procsched

RESULT = 20.0
REPO = str(Path(procsched.__file__).resolve().parents[1])


def square(x: int) -> int:
    return x * x


def gated(gate: str, value: Any) -> Any:
    """Say it runs (``gate.started``), then wait for the test to open ``gate``."""
    Path(f"{gate}.started").touch()
    await_file(gate, RESULT)
    return value


def gated_crash(gate: str) -> None:
    Path(f"{gate}.started").touch()
    await_file(gate, RESULT)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(30)
def test_a_round_trip_runs_its_turns_on_the_callers_thread() -> None:
    with procsched.Pool(2) as pool:
        for i in range(20):  # warm: both workers up, the loop asleep between jobs
            assert pool.submit(square, i).result(timeout=RESULT) == i * i
        sup = pool._sup
        turn = sup._turn
        threads: list[int] = []

        def counted(now: float, ready: Any) -> None:
            threads.append(threading.get_ident())
            turn(now, ready)

        sup._turn = counted  # type: ignore[method-assign]
        settled_on: list[int] = []
        for i in range(50):
            f = pool.submit(square, i)
            f.add_done_callback(lambda _: settled_on.append(threading.get_ident()))
            assert f.result(timeout=RESULT) == i * i
        me = threading.get_ident()
        # Now and then a worker answers before the caller is back to wait, and the
        # loop's thread takes that turn; most turns are the caller's.
        assert threads.count(me) >= len(threads) // 2, (threads.count(me), len(threads))
        assert settled_on.count(me) >= 25, settled_on.count(me)
        sup._turn = turn  # type: ignore[method-assign]


@pytest.mark.timeout(60)
def test_a_caller_waiting_on_a_blocked_job_serves_every_other_thread(tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with procsched.Pool(2, max_prefetch=0) as pool:  # (no job waits behind the blocked one)
        pool.submit(square, 1).result(timeout=RESULT)
        blocked = pool.submit(gated, gate, "late")
        wait_for(lambda: os.path.exists(f"{gate}.started"), RESULT, "the blocked job to start")
        results: list[Any] = []
        waited: list[Any] = []

        def other_thread() -> None:
            results.extend(f.result(timeout=RESULT) for f in [pool.submit(square, x) for x in range(200)])
            watched = pool.submit(square, 12)
            done, _ = cf.wait([watched], timeout=RESULT)  # a waiter that does not borrow the loop
            waited.extend(f.result() for f in done)
            Path(gate).touch()  # only then may the main thread's job end

        t = threading.Thread(target=other_thread)
        t.start()
        assert blocked.result(timeout=RESULT) == "late"  # the main thread runs the loop meanwhile
        t.join(RESULT)
        assert results == [x * x for x in range(200)]
        assert waited == [144]


@pytest.mark.timeout(60)
def test_a_crash_while_the_caller_runs_the_loop_costs_one_job_and_one_restart(tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with procsched.Pool(1) as pool:
        pool.submit(square, 1).result(timeout=RESULT)
        doomed = pool.submit(gated_crash, gate)
        wait_for(lambda: os.path.exists(f"{gate}.started"), RESULT, "the job to start")
        threading.Timer(0.05, lambda: Path(gate).touch()).start()
        with pytest.raises(procsched.WorkerCrashed):
            doomed.result(timeout=RESULT)  # the caller reaps the worker and respawns it
        # The loop's thread woke on the same death: what it saw is stale now (the pidfd
        # was closed, and its number may be the new worker's), and must not reap again.
        assert [pool.submit(square, i).result(timeout=RESULT) for i in range(30)] == [i * i for i in range(30)]
        pid = pool.stats()["workers"][0]["pid"]
        assert alive(pid)
        assert pool.stats()["restarts"] == 1


@pytest.mark.timeout(60)
def test_a_done_callback_on_a_borrowed_turn_cannot_wait_for_the_loop(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def asks_the_pool(_: Any) -> None:
        try:
            pool.jobs()  # waits for the loop's answer: it would wait for itself
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with procsched.Pool(1) as pool:
        for i in range(5):
            gate = tmp_path / f"gate{i}"
            f = pool.submit(gated, str(gate), i)  # not done before the callback is added
            f.add_done_callback(asks_the_pool)
            gate.touch()
            assert f.result(timeout=RESULT) == i  # mostly settled by this thread's own turn
        wait_for(lambda: len(errors) == 5, RESULT, "the callbacks to run")
    assert all(isinstance(e, procsched.PoolError) and "done-callback" in str(e) for e in errors), errors


def _run(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(text))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)


INTERRUPTED_TURN = """
import os, signal, sys, threading
import procsched

signal.signal(signal.SIGINT, signal.default_int_handler)

def square(x):
    return x * x

with procsched.Pool(1) as pool:
    assert pool.submit(square, 2).result() == 4
    sup = pool._sup
    dispatch = sup._dispatch
    hits = []

    def interrupted(now, booting=False):
        # A Ctrl-C lands in the middle of a turn run by the main thread: its
        # handler must not run until the turn is over.
        if not hits and threading.current_thread() is threading.main_thread():
            hits.append(1)
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # bytecodes, where a Python handler would run at once
        dispatch(now, booting)

    sup._dispatch = interrupted
    fut = None
    try:
        fut = pool.submit(square, 3)
        fut.result()
    except KeyboardInterrupt:
        print("interrupted", "after" if fut is not None else "in submit", flush=True)
    sup._dispatch = dispatch
    assert hits, "no turn ran on the main thread"
    if fut is not None:
        assert fut.result(timeout=20) == 9
    assert sup.crashed is None and sup.lent_failure is None
    assert [pool.submit(square, i).result(timeout=20) for i in range(10)] == [i * i for i in range(10)]
    print("ok", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_ctrl_c_is_held_back_until_the_turn_it_lands_in_is_over(tmp_path: Path) -> None:
    proc = _run(tmp_path, INTERRUPTED_TURN)
    assert proc.returncode == 0, proc.stderr
    assert "interrupted" in proc.stdout and proc.stdout.rstrip().endswith("ok"), proc.stdout + proc.stderr


INTERRUPTED_WAIT = """
import os, signal, sys, threading, time
from pathlib import Path
import procsched

signal.signal(signal.SIGINT, signal.default_int_handler)
gate = os.path.join(sys.argv[1], "gate")

def gated(gate):
    Path(gate + ".started").touch()
    while not os.path.exists(gate):
        time.sleep(0.002)
    return "done"

with procsched.Pool(1) as pool:
    fut = pool.submit(gated, gate)
    while not os.path.exists(gate + ".started"):
        time.sleep(0.002)
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        fut.result(timeout=20)  # asleep in the borrowed loop's poll when Ctrl-C comes
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    Path(gate).touch()
    assert fut.result(timeout=20) == "done"
    assert pool.submit(abs, -5).result(timeout=20) == 5
    assert pool._sup.crashed is None
    print("ok", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_waiting_interrupts_the_wait_and_nothing_else(tmp_path: Path) -> None:
    proc = _run(tmp_path, INTERRUPTED_WAIT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["interrupted", "ok"], proc.stdout + proc.stderr


CTRL_C_STORM = """
import os, signal, sys, threading, time, random
import procsched

def handler(signum, frame):
    # A Ctrl-C lands wherever the main thread is; only where it is inside procsched does it
    # matter here (the script's own bookkeeping stays out of the way).
    if frame is None or "procsched" in frame.f_code.co_filename:
        raise KeyboardInterrupt
signal.signal(signal.SIGINT, handler)

main = threading.main_thread().ident
stop = threading.Event()

def storm():
    while not stop.is_set():
        time.sleep(random.uniform(0, 0.0003))
        signal.pthread_kill(main, signal.SIGINT)

pool = procsched.Pool(2)
for _ in range(20):
    pool.submit(abs, -1).result(timeout=10)
sup = pool._sup
threading.Thread(target=storm, daemon=True).start()
hits = done = 0
end = time.monotonic() + 2.0
while time.monotonic() < end:
    try:
        pool.submit(abs, -1).result(timeout=5)
        done += 1
    except KeyboardInterrupt:
        hits += 1
stop.set()
signal.signal(signal.SIGINT, signal.SIG_IGN)
time.sleep(0.05)  # (the storm thread's last signal)
assert hits > 10 and done > 10, (hits, done)
assert sup.crashed is None and sup.lent_failure is None, (sup.crashed, sup.lent_failure)
out = []
t = threading.Thread(target=lambda: out.append(pool.submit(abs, -7).result(timeout=10)), daemon=True)
t.start()
t.join(15)
assert out == [7], "a job after the storm did not finish: the loop is stuck"
pool.shutdown()
print("ok", hits, done, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_storm_of_ctrl_c_leaves_the_loop_sound(tmp_path: Path) -> None:
    # Thousands of KeyboardInterrupts land all over submit() and result() on the main
    # thread; whatever each one interrupts, the loop must not be left held or half-turned.
    proc = _run(tmp_path, CTRL_C_STORM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout + proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spin", [0.0002, 1.0])
def test_watching_the_rings_sees_an_outcome_a_post_or_nothing(spin: float, tmp_path: Path) -> None:
    # What a borrower does before it sleeps (backends/local.py: watch): it returns as soon
    # as a busy worker's ring has an outcome or the intake has a post, and not before; a
    # worker whose job has run longer than the watch would last is not watched at all.
    from collections import deque

    gate = str(tmp_path / "gate")
    with procsched.Pool(1, idle_spin=spin) as pool:
        backend = pool._sup.backend
        assert backend.watch(time.monotonic() + 5.0, deque()) is None  # no worker busy: nothing to wait for
        f = pool.submit(gated, gate, 1)
        wait_for(lambda: os.path.exists(f"{gate}.started"), RESULT, "the job to start")
        t0 = time.monotonic()
        if spin < 0.1:  # the job has run longer than a watch of 0.2 ms: none is made
            assert backend.watch(t0 + 5.0, deque(["a post"])) is None
            assert time.monotonic() - t0 < 2.5
            Path(gate).touch()
            assert f.result(timeout=RESULT) == 1
            return
        assert backend.watch(t0 + 0.05, deque()) is None
        assert time.monotonic() - t0 >= 0.05
        assert backend.watch(time.monotonic() + 5.0, deque(["a post"])) == []
        pool._sup.baton.acquire()  # (the loop must not take the outcome first)
        try:
            Path(gate).touch()
            t0 = time.monotonic()
            assert backend.watch(t0 + RESULT, deque()) == []
            assert time.monotonic() - t0 < RESULT / 2
        finally:
            pool._sup.baton.release()
        assert f.result(timeout=RESULT) == 1
