"""What happens when things break: real processes, real signals, real files.

Given a pool, when a job crashes its worker, hangs, raises, cannot be
pickled, eats memory, or when the caller is killed or interrupted, then the
failure costs that one job (or nothing at all), it is reported with a
precise error, and the pool goes on working; nothing is left behind.

Job functions live at module level so that they pickle by reference; a job
tells the test where it stands through files in ``tmp_path`` (its pid, a
counter of attempts) and waits on a "go" file, so every wait here is on a
condition with a deadline, never on a guess of how long something takes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import alive, await_file, children, our_segments, wait_for

import procsched

MiB = 2**20
JOB_WAIT = 30.0  # how long a job waits for the test before giving up
RESULT = 20.0  # how long the test waits for a future
REPO = str(Path(procsched.__file__).resolve().parents[1])


# -- small tools shared by jobs and tests ---------------------------------------


def _put(path: str | Path, text: str) -> None:
    """Write a file atomically, so a reader never sees it half written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_int(path: str | Path) -> int | None:
    try:
        return int(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _bump(path: str) -> int:
    """Count one more attempt in a counter file; the new count."""
    n = (_read_int(path) or 0) + 1
    _put(path, str(n))
    return n


def _arrive(gate: str) -> None:
    """Tell the test this job is running (its pid in ``gate/pid``); wait for ``gate/go``."""
    _put(os.path.join(gate, "pid"), str(os.getpid()))
    await_file(os.path.join(gate, "go"), JOB_WAIT)


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _job_pid(gate: Path) -> int:
    """Wait for the job to report its pid in ``gate/pid``."""
    pid = wait_for(lambda: _read_int(gate / "pid"), RESULT, "the job to start")
    assert isinstance(pid, int)
    return pid


def _messages(caplog: pytest.LogCaptureFixture, *events: str) -> list[str]:
    """The rendered log lines (``event key=value ...``) of these events."""
    return [m for m in (r.getMessage() for r in caplog.records) if m.split(" ", 1)[0] in events]


DEATHS = ("worker_died", "worker_killed")  # a crash, or a kill of ours


# -- jobs -----------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def square_and_attempt(x: int) -> tuple[int, int]:
    return x * x, procsched.current_job().attempt


def whoami() -> int:
    return os.getpid()


class TwoArgError(Exception):
    """Pickles fine, but cannot be unpickled: ``args`` holds one of its two arguments."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what} {why}")


class LockedError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BadStrError(Exception):
    """Its ``__str__`` raises, wherever it is called."""

    def __str__(self) -> str:
        raise RuntimeError("no str for this one")


def crash_segfault(gate: str) -> None:
    _arrive(gate)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file for this one
    ctypes.string_at(0)


def crash_exit(gate: str) -> None:
    _arrive(gate)
    os._exit(3)


def blocked(gate: str) -> str:
    _arrive(gate)  # the test SIGKILLs this worker instead of opening the gate
    return "the gate opened"


def raise_value_error(gate: str) -> None:
    _arrive(gate)
    raise ValueError("boom from the job")


def takes_anything(gate: str, thing: object) -> None:
    raise AssertionError("never runs: its argument cannot be pickled")


def return_lock(gate: str) -> object:
    _arrive(gate)
    return threading.Lock()


def raise_unloadable(gate: str) -> None:
    _arrive(gate)
    raise TwoArgError("needs", "two")


def raise_unpicklable(gate: str) -> None:
    _arrive(gate)
    raise LockedError("holds a lock")


def raise_bad_str(gate: str) -> None:
    _arrive(gate)
    raise BadStrError("unprintable")


def crash_until(counter: str, good_on: int) -> int:
    """Kill the worker on every attempt before number ``good_on``."""
    if _bump(counter) < good_on:
        os._exit(7)
    return procsched.current_job().attempt


class SubValueError(ValueError):
    pass


_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "SubValueError": SubValueError, "KeyError": KeyError}


def fail_until(counter: str, error: str, good_on: int) -> int:
    """Raise ``error`` on every attempt before number ``good_on``."""
    n = _bump(counter)
    if n < good_on:
        raise _ERRORS[error](f"attempt {n}")
    return procsched.current_job().attempt


def sleep_long(gate: str) -> None:
    _put(os.path.join(gate, "pid"), str(os.getpid()))
    time.sleep(JOB_WAIT)


def ignore_sigterm(gate: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _put(os.path.join(gate, "pid"), str(os.getpid()))
    time.sleep(JOB_WAIT)


def regex_holding_gil(gate: str) -> None:
    # A Python-level handler can run between regex steps but does nothing:
    # only SIGKILL ends this one.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    _put(os.path.join(gate, "pid"), str(os.getpid()))
    re.match(r"(a+)+$", "a" * 64 + "b")  # catastrophic backtracking, all in C


def libc_sleep_holding_gil(gate: str) -> None:
    _put(os.path.join(gate, "pid"), str(os.getpid()))
    ctypes.PyDLL(None).sleep(int(JOB_WAIT))  # PyDLL keeps the GIL through the call


def slow_first(counter: str) -> int:
    """Hang on the first attempt only."""
    attempt = procsched.current_job().attempt
    _bump(counter)
    if attempt == 1:
        time.sleep(JOB_WAIT)
    return attempt


_HOARD: list[bytes] = []


def hoard(nbytes: int) -> int:
    """Keep ``nbytes`` of touched memory alive in this worker after the job."""
    _HOARD.append(b"\x01" * nbytes)
    return os.getpid()


def hoard_and_wait(gate: str, nbytes: int) -> None:
    _put(os.path.join(gate, "pid"), str(os.getpid()))
    _HOARD.append(b"\x01" * nbytes)
    await_file(os.path.join(gate, "go"), JOB_WAIT)


# -- 1. the crash matrix --------------------------------------------------------

GO, KILL, SUBMIT = "go", "kill", "submit"
PID = object()  # in ``attrs``: the pid the job reported
QUICK = 4  # quick jobs submitted right behind the failing one


class Row(NamedTuple):
    job: Callable[..., object]
    trigger: str  # GO: the test opens the gate; KILL: it SIGKILLs the worker; SUBMIT: submit() fails
    error: type[BaseException]
    attrs: dict[str, object]
    says: tuple[str, ...]  # in str(error)
    remote_tb: str | None = None  # in the remote traceback attached as __cause__


MATRIX = [
    pytest.param(
        Row(crash_segfault, GO, procsched.WorkerCrashed,
            {"exitcode": -11, "signal": signal.SIGSEGV, "signal_name": "SIGSEGV", "pid": PID},
            ("signal SIGSEGV", "crash_segfault")),
        id="segfault",
    ),
    pytest.param(
        Row(crash_exit, GO, procsched.WorkerCrashed,
            {"exitcode": 3, "signal": None, "signal_name": None, "pid": PID},
            ("exit code 3", "crash_exit")),
        id="os._exit(3)",
    ),
    pytest.param(
        Row(blocked, KILL, procsched.WorkerCrashed,
            {"exitcode": -9, "signal": signal.SIGKILL, "signal_name": "SIGKILL", "pid": PID},
            ("signal SIGKILL", "blocked")),
        id="SIGKILL-from-outside",
    ),
    pytest.param(
        Row(raise_value_error, GO, ValueError, {"args": ("boom from the job",)}, ("boom from the job",),
            remote_tb='raise ValueError("boom from the job")'),
        id="job-raises",
    ),
    pytest.param(
        Row(takes_anything, SUBMIT, procsched.SerializationError, {}, ("arguments", "takes_anything", "lock")),
        id="unpicklable-argument",
    ),
    pytest.param(
        Row(return_lock, GO, procsched.SerializationError, {}, ("result", "lock")),
        id="unpicklable-result",
    ),
    pytest.param(
        Row(raise_unloadable, GO, procsched.RemoteError,
            {"type_name": f"{__name__}.TwoArgError", "message": "needs two"},
            ("TwoArgError: needs two",), remote_tb='raise TwoArgError("needs", "two")'),
        id="exception-not-unpicklable-here",
    ),
    pytest.param(
        Row(raise_unpicklable, GO, procsched.RemoteError,
            {"type_name": f"{__name__}.LockedError", "message": "holds a lock"},
            ("LockedError: holds a lock",), remote_tb='raise LockedError("holds a lock")'),
        id="exception-not-picklable-in-worker",
    ),
    pytest.param(
        Row(raise_bad_str, GO, BadStrError, {"args": ("unprintable",)}, (),
            remote_tb='raise BadStrError("unprintable")'),
        id="exception-str-raises",
    ),
]  # fmt: skip


@pytest.mark.timeout(40)
@pytest.mark.parametrize("row", MATRIX)
def test_crash_matrix(row: Row, tmp_path: Path) -> None:
    """One job fails its own way; the jobs queued behind it and the pool carry on."""
    gate = str(tmp_path)
    pid: int | None = None
    with procsched.Pool(1) as pool:
        # Short jobs first: a pool prefetches only once it has measured its jobs short.
        assert [f.result(timeout=RESULT) for f in [pool.submit(square, i) for i in range(50)]] == [i * i for i in range(50)]
        if row.trigger == SUBMIT:
            with pytest.raises(row.error) as info:
                pool.submit(row.job, gate, threading.Lock())
            others = [pool.submit(square_and_attempt, i) for i in range(QUICK)]
        else:
            fut = pool.submit(row.job, gate)
            others = [pool.submit(square_and_attempt, i) for i in range(QUICK)]
            pid = _job_pid(tmp_path)
            # The failing job runs, and quick ones are prefetched on its worker behind it.
            wait_for(lambda: pool.stats()["workers"][0]["queued"] >= 2, RESULT, "a job prefetched behind it")
            if row.trigger == KILL:
                os.kill(pid, signal.SIGKILL)
            else:
                (tmp_path / "go").touch()
            with pytest.raises(row.error) as info:
                fut.result(timeout=RESULT)
        # all succeed, on their first attempt: a job that never began spends none
        assert [f.result(timeout=RESULT) for f in others] == [(i * i, 1) for i in range(QUICK)]
        assert pool.submit(square, 12).result(timeout=RESULT) == 144
    err = info.value
    assert type(err) is row.error
    for name, want in row.attrs.items():
        assert getattr(err, name) == (pid if want is PID else want), name
    for text in row.says:  # (a row that says nothing has an exception that cannot be printed)
        assert text in str(err)
    if row.remote_tb is not None:
        assert isinstance(err.__cause__, procsched.RemoteTraceback)
        assert row.remote_tb in err.__cause__.tb
    if isinstance(err, procsched.WorkerCrashed) and pid is not None:
        assert not _exists(pid)  # reaped by the pool


# -- 2. retries -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_crashing_job_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    with procsched.Pool(1) as pool:
        fut = pool.options(retries=2).submit(crash_until, counter, 3)
        assert fut.result(timeout=RESULT) == 3  # the attempt that succeeded, as the job saw it
    assert _read_int(counter) == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("error", "retried"),
    [("ValueError", True), ("SubValueError", True), ("KeyError", False)],
    ids=["listed", "subclass-of-listed", "not-listed"],
)
def test_retry_only_the_listed_exceptions(error: str, retried: bool, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    policy = procsched.RetryPolicy.make(retries=3, on=[ValueError], backoff=0.01)
    with procsched.Pool(1) as pool:
        fut = pool.options(retries=policy).submit(fail_until, counter, error, 3)
        if retried:
            assert fut.result(timeout=RESULT) == 3
        else:
            with pytest.raises(KeyError, match="attempt 1"):
                fut.result(timeout=RESULT)
    assert _read_int(counter) == (3 if retried else 1)


@pytest.mark.timeout(30)
def test_crashes_false_does_not_retry_a_crash(tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    policy = procsched.RetryPolicy.make(retries=3, backoff=0.01, crashes=False)
    with procsched.Pool(1) as pool:
        fut = pool.options(retries=policy).submit(crash_until, counter, 2)
        with pytest.raises(procsched.WorkerCrashed) as info:
            fut.result(timeout=RESULT)
        assert pool.submit(square, 3).result(timeout=RESULT) == 9
    assert info.value.exitcode == 7
    assert _read_int(counter) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["error", "crash"])
def test_out_of_retries_the_last_error_reaches_the_future(kind: str, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    policy = procsched.RetryPolicy.make(retries=2, backoff=0.01)
    with procsched.Pool(1) as pool:
        view = pool.options(retries=policy)
        if kind == "error":
            with pytest.raises(ValueError, match="^attempt 3$"):
                view.submit(fail_until, counter, "ValueError", 99).result(timeout=RESULT)
        else:
            with pytest.raises(procsched.WorkerCrashed, match="exit code 7"):
                view.submit(crash_until, counter, 99).result(timeout=RESULT)
    assert _read_int(counter) == 3


# -- 3. timeouts ----------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("job", "exit_signal"),
    [
        (sleep_long, signal.SIGTERM),
        (ignore_sigterm, signal.SIGKILL),
        (regex_holding_gil, signal.SIGKILL),
        (libc_sleep_holding_gil, signal.SIGTERM),
    ],
    ids=["sleeping", "ignores-SIGTERM", "regex-holding-GIL", "libc-sleep-holding-GIL"],
)
def test_timeout_kills_and_replaces_the_worker(
    job: Callable[[str], None], exit_signal: signal.Signals, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="procsched")
    with procsched.Pool(1, kill_grace=0.2) as pool:
        pid = pool.submit(whoami).result(timeout=RESULT)  # and the worker has loaded this module
        t0 = time.monotonic()
        fut = pool.options(timeout=0.3).submit(job, str(tmp_path))
        behind = [pool.submit(square_and_attempt, i) for i in range(2)]
        with pytest.raises(procsched.JobTimeout) as info:
            fut.result(timeout=RESULT)
        assert time.monotonic() - t0 < 15  # coarse: the timeout fired, nobody waited for the job
        assert _read_int(tmp_path / "pid") == pid  # it ran there, past its own signal set-up
        wait_for(lambda: not _exists(pid), RESULT, f"worker {pid} to be gone")
        assert [f.result(timeout=RESULT) for f in behind] == [(0, 1), (1, 1)]  # untouched by the kill
        assert pool.submit(whoami).result(timeout=RESULT) not in (pid, None)
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.timeout == 0.3
    assert "0.3 s" in str(err) and job.__name__ in str(err)
    # Killed in steps: SIGTERM first, SIGKILL only for a worker that outlived the grace.
    died = [m for m in _messages(caplog, *DEATHS) if f"pid={pid} " in m]
    assert len(died) == 1 and exit_signal.name in died[0], died


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeouts", [True, False], ids=["retried", "timeouts=False"])
def test_timeout_with_retries(timeouts: bool, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    policy = procsched.RetryPolicy.make(retries=1, backoff=0.01, timeouts=timeouts)
    with procsched.Pool(1, kill_grace=0.2) as pool:
        pool.submit(square, 0).result(timeout=RESULT)  # loaded: the first attempt starts at once
        # The retry runs on the fresh worker that replaced the killed one; the
        # timeout also covers its loading this module, so it is not cut fine.
        fut = pool.options(timeout=1.5, retries=policy).submit(slow_first, counter)
        if timeouts:
            assert fut.result(timeout=RESULT) == 2
        else:
            with pytest.raises(procsched.JobTimeout):
                fut.result(timeout=RESULT)
    assert _read_int(counter) == (2 if timeouts else 1)


# -- 4. boot failure ------------------------------------------------------------


@pytest.mark.timeout(40)
def test_worker_dying_at_boot_degrades_the_pool_without_spinning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from procsched.backends import processes as workers  # here, not at the top: workers import this module too

    caplog.set_level(logging.DEBUG, logger="procsched")
    good = workers._BOOT_CMD
    monkeypatch.setattr(workers, "_BOOT_CMD", "import sys; sys.exit(1)")
    backoff, backoff_max, failures = 0.05, 0.4, 6
    with procsched.Pool(1, respawn_backoff=backoff, respawn_backoff_max=backoff_max) as pool:
        t0 = time.monotonic()
        fut = pool.submit(square_and_attempt, 5)
        wait_for(lambda: pool.degraded, RESULT, "the pool to report itself degraded")
        assert pool.stats()["degraded"] is True
        wait_for(lambda: len(_messages(caplog, "worker_boot_failed")) >= failures, RESULT, f"{failures} boot failures")
        elapsed = time.monotonic() - t0
        failed = len(_messages(caplog, "worker_boot_failed"))
        spawned = len(_messages(caplog, "worker_spawned", "worker_respawned"))
        # Backing off: the waits between attempts add up to at least this (a
        # pool that respawned at once would get there in a few boot times).
        min_wait = sum(min(backoff * 2**i, backoff_max) for i in range(failures - 1))
        assert elapsed >= 0.9 * min_wait, (elapsed, min_wait)
        assert failed <= spawned <= failed + 1  # one spawn per failure, no storm
        assert not fut.done()  # the job waits for a worker; it is not failed

        monkeypatch.setattr(workers, "_BOOT_CMD", good)
        assert fut.result(timeout=RESULT) == (25, 1)  # the dead workers cost it no attempt
        wait_for(lambda: not pool.degraded, RESULT, "the pool to recover")
        assert pool.submit(square, 6).result(timeout=RESULT) == 36
    assert _messages(caplog, "pool_degraded") and _messages(caplog, "pool_recovered")


# -- 5. worker hygiene ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_max_tasks_per_child_replaces_workers() -> None:
    with procsched.Pool(1, max_tasks_per_child=3) as pool:
        pids = [pool.submit(os.getpid).result(timeout=RESULT) for _ in range(10)]
        # sequential jobs: each worker runs exactly three, then a new one takes over
        assert [len(set(pids[i : i + 3])) for i in range(0, 10, 3)] == [1, 1, 1, 1]
        assert len(set(pids)) == 4
        for pid in pids[:-1]:
            wait_for(lambda: not _exists(pid), RESULT, f"retired worker {pid} to be gone")


@pytest.mark.timeout(30)
def test_max_tasks_per_child_with_prefetched_jobs() -> None:
    """Tiny jobs submitted at once are prefetched deep: still no worker runs more than three."""
    with procsched.Pool(1, max_tasks_per_child=3) as pool:
        futures = [pool.submit(os.getpid) for _ in range(40)]  # the later ones, deeper still
        pids = [f.result(timeout=RESULT) for f in futures]
    counts = Counter(pids)
    assert len(counts) == 14 and max(counts.values()) == 3, counts


@pytest.mark.timeout(30)
def test_soft_memory_cap_recycles_the_worker_after_the_job() -> None:
    with procsched.Pool(1, max_memory=150 * MiB) as pool:
        first = pool.submit(whoami).result(timeout=RESULT)
        assert pool.submit(whoami).result(timeout=RESULT) == first  # under the cap: kept
        assert pool.submit(hoard, 200 * MiB).result(timeout=RESULT) == first  # the job itself finishes
        after = pool.submit(whoami).result(timeout=RESULT)
        assert after != first  # the next job already runs on a fresh worker
        wait_for(lambda: not _exists(first), RESULT, f"worker {first} to be gone")


@pytest.mark.timeout(30)
def test_hard_memory_cap_kills_the_job(tmp_path: Path) -> None:
    limit = 150 * MiB
    with procsched.Pool(1, max_memory_hard=limit, memory_check_interval=0.05) as pool:
        fut = pool.submit(hoard_and_wait, str(tmp_path), 400 * MiB)
        with pytest.raises(procsched.MemoryLimitExceeded) as info:
            fut.result(timeout=RESULT)
        pid = _read_int(tmp_path / "pid")
        assert pool.submit(square, 4).result(timeout=RESULT) == 16
    err = info.value
    assert isinstance(err, procsched.WorkerCrashed)
    assert err.pid == pid and err.signal == signal.SIGKILL
    assert err.limit == limit and err.rss > limit
    assert "150 MiB" in str(err) and "hoard_and_wait" in str(err)


# -- 6, 7. the caller goes away -------------------------------------------------

SCRIPT_HEAD = """\
import os, sys, time
import procsched

def hold(gate, i, blob):
    tmp = os.path.join(gate, f"{i}.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(gate, f"{i}.pid"))
    time.sleep(120)

def where(blob):
    return os.getpid()

def mark_late(gate, blob):
    time.sleep(0.2)  # still running when the script's main thread ends
    with open(os.path.join(gate, "late"), "w") as f:
        f.write(str(os.getpid()))

gate = sys.argv[1]
BLOB = b"x" * (1 << 20)  # big enough to travel out of band: a segment in /dev/shm
"""

ORPHAN_SCRIPT = SCRIPT_HEAD + """
pool = procsched.Pool(2)
futures = [pool.submit(hold, gate, i, BLOB) for i in range(2)]
time.sleep(120)  # the test SIGKILLs us here
"""

CTRL_C_SCRIPT = SCRIPT_HEAD + """
import signal
# Ctrl-C raises KeyboardInterrupt, as in a terminal, even if whoever started
# the tests left SIGINT ignored (a background job does, and we would inherit it).
signal.signal(signal.SIGINT, signal.default_int_handler)

with procsched.Pool(2) as pool:
    futures = [pool.submit(hold, gate, i, BLOB) for i in range(3)]
    for f in futures:
        f.result()
"""

FALL_OFF_SCRIPT = SCRIPT_HEAD + """
pool = procsched.Pool(2)
print(pool.submit(where, BLOB).result(), flush=True)
print(*[w["pid"] for w in pool.stats()["workers"]], flush=True)
pool.submit(mark_late, gate, BLOB)  # not waited for: like the stdlib's, the pool finishes it at exit
"""


def _run_script(tmp_path: Path, text: str, **popen: Any) -> subprocess.Popen[bytes]:
    """Run ``text`` as a script; its output goes to files (``_output``), never to pipes
    that a surviving worker would hold open."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(text))
    gate = tmp_path / "gate"
    gate.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        return subprocess.Popen([sys.executable, str(script), str(gate)], env=env, stdout=out, stderr=err, **popen)


def _output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _running_workers(proc: subprocess.Popen[bytes], gate: Path) -> list[int]:
    """Wait until a job of the script runs and both its workers are up; their pids."""

    def ready() -> list[int] | None:
        if proc.poll() is not None:
            pytest.fail(f"the script exited early ({proc.returncode}): {_output(gate.parent)}")
        kids = children(proc.pid)
        return kids if len(kids) == 2 and list(gate.glob("*.pid")) else None

    pids = wait_for(ready, RESULT, "the script's jobs to run")
    assert isinstance(pids, list)
    return pids


def _gone(pids: list[int], what: str) -> None:
    """Wait for these processes to be gone; kill the survivors if they are not."""
    try:
        wait_for(lambda: not any(alive(p) for p in pids), RESULT, what)
    finally:
        for p in filter(alive, pids):
            os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(40)
def test_killed_caller_leaves_no_orphan_workers(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, ORPHAN_SCRIPT)
    try:
        pids = _running_workers(proc, tmp_path / "gate")
        assert our_segments(proc.pid), "the script's argument segments should exist while it runs"
        assert {_read_int(p) for p in (tmp_path / "gate").glob("*.pid")} <= set(pids)
    finally:
        _stop(proc)  # SIGKILL: no chance to clean up
    _gone(pids, f"workers {pids} to die with their caller")
    # What the killed caller could not clean up, the next pool sweeps.
    with procsched.Pool(1):
        assert our_segments(proc.pid) == []


@pytest.mark.timeout(40)
def test_ctrl_c_stops_the_pool_and_leaves_nothing(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, CTRL_C_SCRIPT, start_new_session=True)
    try:
        pids = _running_workers(proc, tmp_path / "gate")
        assert our_segments(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        proc.wait(timeout=RESULT)  # promptly: the jobs would hold it for 120 s
    finally:
        _stop(proc)
    err = _output(tmp_path)[1]
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert our_segments(proc.pid) == []
    _gone(pids, f"workers {pids} to be gone")


@pytest.mark.timeout(40)
def test_interpreter_exit_without_shutdown_leaves_nothing(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, FALL_OFF_SCRIPT)
    try:
        proc.wait(timeout=RESULT)
    finally:
        _stop(proc)
    out, err = _output(tmp_path)
    assert proc.returncode == 0, err
    ran_on, *pids = (int(w) for w in out.split())
    assert len(pids) == 2 and ran_on in pids
    assert _read_int(tmp_path / "gate" / "late") in pids
    assert our_segments(proc.pid) == []
    _gone(pids, f"workers {pids} to be gone")


# -- 8. logs --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_crash_and_timeout_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="procsched")
    gate = tmp_path
    (gate / "go").touch()
    with procsched.Pool(1, kill_grace=0.2) as pool:
        crashed = pool.submit(crash_exit, str(gate))
        with pytest.raises(procsched.WorkerCrashed):
            crashed.result(timeout=RESULT)
        pid = _read_int(gate / "pid")
        (gate / "pid").unlink()
        hung = pool.options(timeout=0.3).submit(sleep_long, str(gate))
        with pytest.raises(procsched.JobTimeout):
            hung.result(timeout=RESULT)
    died = _messages(caplog, "worker_died")
    assert any(f"pid={pid} " in m and "exit code 3" in m for m in died), died
    crash = _messages(caplog, "job_crashed")
    assert any(f"job={crashed.job_id} " in m and "exit code 3" in m for m in crash), crash
    timeout = _messages(caplog, "job_timeout")
    assert any(f"job={hung.job_id} " in m and "timeout=0.3" in m for m in timeout), timeout


def spawn_child_then(gate: str, end: str) -> None:
    """Start a long-lived child process, then hang (to be timed out) or die."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _put(os.path.join(gate, "child"), str(child.pid))
    if end == "die":
        os._exit(3)
    time.sleep(600)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("end", "timeout", "error"),
    [("hang", 0.5, procsched.JobTimeout), ("die", None, procsched.WorkerCrashed)],
    ids=["timed-out", "crashed"],
)
def test_a_killed_or_dead_workers_job_children_go_with_it(
    end: str, timeout: float | None, error: type[BaseException], tmp_path: Path
) -> None:
    with procsched.Pool(1, kill_grace=0.2) as pool:
        fut = pool.options(timeout=timeout).submit(spawn_child_then, str(tmp_path), end)
        with pytest.raises(error):
            fut.result(timeout=RESULT)
        child = _read_int(tmp_path / "child")
        assert child is not None
        wait_for(lambda: not alive(child), RESULT, f"the job's child {child} to be killed with its worker")


@pytest.mark.timeout(10)
def test_crash_error_keeps_the_job_name_when_pickled() -> None:
    import pickle

    err = procsched.WorkerCrashed(-9, 1234).for_job("work#7")
    copy = pickle.loads(pickle.dumps(err))
    assert copy.job == "work#7" and "work#7" in str(copy) and copy.signal == signal.SIGKILL


def measure(data: bytes) -> int:
    return len(data)


def write_garbage_to_the_supervisor() -> None:
    """Write a frame of an unknown kind to this worker's ring, as a broken worker would."""
    import gc

    (worker,) = [o for o in gc.get_objects() if type(o).__name__ == "Worker" and type(o).__module__ == "procsched.worker"]
    worker.send_frame(b"\x63not a frame")
    time.sleep(30)  # (killed before this ends)


@pytest.mark.timeout(60)
def test_a_worker_that_writes_garbage_is_killed_and_costs_its_job_only() -> None:
    with procsched.Pool(1) as pool:
        assert [f.result(timeout=RESULT) for f in [pool.submit(square, i) for i in range(20)]] == [i * i for i in range(20)]
        with pytest.raises(procsched.WorkerCrashed):
            pool.submit(write_garbage_to_the_supervisor).result(timeout=RESULT)
        assert pool.submit(square, 7).result(timeout=RESULT) == 49
        assert pool.stats()["restarts"] == 1


def reversed_list(items: list[int]) -> list[int]:
    return items[::-1]


@pytest.mark.timeout(30)
def test_frames_larger_than_the_ring_allows_travel_out_of_band_both_ways() -> None:
    # A call and a result too large for a 64 KiB ring (and not buffers, which travel out
    # of band anyway): each frame goes through a shared-memory segment instead (SPILL).
    items = list(range(60_000))  # ~300 KB pickled
    with procsched.Pool(1, ring_bytes=65536) as pool:
        futs = [pool.submit(reversed_list, items) for _ in range(3)] + [pool.submit(square, 5)]
        assert [f.result(timeout=RESULT) for f in futs] == [items[::-1]] * 3 + [25]

@pytest.mark.timeout(60)
def test_a_full_ring_holds_jobs_back_instead_of_breaking_the_pool() -> None:
    # Tiny jobs teach the pool to prefetch deep; then jobs with 3 KB arguments
    # would overfill a 64 KiB ring. They must wait their turn, not crash the loop.
    with procsched.Pool(1, ring_bytes=65536) as pool:
        assert sum(f.result(timeout=RESULT) for f in [pool.submit(square, 1) for _ in range(300)]) == 300
        futs = [pool.submit(measure, b"x" * 3000) for _ in range(600)]
        assert [f.result(timeout=RESULT) for f in futs] == [3000] * 600
        assert pool.submit(square, 3).result(timeout=RESULT) == 9


@pytest.mark.timeout(30)
def test_jobs_cancelled_at_shutdown_wake_their_waiters(tmp_path: Path) -> None:
    import concurrent.futures as cf

    pool = procsched.Pool(1, max_prefetch=0)
    running = pool.submit(blocked, str(tmp_path))
    _job_pid(tmp_path)
    queued = pool.submit(square, 2)
    pool.shutdown(wait=False, cancel_futures=True)
    done, not_done = cf.wait([queued], timeout=RESULT)  # hung for ever when not notified
    assert done == {queued} and queued.cancelled()
    (tmp_path / "go").touch()
    assert running.result(timeout=RESULT) == "the gate opened"
    pool.shutdown(wait=True)


def _explode(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected fault in the supervisor")


@pytest.mark.timeout(30)
def test_a_crashed_supervisor_fails_its_jobs_and_refuses_new_ones() -> None:
    with procsched.Pool(1) as pool:
        assert pool.submit(square, 2).result(timeout=RESULT) == 4
        pool._sup.queue.push = _explode  # type: ignore[method-assign]  # a bug inside the loop
        with pytest.raises(procsched.PoolError, match="supervisor crashed"):
            pool.submit(square, 3).result(timeout=RESULT)
        wait_for(lambda: pool._sup.ended, RESULT, "the loop to end")
        with pytest.raises(procsched.PoolError, match="broken"):
            pool.submit(square, 4)


def one_ms(x: int) -> int:
    end = time.perf_counter() + 0.001
    while time.perf_counter() < end:
        pass
    return x


@pytest.mark.timeout(60)
def test_terminate_during_a_busy_batch_keeps_the_supervisor_sound() -> None:
    # Outcomes already in the rings arrive after terminate() has failed their
    # jobs: they must be ignored, not settle a future twice (which would crash
    # the loop and skip the orderly stop).
    import concurrent.futures as cf

    pool = procsched.Pool(2)
    futs = [pool.submit(one_ms, i) for i in range(3000)]
    wait_for(lambda: pool.stats()["succeeded"] >= 50, RESULT, "the batch to be under way")
    pool.terminate()
    assert pool._sup.crashed is None
    done, not_done = cf.wait(futs, timeout=RESULT)
    assert not not_done
    for f in futs:
        assert f.cancelled() or f.exception() is None or isinstance(f.exception(), procsched.PoolError)


@pytest.mark.timeout(60)
def test_pool_works_and_stops_cleanly_with_many_fds_open(tmp_path: Path) -> None:
    # pidfds numbered past 1024 (FD_SETSIZE) must not break waiting for workers.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the fd limit ({hard}) is too low to push fds past 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        pool = procsched.Pool(1)
        assert pool.submit(square, 5).result(timeout=RESULT) == 25
        pool.shutdown(wait=True)
        assert pool._sup.crashed is None
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
