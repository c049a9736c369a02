"""A journaled pool run in a child process that ``test_recovery`` SIGKILLs.

Run as ``python -c "import journal_child, sys; journal_child.main(sys.argv[1:])" MODE ...``
(with this directory and the repository on ``PYTHONPATH``), so that the job
functions below pickle by reference as ``journal_child.<name>`` and a pool
reopened in the test process can run the jobs a killed child journaled.

Each mode opens a pool on a journal, submits its jobs, tells the test where
it stands through files in a gate directory, and then waits to be killed (or,
for ``map``, runs to completion and writes its results as JSON).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import procsched
from procsched import current_job

JOB_WAIT = 30.0  # a job waiting on a gate gives up after this long (only if a test is broken)


# -- small tools ----------------------------------------------------------------


def put(path: str, text: str) -> None:
    """Write a file atomically, so a reader never sees it half written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def append_line(path: str, line: str) -> None:
    """One ``write`` on an ``O_APPEND`` file: lines from two workers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def wait_file(path: str, timeout: float = JOB_WAIT) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)


# -- jobs -----------------------------------------------------------------------


def value_of(i: int) -> str:
    """What ``work(i)`` returns (the test checks every result against this)."""
    return f"v{i * i + 7}"


def work(i: int, side: str) -> str:
    """A 2-5 ms call that leaves one line per execution in ``side``."""
    time.sleep(0.002 + (i % 4) * 0.001)
    append_line(side, f"{i} {os.getpid()}")
    return value_of(i)


def double(i: int, pad: str) -> int:
    return 2 * i


def blocker(gate: str) -> tuple[str, int]:
    """Notes each run and its attempt, then waits for ``gate/go``."""
    attempt = current_job().attempt
    append_line(os.path.join(gate, "runs"), f"{attempt} {os.getpid()}")
    put(os.path.join(gate, "pid"), str(os.getpid()))
    wait_file(os.path.join(gate, "go"))
    return ("done", attempt)


def fail_first(gate: str) -> int:
    """Fails its first attempt; notes each run's attempt and wall-clock start."""
    attempt = current_job().attempt
    append_line(os.path.join(gate, "runs"), f"{attempt} {time.time()!r} {os.getpid()}")
    if attempt == 1:
        raise ValueError("first attempt fails")
    return attempt


def cold_job(gate: str) -> tuple[Any, int]:
    """Checkpoints every step until preempted; a resumed run returns (resume_from, attempt)."""
    ctx = current_job()
    if ctx.resume_from is not None:
        append_line(os.path.join(gate, "cold_runs"), f"resumed {ctx.attempt}")
        return (ctx.resume_from, ctx.attempt)
    append_line(os.path.join(gate, "cold_runs"), f"first {ctx.attempt}")
    progress, go = os.path.join(gate, "progress"), os.path.join(gate, "go")
    end = time.monotonic() + JOB_WAIT
    i = 0
    try:
        while time.monotonic() < end:
            if os.path.exists(go):  # the test restarted it and it did not resume: say so at once
                return (None, ctx.attempt)
            ctx.checkpoint(("step", i))
            append_line(progress, str(i))
            i += 1
            time.sleep(0.001)
    except procsched.Preempted as p:
        put(os.path.join(gate, "preempted"), json.dumps(list(p.state)))
        raise
    raise TimeoutError("never preempted")


def hot_job(gate: str) -> tuple[str, int]:
    """A hot job that holds the worker until ``gate/go``."""
    attempt = current_job().attempt
    append_line(os.path.join(gate, "hot_runs"), str(attempt))
    put(os.path.join(gate, "hot_pid"), str(os.getpid()))
    wait_file(os.path.join(gate, "go"))
    return ("hot", attempt)


# -- the modes ----------------------------------------------------------------------


def key_of(i: int, _side: str) -> str:
    return f"k{i}"


def run_map(journal: str, side: str, out: str, n: str) -> None:
    """One keyed job per call; after ``map`` posted them, ``out.ready``; at the end, ``out``."""
    count = int(n)
    with procsched.Pool(2, journal=journal) as pool:
        recovered = sorted(pool.recovered)
        results = pool.map(work, range(count), itertools.repeat(side, count), key=key_of)
        put(out + ".ready", str(os.getpid()))
        pairs = [[f"k{i}", v] for i, v in zip(range(count), results)]
    put(out, json.dumps({"recovered": recovered, "results": pairs}))


def run_block(journal: str, gate: str) -> None:
    with procsched.Pool(1, journal=journal) as pool:
        pool.options(key="blocker").submit(blocker, gate).result(timeout=60)


def run_retry(journal: str, gate: str, backoff: str) -> None:
    policy = procsched.RetryPolicy.make(2, backoff=float(backoff), jitter=0.0)
    with procsched.Pool(1, journal=journal) as pool:
        pool.options(key="flaky", retries=policy).submit(fail_first, gate).result(timeout=60)


def run_always(journal: str, gate: str, how: str) -> None:
    """Submit under fsync="always"; say ``acked`` once submit() returned."""
    config = procsched.JournalConfig(path=journal, fsync="always")
    with procsched.Pool(1, journal=config) as pool:
        fut = pool.options(key="acked").submit(blocker, gate)
        if how == "self":  # the harshest point: the instant submit() returns
            os.kill(os.getpid(), signal.SIGKILL)
        print("acked", flush=True)
        fut.result(timeout=60)


def run_preempt(journal: str, gate: str) -> None:
    with procsched.Pool(1, journal=journal) as pool:
        cold = pool.options(key="cold").submit(cold_job, gate)
        wait_file(os.path.join(gate, "progress"))
        hot = pool.options(key="hot", hot=True).submit(hot_job, gate)
        hot.result(timeout=60)
        cold.result(timeout=60)


MODES: dict[str, Callable[..., None]] = {"map": run_map, "block": run_block, "retry": run_retry, "always": run_always, "preempt": run_preempt}


def main(argv: list[str]) -> None:
    MODES[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
