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
  been measured); every job past it stays cancellable;
* ``map`` with the default ``chunksize=1`` keeps the stdlib's per-call
  outcomes but sends the calls in batches (about four per worker, as
  ``multiprocessing.Pool.map`` sizes its chunks) unless a ``timeout`` or
  ``retries`` option asks for one job per call; see :meth:`Pool.map`.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

from .codec import CallEncoder, ItemError, run_calls, run_chunk, run_then, then_parts
from .journal.records import ScheduleSet
from .schedule import MISFIRE_POLICIES, parse_cron
from .schedules import OVERLAP_POLICIES
from .config import load_settings
from .errors import PoolError
from .futures import JobFuture
from .ipc import frames, oob
from .model import DEFAULT_OPTIONS, JobOptions, JournalConfig, Key, PoolConfig, make_options
from .jobs import Job
from .supervisor import Supervisor

T = TypeVar("T")

_MAX_CHUNK = 10_000


def _label(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class _Submitter:
    """What ``Pool`` and its option views share: submit and map with given options."""

    _pool: Pool
    _opts: JobOptions
    _key: Key | None = None
    #: when its jobs may start: ("delay", seconds after submit) or ("at", wall-clock time); None: at once
    _when: tuple[str, float] | None = None
    #: prerequisites (job ids, and the futures given for them) and what a failed one means
    _deps: tuple[tuple[int, JobFuture | None], ...] = ()
    _dep_policy = "cancel"

    def options(self, **changes: Any) -> PoolView:
        """A view of the pool whose ``submit``/``map`` use these job options.

        ``priority`` (int, higher first), ``hot`` (bool), ``timeout`` (seconds),
        ``retries`` (int or :class:`RetryPolicy`), ``preempt`` ("cooperative" or
        "kill"), ``name`` (str), ``tags`` (strings), and ``key`` (str or int):
        submitting with a key that is already queued or running returns that
        job's future, and with a journal, a key that already succeeded
        returns its stored result without running it again.

        ``delay`` (seconds after each submit) or ``run_at`` (a timezone-aware
        ``datetime``) hold the jobs back until then; they then queue with
        their priority. With a journal, the wait survives a restart.
        """
        key = changes.pop("key", self._key)
        if key is not None:
            _check_key(key)
        when = _when(changes.pop("delay", None), changes.pop("run_at", None), self._when)
        deps = self._deps if "depends_on" not in changes else self._pool._prerequisites(changes.pop("depends_on"))
        policy = changes.pop("on_failure", self._dep_policy)
        if policy not in ("cancel", "run"):
            raise ValueError(f"option 'on_failure' must be 'cancel' or 'run', not {policy!r}")
        # the same options object when only the key changes: the journal writes each one once
        view = PoolView(self._pool, make_options(self._opts, changes) if changes else self._opts, key, when)
        view._deps, view._dep_policy = deps, policy
        return view

    def _stamp(self, jobs: list[Job]) -> None:
        """Give new jobs this view's start time and prerequisites."""
        when = self._when
        if when is None and not self._deps:
            return
        not_before = 0.0 if when is None else time.time() + when[1] if when[0] == "delay" else when[1]
        ids = tuple(i for i, f in self._deps if f is None)  # (a future's id is read by the loop: it may change)
        futures = tuple(f for _, f in self._deps if f is not None)
        for job in jobs:
            job.not_before = not_before
            if self._deps:
                job.deps, job.dep_futures, job.dep_policy = ids, futures, self._dep_policy

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> JobFuture:
        """Schedule ``fn(*args, **kwargs)``; returns its future."""
        pool = self._pool
        pool._check_open()
        if self._key is not None:
            known = pool._keyed_future(self._key)
            if known is not None:
                return known
        job = pool._make_job(self._opts, fn, args, kwargs, key=self._key)
        self._stamp([job])
        if job.key is not None:
            winner = pool._claim_key(job)
            if winner is not job.future:  # another thread submitted the key meanwhile
                job.release_args()
                return winner
        pool._post([job])
        return job.future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = 1,
        key: Callable[..., Key] | None = None,
    ) -> Iterator[T]:
        """Like ``Executor.map``: every call submitted now, results yielded in order.

        With ``chunksize=1`` (the default; ``None`` means the same) each call
        keeps its own outcome, as in the stdlib: an exception is raised when
        the iteration reaches that call, after the results before it. Unless
        the options set a ``timeout`` or ``retries`` (which are per job),
        procsched still sends the calls in batches of about a quarter of the
        calls per worker (the size ``multiprocessing.Pool.map`` picks), which
        is what makes mapping small functions fast. An explicit
        ``chunksize > 1`` makes each chunk one job, as ``ProcessPoolExecutor``
        does: a failing call fails its whole chunk. Either way a worker that
        dies during a batch or chunk fails every call of it with
        ``WorkerCrashed`` (or retries the job, per its options).

        ``key``, a function of a call's arguments, makes every call its own
        job with that key (see :meth:`options`): with a journal, rerunning
        the same ``map`` after a crash runs only the calls whose keys have
        not succeeded, and the others' results come from the journal.
        """
        if chunksize is None:
            chunksize = 1
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        pool = self._pool
        pool._check_open()
        if self._key is not None:
            raise TypeError("map() cannot give one key to many calls: pass key= to map() instead of options()")
        end = None if timeout is None else time.monotonic() + timeout
        # One iterable: its items are the arguments (no tuple per call, as
        # multiprocessing.Pool.map does); several: zipped into tuples.
        star = len(iterables) != 1
        calls = list(zip(*iterables)) if star else list(iterables[0])
        if key is not None:
            return _results(self._keyed_map(fn, calls, star, key), end)
        runner: Callable[..., Any] = run_chunk
        if chunksize == 1 and not self._opts.timeout and not self._opts.retries.retries:
            chunksize = min(_MAX_CHUNK, max(1, -(-len(calls) // (4 * pool._max_workers))))
            runner = run_calls
        jobs: list[Job] = []
        try:
            if chunksize == 1:
                jobs.extend(pool._make_job(self._opts, fn, args if star else (args,), {}) for args in calls)
            else:
                jobs.extend(
                    pool._make_job(self._opts, runner, (fn, calls[i : i + chunksize], star), {}, label=_label(fn))
                    for i in range(0, len(calls), chunksize)
                )
        except BaseException:
            _discard(jobs)  # a call that cannot be pickled: the ones made before it are never posted
            raise
        del calls
        self._stamp(jobs)
        pool._post(jobs)
        futures = [j.future for j in jobs]
        del jobs
        if chunksize == 1:
            return _results(futures, end)
        return _chunk_results(futures, end)

    def _keyed_map(self, fn: Callable[..., Any], calls: list[Any], star: bool, key: Callable[..., Key]) -> list[JobFuture]:
        """One job per call, each with its key; calls whose key is known reuse its future."""
        pool = self._pool
        futures: list[JobFuture] = []
        jobs: list[Job] = []
        try:
            for args in calls:
                k = key(*args) if star else key(args)
                _check_key(k)
                known = pool._keyed_future(k)
                if known is None:
                    job = pool._make_job(self._opts, fn, args if star else (args,), {}, key=k)
                    known = pool._claim_key(job)
                    if known is job.future:
                        jobs.append(job)
                    else:
                        job.release_args()
                futures.append(known)
        except BaseException:
            pool._drop(jobs)  # never posted: their keys are free again
            raise
        if jobs:
            self._stamp(jobs)
            pool._post(jobs)
        return futures

    def submit_many(self, calls: Iterable[tuple[Any, ...]]) -> list[JobFuture]:
        """Submit many calls at once: ``(fn,)``, ``(fn, args)`` or ``(fn, args, kwargs)`` each.

        One hand-off to the supervisor and one journal batch; the futures come
        back in the calls' order. All or nothing: if any call is malformed or
        cannot be pickled, none is submitted.
        """
        pool = self._pool
        pool._check_open()
        if self._key is not None:
            raise TypeError("submit_many() cannot give one key to many calls")
        jobs: list[Job] = []
        try:
            for i, call in enumerate(calls):
                if not isinstance(call, tuple) or not 1 <= len(call) <= 3:
                    raise TypeError(f"submit_many() call {i}: expected (fn, args, kwargs), not {call!r:.80}")
                fn, args, kwargs = call[0], call[1] if len(call) > 1 else (), call[2] if len(call) > 2 else {}
                if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                    raise TypeError(f"submit_many() call {i}: args must be a tuple and kwargs a dict")
                jobs.append(pool._make_job(self._opts, fn, args, kwargs))
        except BaseException:
            _discard(jobs)
            raise
        self._stamp(jobs)
        if jobs:
            pool._post(jobs)
        return [job.future for job in jobs]

    def cron(
        self,
        expr: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        name: str,
        tz: str | None = None,
        misfire: str = "run_once",
        overlap: str = "skip",
        replace: bool = False,
        **kwargs: Any,
    ) -> str:
        """Run ``fn(*args, **kwargs)`` on a cron schedule (5 fields, or 6 with seconds last), in ``tz``
        (an IANA name; UTC if None), as jobs with this view's options; returns ``name``.

        ``misfire`` (what a stall or downtime owes): "skip", "run_once" (one catch-up run) or
        "catch_up" (every missed time, at most 100). ``overlap`` (a fire time while the previous
        run goes on): "skip", "queue", "replace" (kill the old run) or "allow". ``replace``: a
        schedule of that name is replaced instead of refused.
        """
        schedule = parse_cron(expr, tz)  # ValueError naming what is wrong
        return self._schedule(name, "cron", schedule.expr, 0.0, tz or "", fn, args, kwargs, misfire, overlap, replace)

    def every(
        self,
        interval: float,
        fn: Callable[..., Any],
        /,
        *args: Any,
        name: str,
        misfire: str = "skip",
        overlap: str = "skip",
        replace: bool = False,
        **kwargs: Any,
    ) -> str:
        """Run ``fn(*args, **kwargs)`` every ``interval`` seconds from now; see :meth:`cron`."""
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval < float("inf"):
            raise ValueError(f"every(): interval must be a positive number of seconds, not {interval!r}")
        return self._schedule(name, "every", "", float(interval), "", fn, args, kwargs, misfire, overlap, replace)

    def _schedule(
        self, name: str, kind: str, expr: str, every: float, tz: str,
        fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], misfire: str, overlap: str, replace: bool,
    ) -> str:  # fmt: skip
        if not isinstance(name, str) or not name:
            raise TypeError("a schedule needs a name (a non-empty str)")
        if misfire not in MISFIRE_POLICIES:
            raise ValueError(f"misfire must be one of {', '.join(map(repr, MISFIRE_POLICIES))}, not {misfire!r}")
        if overlap not in OVERLAP_POLICIES:
            raise ValueError(f"overlap must be one of {', '.join(map(repr, OVERLAP_POLICIES))}, not {overlap!r}")
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        pool = self._pool
        fn_bytes, flags = pool._encoder.function(fn)
        args_bytes = pool._encoder.arguments(fn, args, kwargs, in_band=True)[0]  # each firing reuses them
        now = time.time()
        spec = ScheduleSet(name, kind, expr, every, now, tz, fn_bytes, flags, args_bytes, self._opts, self._opts.name or _label(fn), misfire, overlap, now)
        pool._ask("schedule", spec, replace)
        return name

    def then(self, prerequisite: JobFuture, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> JobFuture:
        """Run ``fn(prerequisite's result, *args, **kwargs)`` once ``prerequisite`` has succeeded.

        If it fails or is cancelled, this job is cancelled (and so are the
        jobs that depend on it, per their ``on_failure``). The result passes
        from worker to worker as bytes; this process never decodes it.
        """
        pool = self._pool
        pool._check_open()
        if not isinstance(prerequisite, JobFuture):
            raise TypeError(f"then() takes a job's future, not {type(prerequisite).__name__}")
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        runner, flags = pool._encoder.function(run_then)
        fut = JobFuture()
        fut.job_id = next(pool._ids)
        if pool._on_fetch is not None:
            fut._on_fetch = pool._on_fetch
        job = Job(fut.job_id, fut, self._opts.name or _label(fn), runner, flags | frames.F_THEN, then_parts(fn, args, kwargs), b"", self._opts)
        self._stamp([job])
        job.dep_futures = (*job.dep_futures, prerequisite)
        pool._post([job])
        return fut


# The iterators below hold no reference to a value they have yielded (like
# the stdlib's), so a caller that drops a result lets it be freed at once.


def _result(fut: JobFuture, end: float | None) -> Any:
    try:
        try:
            return fut.result() if end is None else fut.result(end - time.monotonic())
        finally:
            fut.cancel()  # a no-op once done; a timed-out call is not left queued
    finally:
        del fut


def _results(futures: list[JobFuture], end: float | None) -> Iterator[Any]:
    futures.reverse()
    try:
        while futures:
            yield _result(futures.pop(), end)
    finally:
        for fut in futures:
            fut.cancel()


def _chunk_results(futures: list[JobFuture], end: float | None) -> Iterator[Any]:
    futures.reverse()
    try:
        while futures:
            values = _result(futures.pop(), end)
            values.reverse()
            if type(values) is list:  # no call of this batch failed
                while values:
                    yield values.pop()
                continue
            while values:
                if type(values[-1]) is ItemError:
                    raise values.pop().error()
                yield values.pop()
    finally:
        for fut in futures:
            fut.cancel()


class PoolView(_Submitter):
    """The pool seen through a set of job options (from ``Pool.options``)."""

    def __init__(self, pool: Pool, opts: JobOptions, key: Key | None = None, when: tuple[str, float] | None = None) -> None:
        self._pool = pool
        self._opts = opts
        self._key = key
        self._when = when

    @property
    def job_options(self) -> JobOptions:
        return self._opts

    def __repr__(self) -> str:
        return f"<PoolView {self._opts!r}>"


class Pool(_Submitter, Executor):
    """A pool of worker processes for CPU-bound Python functions.

    ``max_workers`` defaults to the CPU count loky reports (cgroup quota and
    CPU affinity aware). The other keywords are :class:`PoolConfig` fields:
    ``max_tasks_per_child``, ``max_memory`` (soft RSS cap in bytes: a worker
    over it after a job is replaced), ``max_memory_hard`` (a worker over it
    during a job is killed and the job fails with ``MemoryLimitExceeded``),
    ``aging_rate``, ``kill_grace``, ``preempt_grace``, ...
    """

    def __init__(self, max_workers: int | None = None, *, journal: str | os.PathLike[str] | JournalConfig | None = None, **config: Any) -> None:
        if max_workers is None:
            import loky  # here, not at the top: it costs ~60 ms to import, and only this needs it

            max_workers = loky.cpu_count()
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
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
        self._max_workers = max_workers
        self._pool = self
        self._opts = DEFAULT_OPTIONS
        self._encoder = CallEncoder()
        self._ids = itertools.count(1)
        self._segments = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        oob.sweep_orphans()
        self._prefix = oob.pool_prefix(f"{id(self):x}")
        self._sup = Supervisor(self._config, self._prefix, _journal_config(journal))
        self._ids = itertools.count(self._sup.first_job_id)
        self._sup.new_id = self._ids.__next__  # (a schedule's firings are jobs too)
        self._keyed: weakref.WeakValueDictionary[Key, JobFuture] = weakref.WeakValueDictionary()
        rec = self._sup.rec
        self._always = rec is not None and rec.always
        self._on_fetch = rec.fetched.append if rec is not None and rec.drop_fetched else None
        self._sup.start()
        atexit.register(self._at_exit)

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
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        fn_bytes, flags = self._encoder.function(fn)
        args_bytes, buffers = self._encoder.arguments(fn, args, kwargs)
        job_id = next(self._ids)
        desc = oob.write(f"{self._prefix}a{next(self._segments)}", buffers) if buffers else b""
        fut = JobFuture()
        fut.job_id = job_id
        if self._on_fetch is not None:
            fut._on_fetch = self._on_fetch
        return Job(job_id, fut, opts.name or label or _label(fn), fn_bytes, flags, args_bytes, desc, opts, key)

    def _keyed_future(self, key: Key) -> JobFuture | None:
        """The future of this process's job with ``key``, unless that job failed or was cancelled."""
        with self._lock:
            fut = self._keyed.get(key)
        return fut if fut is not None and _usable(fut) else None

    def _claim_key(self, job: Job) -> JobFuture:
        """Register ``job`` as its key's, unless a usable future holds the key already; the one that does."""
        assert job.key is not None
        with self._lock:
            fut = self._keyed.get(job.key)
            if fut is not None and _usable(fut):
                return fut
            self._keyed[job.key] = job.future
        return job.future

    def _drop(self, jobs: list[Job]) -> None:
        """Jobs that will never reach the loop: their argument segments go, their keys are free."""
        with self._lock:
            for job in jobs:
                if job.key is not None and self._keyed.get(job.key) is job.future:
                    del self._keyed[job.key]
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
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._sup.crashed is not None:
            raise PoolError(f"the pool is broken: its supervisor crashed ({self._sup.crashed!r})")

    def _post(self, jobs: list[Job]) -> None:
        """Hand jobs to the loop; after shutdown, drop their argument segments and raise.

        Under ``fsync="always"`` this returns once the jobs' records are on disk.
        """
        durable = None
        with self._lock:
            closed = self._closed
            if closed:
                pass
            elif self._always:
                durable = threading.Event()
                self._sup.post(("jobs", jobs, durable))
            else:
                self._sup.post(jobs[0] if len(jobs) == 1 else jobs)
        if closed:
            self._drop(jobs)
            raise RuntimeError("cannot schedule new futures after shutdown")
        if durable is None or threading.current_thread() is self._sup.thread:
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

    def terminate(self) -> None:
        """Cancel what is queued, kill what runs, and return once all is gone."""
        self._close(True, kill=True)
        self._join()

    def _close(self, cancel_futures: bool, kill: bool) -> None:
        with self._lock:
            first = not self._closed
            self._closed = True
            if first or cancel_futures or kill:  # (dropped if the loop has ended)
                self._sup.post(("shutdown", cancel_futures, kill))

    def _join(self) -> None:
        if threading.current_thread() is not self._sup.thread:
            self._sup.thread.join()
            # Until here the exit hook stays: after shutdown(wait=False) the
            # interpreter still waits for the accepted jobs, as the stdlib does.
            atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.shutdown(wait=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()  # Ctrl-C means stop now, not "finish the batch first"
        else:
            self.shutdown(wait=True)

    # -- introspection --------------------------------------------------------
    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def degraded(self) -> bool:
        """True while workers keep dying at boot (respawns are backing off)."""
        return self._sup.backend.degraded

    def cancel(self, job: JobFuture | int, kill: bool = False) -> bool:
        """Cancel a job (its future or id) that has not started; with ``kill``, also one that runs
        (its worker is killed and replaced). True if the job is, or is being, cancelled."""
        return bool(self._ask("cancel", _job_id(job), bool(kill)))

    def reprioritize(self, job: JobFuture | int, priority: int) -> bool:
        """Give a job that has not started a new priority; False if it has started or ended."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        return bool(self._ask("reprioritize", _job_id(job), priority))

    def dead_letters(self) -> list[dict[str, Any]]:
        """Jobs out of attempts after a crash or a timeout: each with its failure history."""
        return list(self._ask("dead_letters"))

    def resubmit(self, job: JobFuture | int, **options: Any) -> JobFuture:
        """Run a dead letter again as a new job, with its options changed by ``options``; it
        leaves the dead letters. ``KeyError`` if there is no dead letter for ``job``."""
        fut = self._ask("resubmit", _job_id(job), options)
        assert isinstance(fut, JobFuture)
        return fut

    def purge(self, job: JobFuture | int | None = None) -> int:
        """Forget a dead letter (or, with no argument, all of them); how many were forgotten."""
        return int(self._ask("purge", None if job is None else _job_id(job)))

    def jobs(self, state: str | None = None, tag: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """The jobs the pool holds (queued, pending, waiting, running) and its dead letters, filtered."""
        return list(self._ask("list_jobs", state, tag, name))

    def schedules(self) -> list[dict[str, Any]]:
        """The pool's schedules: name, schedule, policies, paused, last and next fire times, runs."""
        return list(self._ask("schedules"))

    def pause(self, name: str) -> bool:
        """Stop firing a schedule (its running job is left alone); False if there is none by that name."""
        return bool(self._ask("pause", name, True))

    def resume(self, name: str) -> bool:
        """Fire a paused schedule again, from now on (the paused time is not owed)."""
        return bool(self._ask("pause", name, False))

    def trigger(self, name: str) -> bool:
        """Fire a schedule now, once (its overlap policy applies), besides its regular times."""
        return bool(self._ask("trigger", name))

    def unschedule(self, name: str) -> bool:
        """Remove a schedule; False if there is none by that name."""
        return bool(self._ask("unschedule", name))

    def _ask(self, what: str, *args: Any) -> Any:
        """A request the loop answers (it owns the jobs); waits for the answer."""
        if threading.current_thread() is self._sup.thread:
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

    @property
    def recovered(self) -> dict[int, JobFuture]:
        """Futures of the unfinished jobs the journal brought back when the pool opened, by job id."""
        return self._sup.recovered

    def compact_journal(self) -> None:
        """Rewrite the journal as its live state now (it also compacts on its own)."""
        if self._sup.rec is None:
            raise PoolError("this pool has no journal")
        if threading.current_thread() is self._sup.thread:
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
        return f"<procsched.Pool max_workers={self._max_workers} {state}>"


def _discard(jobs: list[Job]) -> None:
    """Unlink the argument segments of jobs that will never reach the loop."""
    for job in jobs:
        job.release_args()


def _check_key(key: Any) -> None:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"option 'key' must be a str or an int, not {type(key).__name__}")
    if isinstance(key, int) and not -(1 << 63) <= key < (1 << 64):
        raise ValueError(f"option 'key' must fit in 64 bits, not {key}")


def _when(delay: Any, run_at: Any, current: tuple[str, float] | None) -> tuple[str, float] | None:
    if delay is not None and run_at is not None:
        raise TypeError("options 'delay' and 'run_at' exclude each other")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0 or delay == float("inf"):
            raise ValueError(f"option 'delay' must be a finite number of seconds >= 0, not {delay!r}")
        return ("delay", float(delay))
    if run_at is not None:
        if not isinstance(run_at, datetime.datetime):
            raise TypeError(f"option 'run_at' must be a datetime, not {type(run_at).__name__}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ValueError("option 'run_at' must be timezone-aware (a naive datetime has no single meaning)")
        return ("at", run_at.timestamp())
    return current


def _in_flight(sup: Supervisor, job_id: int) -> bool:
    """A job posted but not yet taken in by the loop (a caller thread's look at the intake)."""
    for msg in list(sup.intake):
        jobs = msg if type(msg) is list else [msg] if type(msg) is Job else msg[1] if type(msg) is tuple and msg[0] == "jobs" else ()
        if any(j.id == job_id for j in jobs):
            return True
    return False


def _job_id(job: Any) -> int:
    if isinstance(job, JobFuture):
        return job.job_id
    if isinstance(job, bool) or not isinstance(job, int):
        raise TypeError(f"expected a job's future or id, not {type(job).__name__}")
    return job


def _usable(fut: JobFuture) -> bool:
    """A keyed future a new submit may share: not failed, not cancelled."""
    return not (fut.done() and (fut.cancelled() or fut._exception is not None))


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
    for name in ("ring_bytes", "max_prefetch", "max_tasks_per_child", "max_memory", "max_memory_hard"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"Pool option {name!r} must be a non-negative int, not {v!r}")
    for name in ("prefetch_s", "kill_grace", "respawn_backoff", "respawn_backoff_max", "memory_check_interval", "aging_rate", "preempt_grace", "stop_timeout"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"Pool option {name!r} must be a non-negative number, not {v!r}")
    if c.ring_bytes < 64 * 1024:
        raise ValueError("Pool option 'ring_bytes' must be at least 65536")
