"""The seam between the supervisor and what runs its jobs.

The supervisor decides (which job, when, retry or not, what a death means);
a backend executes and reports. Two implement the interface written down
here as :class:`Backend`: the local pool of worker processes
(``backends/local.py``, the default) and a Ray cluster (``backends/ray.py``);
the supervisor does not branch on which one it has. A user chooses with a
small spec, ``Pool(backend=procsched.backends.Ray(address="auto"))``; the
spec opens the backend inside the supervisor (:class:`Local`, :class:`Ray`).

A backend knows jobs only by *run id* (a fresh one per attempt, chosen by
the supervisor), carries their payloads as opaque bytes (``frames.Dispatch``)
and reports what happened as the events below, in the order it learned of
them. The supervisor's loop sleeps in one ``poll`` over the backend's
``poller``: a backend registers the fds that signal it has something to
report, and answers ``prepare_sleep()`` with False when it already has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..errors import WorkerCrashed

if TYPE_CHECKING:
    from ..ipc import frames
    from ..ipc.doorbell import Doorbell
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


class Broken(NamedTuple):
    """No run can ever start: a worker's initializer raised (``error``, a ``BrokenPool``)."""

    error: BaseException


Event = Started | Lost | Returned | Result | Broken


class JobLength:
    """A running estimate of how long a job takes (from the runs seen to end), and how many jobs
    that makes worth queueing ahead of a worker, or of a Ray CPU: enough to cover the pool's
    ``prefetch_s``, within ``max_prefetch`` and the caller's own ceiling. Until a run has
    ended, none: an unknown job may be long, and one queued behind it would wait."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: float | None = None

    def observe(self, run_us: int, runs: int = 1) -> None:
        """``runs`` runs that took ``run_us`` on average: a moving average with weight 0.2 per
        run (a batch of ``runs`` counts as that many runs of its mean)."""
        s = max(run_us, 10) * 1e-6
        self.seconds = s if self.seconds is None else self.seconds + (1.0 - 0.8**runs) * (s - self.seconds)

    def ahead(self, config: PoolConfig, most: int) -> int:
        if self.seconds is None:
            return 0
        return max(0, min(most, config.max_prefetch, int(config.prefetch_s / max(self.seconds, 1e-5))))


class Backend(Protocol):
    """What the supervisor asks of an executor of jobs (run ids are ``job_id`` in frames and events)."""

    config: PoolConfig
    poller: Any  # a select.poll the supervisor sleeps in; the backend registers its fds there
    restarts: int
    #: whether a waiting caller may borrow the loop (``lending.py``); if so, it is a :class:`Lendable`
    lendable: bool

    @property
    def degraded(self) -> bool:
        """Executors keep failing to start: the pool says so instead of spinning."""
        ...

    # -- capacity and placement ----------------------------------------------------
    @property
    def capacity(self) -> int:
        """How many runs execute at once now (the pool's ``max_workers`` reads it when it is 0)."""
        ...

    def spawn_all(self, now: float) -> None: ...
    def headroom(self, booting: bool = False) -> int:
        """How many more runs may be placed now (the prefetch included)."""
        ...

    def idle_workers(self) -> int:
        """Executors with nothing placed on them (where a hot job starts at once)."""
        ...

    def coming_free(self) -> int:
        """Executors not idle yet that will be without anyone yielding (starting, giving back)."""
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


class Lendable(Backend, Protocol):
    """What a backend with ``lendable = True`` offers a caller that borrows the loop (``lending.py``)."""

    #: a select.poll over the lent doorbell and every fd of ``poller`` but the loop's doorbell
    lend_poller: Any
    #: events reported and not yet collected (a placement can report at once)
    events: list[Event]

    def lend(self, lent: bool) -> None:
        """Have the executors ring the lent doorbell (True) or the loop's own (False)."""
        ...

    def spin_for(self) -> float:
        """Seconds a borrower may watch for an outcome before it sleeps (0: sleep at once)."""
        ...

    def watch(self, until: float, intake: Any, poller: Any = None) -> list[tuple[int, int]] | None:
        """Watch for an outcome (a post in ``intake``, an fd ``poller`` reports) until ``until``:
        None if nothing came."""
        ...


# -- choosing one ----------------------------------------------------------------------
class Local:
    """Worker processes on this machine, fed through shared-memory rings (the default)."""

    def default_workers(self) -> int:
        import loky  # here, not at the top: it costs ~60 ms to import, and only this needs it

        return int(loky.cpu_count())  # cgroup quota and affinity aware

    def open(self, config: PoolConfig, prefix: str, bell: Doorbell, lent_bell: Doorbell, init: bytes = b"") -> Backend:
        """``init``: the pickled ``(initializer, initargs)`` each worker calls as it starts."""
        from .local import LocalBackend

        return LocalBackend(config, prefix, bell, lent_bell, init)

    def __repr__(self) -> str:
        return "Local()"


class Ray:
    """Jobs run as Ray tasks on a Ray cluster (``pip install 'procsched[ray]'``).

    ``address``: the cluster to join (``"auto"``, ``"ray://head:10001"``, ``"host:port"``);
    None starts a Ray of this machine's own, or uses the one ``ray.init()`` already made.
    ``window``: tasks handed to Ray beyond its free CPUs, so a CPU that comes free starts
    the next job without a round trip (jobs with a timeout wait here instead, so their clock
    starts when they do). None (the default) adapts it to the jobs' length, as the local
    pool's prefetch does: one task while jobs are long, up to four per CPU while they take
    a millisecond or so; an int fixes it. ``spread``: ask Ray to spread jobs over the nodes rather than pack
    them. ``init``: more keywords for ``ray.init`` (``runtime_env``, ``namespace``, ...).
    The pool's ``max_workers`` caps how many jobs run at once; without it, as many as the
    cluster has CPUs, followed as nodes join and leave.
    """

    def __init__(self, address: str | None = None, *, window: int | None = None, spread: bool = False, init: Mapping[str, Any] | None = None) -> None:
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"Ray(address=...) must be a non-empty str or None, not {address!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"Ray(window=...) must be a non-negative int or None (adaptive), not {window!r}")
        if init is not None and not isinstance(init, Mapping):
            raise TypeError(f"Ray(init=...) must be a mapping of ray.init keywords, not {type(init).__name__}")
        self.address = address
        self.window = window
        self.spread = bool(spread)
        self.init = dict(init or {})

    def default_workers(self) -> int:
        return 0  # the cluster's CPUs

    def open(self, config: PoolConfig, prefix: str, bell: Doorbell, lent_bell: Doorbell, init: bytes = b"") -> Backend:
        if init:
            raise ValueError("initializer: the Ray backend's tasks run in Ray's own workers, which run none")
        try:
            from .ray import RayBackend
        except ImportError as e:
            if e.name != "ray":
                raise
            raise ImportError("the Ray backend needs Ray: pip install 'procsched[ray]'") from e
        return RayBackend(self, config, bell)

    def __repr__(self) -> str:
        return f"Ray(address={self.address!r}, window={self.window}, spread={self.spread})"


Spec = Local | Ray


def choose(backend: Spec | str | None) -> Spec:
    """The spec a ``backend=`` argument names (None and ``"local"``: :class:`Local`)."""
    if backend is None or backend == "local":
        return Local()
    if backend == "ray":
        return Ray()
    if isinstance(backend, (Local, Ray)):
        return backend
    raise TypeError(f"backend must be procsched.backends.Local(), procsched.backends.Ray(...), 'local' or 'ray', not {backend!r}")
