"""Shared fixtures: bounded waits, and a leak check after every test.

Every test runs under pytest-timeout (``timeout`` in ``pyproject.toml``;
on a hang it dumps every thread's stack and fails). After each test the
``no_leaks`` fixture waits, with a deadline, until this process has no
child process left and no shared-memory segment of ours is left in
``/dev/shm``; a test that leaks fails, naming what leaked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator

import pytest

from procsched.ipc import oob

LEAK_DEADLINE = 10.0


def pytest_sessionstart(session: pytest.Session) -> None:
    """Write procsched's bytecode once, as installing a wheel does: from a checkout with
    ``PYTHONDONTWRITEBYTECODE`` set, every worker the suite starts would compile it again."""
    import compileall

    import procsched

    compileall.compile_dir(os.path.dirname(procsched.__file__), quiet=1)


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``cond`` until it is truthy; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def await_file(path: str | os.PathLike[str], timeout: float = 30.0) -> None:
    """Inside a job: wait for ``path`` to appear (a gate the test opens); ``TimeoutError`` past ``timeout``."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


def children(pid: int | None = None) -> list[int]:
    """Live (not zombie) direct children of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after ')'
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def our_segments(pid: int | None = None) -> list[str]:
    pid = os.getpid() if pid is None else pid
    prefix = f"{oob.PREFIX}{pid}_"
    try:
        return sorted(n for n in os.listdir(oob.SHM_DIR) if n.startswith(prefix))
    except OSError:
        return []


def wait_no_leaks(keep: Collection[int] = ()) -> None:
    """Until this process has no child but ``keep`` and no shared-memory segment; fail past the deadline."""
    end = time.monotonic() + LEAK_DEADLINE
    while [pid for pid in children() if pid not in keep] or our_segments():
        if time.monotonic() > end:
            pytest.fail(f"leaked after the test: processes {children()}, shared memory {our_segments()}")
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    yield
    wait_no_leaks()
