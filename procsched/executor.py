"""Pool: the embedded front door, a ``concurrent.futures.Executor``.

``Pool`` runs the supervisor loop in a thread of the caller's process and
its workers as child processes. ``submit`` pickles the call right here (so
a bad argument raises in the caller), places large buffers out of band, and
posts the job to the loop; everything after that is the loop's.
``options(...)`` returns a view that submits with other job options.

Differences from ``ProcessPoolExecutor``, on purpose:

* a crashed worker fails (or retries) one job, never the pool;
* a job handed to a worker's prefetch counts as running, as a call in
  ``ProcessPoolExecutor``'s call queue does: ``cancel()`` returns False for
  it. The prefetch is small (about ``prefetch_s`` of work at the measured job
  duration, at most ``max_prefetch`` jobs, none until a job's duration has
  been measured); every job past it stays cancellable. The jobs prefetched
  behind one that runs long go to an idle worker instead;
* ``map`` with the default ``chunksize=1`` keeps the stdlib's per-call
  outcomes but sends the calls in batches (about four per worker, as
  ``multiprocessing.Pool.map`` sizes its chunks) unless a ``timeout`` or
  ``retries`` option asks for one job per call; see :meth:`Pool.map`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import warnings
import weakref
from concurrent.futures import Executor
from collections.abc import Callable
from typing import Any

import msgspec

from .codec import CallEncoder, callable_of, dump_initializer, state_copied_by_value
from .config import load_settings
from .controls import Controls
from .errors import PoolError
from .futures import BrokenPool, JobFuture
from . import backends
from .ipc import oob
from .jobs import Job
from .model import DEFAULT_OPTIONS, JobOptions, JournalConfig, Key, PoolConfig
from .submit import KeyedFutures, PoolView, _discard, _label, _Submitter
from .supervisor import Supervisor

__all__ = ["Pool", "PoolView"]


class Pool(_Submitter, Controls, Executor):
    """A pool of worker processes for CPU-bound Python functions.

    ``max_workers`` defaults to the CPU count loky reports (cgroup quota and
    CPU affinity aware). The other keywords are :class:`PoolConfig` fields:
    ``max_tasks_per_child``, ``max_memory`` (soft RSS cap in bytes: a worker
    over it after a job is replaced), ``max_memory_hard`` (a worker over it
    during a job is killed and the job fails with ``MemoryLimitExceeded``),
    ``aging_rate``, ``kill_grace``, ``preempt_grace``, ...

    ``initializer(*initargs)`` runs in each worker as it starts (a
    replacement too), before it takes a job, as with ``ProcessPoolExecutor``;
    if it raises (or its worker dies in it), the pool is broken: every job
    not finished fails with :class:`BrokenPool`, and so does every later
    ``submit()``. ``mp_context``
    is accepted for the same drop-in reason and changes nothing: a worker is
    always a fresh interpreter that does not import ``__main__`` (``"spawn"``
    does), and a function defined there travels by value with its own copy of
    the globals it uses, so an initializer that prepares globals for jobs must
    live, with them, in an importable module (a warning says so).

    ``backend`` chooses what runs the jobs: this machine's worker processes
    (the default, ``procsched.backends.Local()``) or a Ray cluster
    (``procsched.backends.Ray(address="auto")``; ``max_workers`` then caps
    the jobs running at once, and defaults to the cluster's CPU count).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        journal: str | os.PathLike[str] | JournalConfig | None = None,
        backend: backends.Spec | str | None = None,
        **config: Any,
    ) -> None:
        if mp_context is not None and not callable(getattr(mp_context, "get_start_method", None)):
            raise TypeError(f"mp_context must be a multiprocessing context or None, not {type(mp_context).__name__}")
        init = b""
        if initializer is not None:
            if not callable(initializer):
                raise TypeError("initializer must be a callable")
            init = dump_initializer(initializer, tuple(initargs))
            if names := state_copied_by_value(initializer):
                warnings.warn(
                    f"the initializer {_label(initializer)} travels by value (it is not in an importable module), "
                    f"so the globals it uses ({', '.join(names)}) are its own copy in each worker: what it "
                    "sets there, jobs will not see. Define it, and the jobs that read them, in a module the workers can import.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        spec = backends.choose(backend)
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        else:
            max_workers = spec.default_workers()
        if config.get("max_tasks_per_child") is None:
            config.pop("max_tasks_per_child", None)
        for key in ("max_memory", "max_memory_hard"):
            if config.get(key) is None:
                config.pop(key, None)
        try:
            self._config = PoolConfig(max_workers=max_workers, **config)
        except TypeError as e:
            raise TypeError(f"Pool(): {e}") from None
        _check_config(self._config)
        self._workers = max_workers  # 0: as many as the backend has room for (a Ray cluster's CPUs)
        self._follows = isinstance(spec, backends.Ray)  # may go back to 0 (follow the cluster) in reconfigure()
        self._opts = DEFAULT_OPTIONS
        self._encoder = CallEncoder()
        self._ids = itertools.count(1)
        self._segments = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        oob.sweep_orphans()
        self._prefix = oob.pool_prefix(f"{next(_POOL_NUMBERS):x}")  # (not id(): a dropped pool's loop may outlive it)
        self._sup = Supervisor(self._config, self._prefix, _journal_config(journal), spec, init)
        self._ids = itertools.count(self._sup.first_job_id)
        self._sup.new_id = self._ids.__next__  # (a schedule's firings are jobs too)
        self._keys = KeyedFutures()
        rec = self._sup.rec
        self._always = rec is not None and rec.always
        self._on_fetch = rec.fetched.append if rec is not None and rec.drop_fetched else None
        self._lend = self._sup.lend if self._sup.lendable else None  # a waiting caller runs the loop
        self._sup.start()
        # At exit the accepted jobs finish first (a hook bound to the supervisor, not the pool,
        # which it would keep alive; registered now, so it runs before earlier cleanups).
        atexit.register(self._sup.at_exit)
        # Dropped without shutdown(), the pool ends as shutdown(wait=False) would: its
        # accepted jobs finish, then its workers go (as the stdlib's executors do once collected).
        weakref.finalize(self, self._sup.post, ("shutdown", False, False, 0.0)).atexit = False

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **overrides: Any) -> Pool:
        """A pool built from a settings file (``conf/procsched.toml``): its ``[pool]`` table,
        and a journal if its ``[journal]`` table sets a ``path``.

        Keywords override the file; ``max_workers`` missing from both means the CPU count.
        """
        pool, journal = load_settings(path)
        settings: dict[str, Any] = {"journal": journal, **pool, **overrides}
        return cls(settings.pop("max_workers", None), **settings)

    # -- jobs -----------------------------------------------------------------
    def _make_job(self, opts: JobOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], label: str | None = None, key: Key | None = None) -> Job:
        fn = callable_of(fn)
        fn_bytes, flags = self._encoder.function(fn)
        args_bytes, buffers = self._encoder.arguments(fn, args, kwargs)
        desc = oob.write(f"{self._prefix}a{next(self._segments)}", buffers) if buffers else b""
        fut = self._new_future()
        return Job(fut.job_id, fut, opts.name or label or _label(fn), fn_bytes, flags, args_bytes, desc, opts, key)

    def _new_future(self) -> JobFuture:
        fut = JobFuture(next(self._ids), self._lend)
        if self._on_fetch is not None:
            fut._on_fetch = self._on_fetch
        return fut

    def _drop(self, jobs: list[Job]) -> None:
        """Jobs that will never reach the loop: their argument segments go, their keys are free."""
        self._keys.drop(jobs)
        _discard(jobs)

    def _prerequisites(self, given: Any) -> tuple[tuple[int, JobFuture | None], ...]:
        """``depends_on``: futures or ids of jobs this pool knows (submitted before: no cycles)."""
        if isinstance(given, (JobFuture, int)) or not hasattr(given, "__iter__"):
            given = [given]
        out: list[tuple[int, JobFuture | None]] = []
        for dep in given:
            if isinstance(dep, JobFuture):
                out.append((dep.job_id, dep))
            elif isinstance(dep, int) and not isinstance(dep, bool):
                if not self._known(dep):
                    raise ValueError(f"option 'depends_on': no job {dep} in this pool")
                out.append((dep, None))
            else:
                raise TypeError(f"option 'depends_on' takes futures or job ids, not {type(dep).__name__}")
        return tuple(out)

    def _known(self, job_id: int) -> bool:
        sup = self._sup
        rec = sup.rec
        return (
            job_id in sup.jobs
            or job_id in sup.outcomes
            or job_id in sup.outcomes_old
            or (rec is not None and job_id in rec.journal.state.jobs)
            or _in_flight(sup, job_id)
        )

    def _check_open(self) -> None:
        if self._sup.broken is not None:  # (first, as the stdlib's: broken says more than shut down)
            raise BrokenPool(str(self._sup.broken)) from self._sup.broken.__cause__
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._sup.exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._sup.crashed is not None:
            raise PoolError(f"the pool is broken: its supervisor crashed ({self._sup.crashed!r})")

    def _post(self, jobs: list[Job]) -> None:
        """Hand jobs to the loop; after shutdown, drop their argument segments and raise.

        Under ``fsync="always"`` this returns once the jobs' records are on disk.
        """
        durable = None
        borrow = False
        try:
            with self._lock:
                closed = self._closed
                if closed:
                    pass
                elif self._always:
                    durable = threading.Event()
                    self._sup.post(("jobs", jobs, durable))
                else:
                    borrow = self._sup.post(jobs[0] if len(jobs) == 1 else jobs, borrow=True)
        finally:
            if borrow:  # the loop sleeps with a worker idle: place the jobs from here (nobody was rung)
                self._sup.lend_turn()
        if closed:
            self._drop(jobs)
            raise RuntimeError("cannot schedule new futures after shutdown")
        if durable is None or self._sup.on_loop():
            return  # (a done-callback runs on the loop: waiting there would wait for itself)
        while not durable.wait(0.5):
            if self._sup.ended:  # it crashed: the futures say why
                return

    # -- lifecycle ------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting jobs; with ``wait``, return once every worker is gone."""
        self._close(cancel_futures, kill=False)
        if wait:
            self._join()

    def terminate(self, grace: float = 0.0) -> None:
        """Cancel what is queued, kill what runs, and return once all is gone. ``grace``:
        seconds workers get to exit when asked before SIGKILL (an idle one exits at once)."""
        self._close(True, kill=True, grace=grace)
        self._join()

    def _close(self, cancel_futures: bool, kill: bool, grace: float = 0.0) -> None:
        with self._lock:
            first = not self._closed
            self._closed = True
            if first or cancel_futures or kill:  # (dropped if the loop has ended)
                self._sup.post(("shutdown", cancel_futures, kill, grace))

    def _join(self) -> None:
        if not self._sup.on_loop():
            self._sup.thread.join()
            # Until here the exit hook stays: after shutdown(wait=False) the
            # interpreter still waits for the accepted jobs, as the stdlib does.
            atexit.unregister(self._sup.at_exit)

    @property
    def _pool(self) -> Pool:  # (see _Submitter)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()  # Ctrl-C means stop now, not "finish the batch first"
        else:
            self.shutdown(wait=True)

    # -- introspection --------------------------------------------------------
    @property
    def max_workers(self) -> int:
        """Jobs that run at once: the pool's setting, or a Ray cluster's CPU count now."""
        return self._workers or self._sup.backend.capacity

    @property
    def _max_workers(self) -> int:  # the name the stdlib's executors use (submit.py's map reads it)
        return self.max_workers

    @property
    def degraded(self) -> bool:
        """True while workers keep dying at boot (respawns are backing off)."""
        return self._sup.backend.degraded

    def _ask(self, what: str, *args: Any) -> Any:
        """A request the loop answers (it owns the jobs); waits for the answer."""
        if self._sup.on_loop():
            raise PoolError(f"{what}() cannot be called from a future's done-callback (it runs on the supervisor's loop)")
        self._check_open()
        answer: list[Any] = []
        done = threading.Event()
        self._sup.post((what, *args, answer, done))
        while not done.wait(0.5):
            if self._sup.ended:
                raise PoolError(f"the pool stopped before it could {what}")
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    # -- for the service ----------------------------------------------------------
    def drain(self) -> threading.Event:
        """Start no more jobs (queued ones stay queued, and journaled); running ones go on.
        The event returned is set once no job runs."""
        done, idle = threading.Event(), threading.Event()
        self._sup.post(("drain", done, idle))
        while not done.wait(0.5):
            if self._sup.ended:
                break
        return idle

    def running(self) -> int:
        """How many jobs are on workers now (a turn old at most)."""
        return len(self._sup.runs)

    def reconfigure(self, settings: dict[str, Any]) -> list[str]:
        """Change what can change while the pool runs: ``max_workers`` (grown at once, shrunk
        as workers finish their job), memory caps, ``max_tasks_per_child``, graces, prefetch.
        A new ``soft`` memory cap or ring size applies to workers started from now on.
        ``aging_rate`` and ``log_dir`` need a new pool (``ValueError``). On a Ray pool,
        ``max_workers`` caps the jobs running at once, and 0 lifts the cap. The names changed."""
        old = self._config
        given = {k: v for k, v in settings.items() if v is not None}
        given.setdefault("max_workers", old.max_workers)
        try:
            new = msgspec.structs.replace(old, **given)
        except TypeError as e:
            raise TypeError(f"reconfigure(): {e}") from None
        _check_config(new)
        changed = [f for f in new.__struct_fields__ if getattr(new, f) != getattr(old, f)]
        fixed = [f for f in changed if f in ("aging_rate", "log_dir")]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change while the pool runs")
        if isinstance(new.max_workers, bool) or not isinstance(new.max_workers, int) or new.max_workers < 0 or (new.max_workers == 0 and not self._follows):
            what = "a positive int (or 0 on a Ray pool: as many as the cluster's CPUs)" if isinstance(new.max_workers, int) else "an int"
            raise ValueError(f"max_workers must be {what}, not {new.max_workers!r}")
        if changed:  # applied before this returns (max_workers and stats() show it at once),
            if self._sup.on_loop():  # but from a done-callback, by the loop's next turn
                self._sup.post(("call", lambda: self._sup._reconfigure(new), threading.Event()))
            else:
                self._ask("reconfigure", new)
            self._config, self._workers = new, new.max_workers
        return changed

    def set_heartbeat(self, interval: float, beat: Callable[[], None]) -> None:
        """Have the supervisor's loop call ``beat`` every ``interval`` seconds (a watchdog)."""
        self._sup.post(("heartbeat", (interval, beat)))

    @property
    def recovered(self) -> dict[int, JobFuture]:
        """Futures of the unfinished jobs the journal brought back when the pool opened, by job id."""
        return self._sup.recovered

    def compact_journal(self) -> None:
        """Rewrite the journal as its live state now (it also compacts on its own)."""
        if self._sup.rec is None:
            raise PoolError("this pool has no journal")
        if self._sup.on_loop():
            raise PoolError("compact_journal() cannot be called from a future's done-callback (it runs on the supervisor's loop)")
        self._check_open()
        done = threading.Event()
        self._sup.post(("compact", done))
        while not done.wait(0.5):
            if self._sup.ended:
                raise PoolError("the pool stopped before its journal was compacted")

    def stats(self) -> dict[str, Any]:
        """Counts of jobs by outcome, queue depth, workers, restarts."""
        return self._sup.snapshot()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<procsched.Pool max_workers={self.max_workers} {state}>"


def _in_flight(sup: Supervisor, job_id: int) -> bool:
    """A job posted but not yet taken in by the loop (a caller thread's look at the intake)."""
    for msg in list(sup.intake):
        jobs = msg if type(msg) is list else [msg] if type(msg) is Job else msg[1] if type(msg) is tuple and msg[0] == "jobs" else ()
        if any(j.id == job_id for j in jobs):
            return True
    return False


_POOL_NUMBERS = itertools.count(1)  # name each pool's shared-memory segments


def _journal_config(journal: str | os.PathLike[str] | JournalConfig | None) -> JournalConfig | None:
    if journal is None:
        return None
    if isinstance(journal, (str, os.PathLike)):
        journal = JournalConfig(path=os.fspath(journal))
    if not isinstance(journal, JournalConfig):
        raise TypeError(f"Pool option 'journal' must be a path or a JournalConfig, not {type(journal).__name__}")
    if journal.fsync not in ("always", "interval", "never"):
        raise ValueError(f"journal option 'fsync' must be 'always', 'interval' or 'never', not {journal.fsync!r}")
    for name, low in (("fsync_interval", 0.001), ("compact_dead_fraction", 0.0), ("result_ttl", 0.0), ("segment_bytes", 65536), ("compact_min_bytes", 0), ("spill_bytes", 0), ("keep_results", -1)):
        v = getattr(journal, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low:
            raise ValueError(f"journal option {name!r} must be a number >= {low}, not {v!r}")
    if journal.compact_dead_fraction >= 1:
        raise ValueError(f"journal option 'compact_dead_fraction' must be below 1, not {journal.compact_dead_fraction!r}")
    return journal


def _check_config(c: PoolConfig) -> None:
    for name in ("ring_bytes", "max_prefetch", "max_tasks_per_child", "max_memory", "max_memory_hard", "log_bytes"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"Pool option {name!r} must be a non-negative int, not {v!r}")
    for name in ("prefetch_s", "kill_grace", "respawn_backoff", "respawn_backoff_max", "memory_check_interval", "aging_rate", "preempt_grace", "stop_timeout", "idle_spin"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"Pool option {name!r} must be a non-negative number, not {v!r}")
    if c.ring_bytes < 64 * 1024:
        raise ValueError("Pool option 'ring_bytes' must be at least 65536")
    if not isinstance(c.log_dir, str):
        raise ValueError(f"Pool option 'log_dir' must be a str (a directory, or \"\" for no capture), not {c.log_dir!r}")
