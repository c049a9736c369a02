"""The seam between the supervisor and what runs its jobs.

The supervisor decides (which job, when, retry or not, what a death means);
a backend executes and reports. The local pool of worker processes
(``backends/local.py``) is the one implementation today; the interface is
written down here, as :class:`Backend`, so another engine can stand behind
the same supervisor without it branching on which one it has.

A backend knows jobs only by *run id* (a fresh one per attempt, chosen by
the supervisor), carries their payloads as opaque bytes (``frames.Dispatch``)
and reports what happened as the events below, in the order it learned of
them. The supervisor's loop sleeps in one ``poll`` over the backend's
``poller``: a backend registers the fds that signal it has something to
report, and answers ``prepare_sleep()`` with False when it already has.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..errors import WorkerCrashed

if TYPE_CHECKING:
    from ..ipc import frames
    from ..model import PoolConfig


class Started(NamedTuple):
    """A tracked run (one with a timeout) began on its executor at ``at`` (monotonic)."""

    job_id: int
    at: float


class Lost(NamedTuple):
    """A run whose executor died; ``error`` says how."""

    job_id: int
    error: WorkerCrashed
    killed_for: str  # "" for a crash; "timeout", "cancel", "preempt", "memory" when we killed it


class Returned(NamedTuple):
    """A run that never began: it goes back to the queue without spending an attempt."""

    job_id: int


class Result(NamedTuple):
    """A run's outcome (``frames.OK``, ``ERROR``, ``PREEMPTED``) or a checkpoint, as bytes."""

    job_id: int
    status: int
    run_us: int
    payload: bytes
    buffers: list[memoryview]


Event = Started | Lost | Returned | Result


class Backend(Protocol):
    """What the supervisor asks of an executor of jobs (run ids are ``job_id`` in frames and events)."""

    config: PoolConfig
    poller: Any  # a select.poll the supervisor sleeps in; the backend registers its fds there
    restarts: int

    @property
    def degraded(self) -> bool:
        """Executors keep failing to start: the pool says so instead of spinning."""
        ...

    # -- capacity and placement ----------------------------------------------------
    def spawn_all(self, now: float) -> None: ...
    def headroom(self, booting: bool = False) -> int:
        """How many more runs may be placed now (the prefetch included)."""
        ...

    def idle_workers(self) -> int:
        """Executors with nothing placed on them (where a hot job starts at once)."""
        ...

    def start(self, dispatches: list[frames.Dispatch], track: Iterable[int] = (), booting: bool = False) -> None:
        """Place runs; report ``Started`` for those in ``track``."""
        ...

    def start_hot(self, d: frames.Dispatch, track: bool) -> bool: ...
    def running(self) -> dict[int, int]:
        """Runs on an executor now: run id -> executor index."""
        ...

    def worker_of(self, job_id: int) -> int: ...

    # -- stopping runs ---------------------------------------------------------------
    def kill(self, job_id: int, reason: str, now: float) -> bool:
        """Stop the executor running this run (timeout, cancel); it reports ``Lost``."""
        ...

    def withdraw(self, job_id: int) -> bool | None:
        """Take back a run placed but not begun (it reports ``Returned``): True if it surely
        comes back unrun, None if its end will tell (it may have begun), False if it began."""
        ...

    def request_yield(self, job_id: int, kill_after: float | None, now: float) -> bool:
        """Ask a cold run to yield (``checkpoint()`` raises ``Preempted``); kill it after ``kill_after`` s."""
        ...

    def cancel_yield(self, job_id: int) -> None: ...

    # -- the loop ------------------------------------------------------------------------
    def collect(self, now: float, ready: list[tuple[int, int]]) -> list[Event]:
        """What happened since the last call; ``ready`` is the loop's poll result."""
        ...

    def tick(self, now: float) -> None:
        """Time-driven work: kills to escalate, executors to restart."""
        ...

    def next_deadline(self) -> float: ...
    def prepare_sleep(self) -> bool:
        """About to sleep: False if there is something to collect already."""
        ...

    def woke(self) -> None: ...

    # -- the pool ----------------------------------------------------------------------
    def resize(self, workers: int, now: float) -> None: ...
    def close(self, deadline: float) -> None:
        """Stop every executor: ask, wait until ``deadline``, then force."""
        ...

    def stats(self) -> dict[str, object]: ...
    def workers_status(self, now: float, job_of: Any) -> list[dict[str, Any]]: ...
