"""What every front door shares: ``submit``, ``map``, ``options`` and the rest.

``Pool`` (the embedded front door, ``executor.py``) and ``Client`` (a
running service's, ``client.py``) differ only in where a job goes once it
is made: a ``Pool`` posts it to its own supervisor, a ``Client`` sends it
over a socket. So the methods users call live here once, written against
:class:`Front`, the few operations each front door provides.
"""

from __future__ import annotations

import datetime
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .codec import ByPath, CallEncoder, ItemError, callable_of, run_calls, run_chunk, run_then, then_parts
from .futures import JobFuture
from .ipc import frames
from .jobs import Job
from .journal.records import ScheduleSet
from .model import JobOptions, Key, make_options
from .schedule import MISFIRE_POLICIES, parse_cron
from .schedules import OVERLAP_POLICIES

T = TypeVar("T")
_SLICEABLE = (list, tuple, range)

_MAX_CHUNK = 10_000


class KeyedFutures:
    """The futures of this process's keyed jobs, by key (held weakly: a dropped future frees it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: weakref.WeakValueDictionary[Key, JobFuture] = weakref.WeakValueDictionary()

    def get(self, key: Key) -> JobFuture | None:
        """The future of the job with ``key``, unless that job failed or was cancelled."""
        with self._lock:
            fut = self._by_key.get(key)
        return fut if fut is not None and _usable(fut) else None

    def claim(self, job: Job) -> JobFuture:
        """Register ``job`` as its key's, unless a usable future holds the key already; the one that does."""
        assert job.key is not None
        with self._lock:
            fut = self._by_key.get(job.key)
            if fut is not None and _usable(fut):
                return fut
            self._by_key[job.key] = job.future
        return job.future

    def drop(self, jobs: list[Job]) -> None:
        """Jobs that will never run: their keys are free again."""
        with self._lock:
            for job in jobs:
                if job.key is not None and self._by_key.get(job.key) is job.future:
                    del self._by_key[job.key]


def _usable(fut: JobFuture) -> bool:
    """A keyed future a new submit may share: not failed, not cancelled."""
    return not (fut.done() and (fut.cancelled() or fut._exception is not None))


class Front(Protocol):
    """What a front door gives the shared methods."""

    _encoder: CallEncoder
    _keys: KeyedFutures

    @property
    def _max_workers(self) -> int: ...

    def _check_open(self) -> None: ...
    def _make_job(self, opts: JobOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], label: str | None = None, key: Key | None = None) -> Job: ...
    def _new_future(self) -> JobFuture: ...
    def _drop(self, jobs: list[Job]) -> None: ...
    def _post(self, jobs: list[Job]) -> None: ...
    def _prerequisites(self, given: Any) -> tuple[tuple[int, JobFuture | None], ...]: ...
    def _ask(self, what: str, *args: Any) -> Any: ...


def _label(fn: Any) -> str:
    if type(fn) is ByPath:
        return fn.path
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class _Submitter:
    """What ``Pool`` and its option views share: submit and map with given options."""

    if TYPE_CHECKING:

        @property
        def _pool(self) -> Front:
            """The front door the jobs go through: a view's pool, or a pool (or client) itself, whose
            property answers ``self`` (an attribute would make a cycle, and a pool dropped without
            ``shutdown()`` would wait for a collection to end)."""
            ...

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
            known = pool._keys.get(self._key)
            if known is not None:
                return known
        job = pool._make_job(self._opts, fn, args, kwargs, None, self._key)
        if self._when is not None or self._deps:
            self._stamp([job])
        if job.key is not None:
            winner = pool._keys.claim(job)
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
        fn = callable_of(fn)
        pool = self._pool
        pool._check_open()
        if self._key is not None:
            raise TypeError("map() cannot give one key to many calls: pass key= to map() instead of options()")
        end = None if timeout is None else time.monotonic() + timeout
        # One iterable: its items are the arguments (no tuple per call, as
        # multiprocessing.Pool.map does); several: zipped into tuples. A list,
        # tuple or range is sliced as it is (a range's batches travel as ranges).
        star = len(iterables) != 1
        calls: Any = list(zip(*iterables)) if star else iterables[0]
        if type(calls) not in _SLICEABLE:
            calls = list(calls)
        if key is not None:
            return _results(self._keyed_map(fn, calls, star, key), end)
        runner: Callable[..., Any] = run_chunk
        if chunksize == 1 and not self._opts.timeout and not self._opts.retries.retries:
            chunksize = min(_MAX_CHUNK, max(1, -(-len(calls) // (4 * max(1, pool._max_workers)))))  # (0: a Ray cluster with no CPU yet)
            runner = run_calls
        jobs: list[Job] = []
        try:
            if chunksize == 1:
                jobs.extend(pool._make_job(self._opts, fn, args if star else (args,), {}) for args in calls)
            else:
                carried = pool._encoder.carried(fn)  # pickled once for all the batches
                jobs.extend(
                    pool._make_job(self._opts, runner, (carried, calls[i : i + chunksize], star), {}, label=_label(fn))
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
                known = pool._keys.get(k)
                if known is None:
                    job = pool._make_job(self._opts, fn, args if star else (args,), {}, key=k)
                    known = pool._keys.claim(job)
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
        check_schedule(name, misfire, overlap)
        fn = callable_of(fn)
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
        fn = callable_of(fn)
        runner, flags = pool._encoder.function(run_then)
        fut = pool._new_future()
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
    # (a generator, as the stdlib's map returns: ``itertools.chain`` over the batches would
    # hand items out ~15 ns faster, but it drops its source when two threads share it and
    # keeps handing out a batch after close())
    futures.reverse()
    try:
        while futures:
            values = _result(futures.pop(), end)
            if type(values) is list:  # no call of this batch failed
                yield from values  # (the batch is freed with the next one)
                continue
            for v in values:
                if type(v) is ItemError:
                    raise v.error()
                yield v
    finally:
        for fut in futures:
            fut.cancel()


class PoolView(_Submitter):
    """The pool seen through a set of job options (from ``Pool.options``)."""

    _pool: Front

    def __init__(self, pool: Front, opts: JobOptions, key: Key | None = None, when: tuple[str, float] | None = None) -> None:
        self._pool = pool
        self._opts = opts
        self._key = key
        self._when = when

    @property
    def job_options(self) -> JobOptions:
        return self._opts

    def __repr__(self) -> str:
        return f"<PoolView {self._opts!r}>"



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


def check_schedule(name: Any, misfire: str, overlap: str) -> None:
    """A schedule's name and policies, checked with errors that name what is wrong."""
    if not isinstance(name, str) or not name:
        raise TypeError("a schedule needs a name (a non-empty str)")
    if misfire not in MISFIRE_POLICIES:
        raise ValueError(f"misfire must be one of {', '.join(map(repr, MISFIRE_POLICIES))}, not {misfire!r}")
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap must be one of {', '.join(map(repr, OVERLAP_POLICIES))}, not {overlap!r}")
