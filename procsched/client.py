"""Client: a running service's front door, a ``concurrent.futures.Executor``.

``procsched.connect()`` returns a :class:`Client` with the surface of
``Pool`` (``submit``, ``map``, ``options``, ``then``, ``cron``, ``cancel``,
``jobs``, ``stats`` ...), shared with it through ``submit.py`` and
``controls.py``. A call is pickled here (cloudpickle: functions and
classes defined in a notebook cell travel by value) and sent to the
service; the future (a :class:`~procsched.link.RemoteFuture`) resolves
when the service pushes the outcome. How the connection carries submits,
answers and outcomes, and how it recovers from a restarted service, is
``link.py``, the Client's other half.

Closing a client, or losing it, never cancels its jobs: they run on, and
their outcomes wait in the service for a client that asks.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from concurrent.futures import wait as wait_futures
from typing import Any

from . import protocol as p
from .codec import CallEncoder, callable_of
from .controls import Controls
from .errors import PoolError
from .futures import JobFuture
from .jobs import Job
from .model import DEFAULT_OPTIONS, JobOptions, Key
from .link import Link, RemoteFuture, _error
from .submit import KeyedFutures, _label, _Submitter

_REQUESTS: dict[str, Any] = {
    "cancel": p.Cancel, "reprioritize": p.Reprioritize, "list_jobs": p.ListJobs, "show": p.Show,
    "stats": p.GetStats, "status": p.Status, "logs": p.Logs, "dead_letters": p.DeadLetters,
    "resubmit": p.Resubmit, "purge": p.Purge, "schedules": p.Schedules, "unschedule": p.Unschedule,
    "pause": p.Pause, "trigger": p.Trigger, "compact": p.Compact, "schedule": p.Schedule,
}  # fmt: skip


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    timeout: float = 10.0,
    reconnect: float = 300.0,
    progress: bool | None = None,
) -> Client:
    """A client of a running ``procsched serve``.

    ``address``: ``"unix:///path"`` (or a plain path) or ``"tcp://host:port"``;
    default ``$PROCSCHED_ADDRESS``, else the service's default socket. ``token``
    (TCP): default ``$PROCSCHED_TOKEN``. ``timeout``: for connecting and for each
    request's answer. ``reconnect``: how long to keep trying after the connection
    drops before the unfinished futures fail. ``progress``: whether ``map`` shows
    a progress bar (default: in a notebook, or when stderr is a terminal).
    """
    return Client(address, token=token, timeout=timeout, reconnect=reconnect, progress=progress)


class Client(Link, _Submitter, Controls, Executor):
    """A connection to ``procsched serve`` (see :func:`connect`)."""

    def __init__(self, address: str | None = None, *, token: str | None = None, timeout: float = 10.0,
                 reconnect: float = 300.0, progress: bool | None = None) -> None:  # fmt: skip
        self.address = address or p.default_address()
        self._family, self._sockaddr = p.parse_address(self.address)
        if address is None and self._family == "unix":  # a default path: only in a directory no one else controls
            why = p.untrusted(os.path.dirname(self._sockaddr))
            if why:
                raise PermissionError(f"will not connect to {self._sockaddr}: {why} (another user could have put a socket there)")
        self._token = token if token is not None else os.environ.get("PROCSCHED_TOKEN", "")
        self._timeout = timeout
        self._reconnect_s = reconnect
        self._progress = progress
        self._opts = DEFAULT_OPTIONS
        self._encoder = CallEncoder()
        self._sending = threading.Lock()  # the socket's writing side (and _fns): whole frames, in order
        self._lock = threading.Lock()  # _unacked, _outbox
        self._ids_known = threading.Condition(self._lock)
        self._unacked: deque[list[RemoteFuture]] = deque()  # Submits without an answer yet, in order
        self._outbox: list[RemoteFuture] = []  # jobs not yet sent (see _queue)
        self._held: list[RemoteFuture] = []  # refused by a stopping service: sent to the next one
        self._outbox_bytes = 0
        self._pending: dict[int, RemoteFuture] = {}  # accepted, unfinished jobs by id
        self._twins: dict[int, list[RemoteFuture]] = {}  # more futures of one id (a key submitted twice)
        self._early: dict[int, p.Outcome] = {}  # outcomes that came before their Accepted
        self._asks: dict[int, Any] = {}  # ref -> [event, reply] or a callback
        self._refs = itertools.count(1)
        self._fns: dict[bytes, int] = {}
        self._keys = KeyedFutures()
        self._closed = False
        self._broken: BaseException | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._sock, welcome = self._dial()
        self._welcome(welcome)
        self._connected.set()
        self._reader = threading.Thread(target=self._read_loop, name="procsched-client", daemon=True)
        self._reader.start()

    @property
    def _pool(self) -> Client:  # (see _Submitter)
        return self

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._broken is not None:
            raise PoolError(f"the client is broken: {self._broken}")

    def _new_future(self) -> JobFuture:
        fut = RemoteFuture()
        fut._client = self
        return fut

    def _make_job(self, opts: JobOptions, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], label: str | None = None, key: Key | None = None) -> Job:
        fn = callable_of(fn)
        fn_bytes, flags = self._encoder.function(fn)
        args_bytes = self._encoder.arguments(fn, args, kwargs, in_band=True)[0]
        return Job(0, self._new_future(), opts.name or label or _label(fn), fn_bytes, flags, args_bytes, b"", opts, key)

    def _drop(self, jobs: list[Job]) -> None:
        self._keys.drop(jobs)

    def _prerequisites(self, given: Any) -> tuple[tuple[int, JobFuture | None], ...]:
        if isinstance(given, (JobFuture, int)) or not hasattr(given, "__iter__"):
            given = [given]
        out: list[tuple[int, JobFuture | None]] = []
        for dep in given:
            if isinstance(dep, RemoteFuture) and dep._client is self:
                out.append((0, dep))  # its id once accepted (read when the dependent job is sent)
            elif isinstance(dep, int) and not isinstance(dep, bool):
                out.append((dep, None))  # the service checks that it knows the job
            else:
                raise TypeError(f"option 'depends_on' takes this client's futures or job ids, not {type(dep).__name__}")
        return tuple(out)

    def _post(self, jobs: list[Job]) -> None:
        limit = self._max_frame - 4096
        for job in jobs:
            size = len(job.args) + len(job.fn) + 10 * (len(job.deps) + len(job.dep_futures))
            if size > limit:
                raise ValueError(f"job {job.label}: it takes {size} bytes to send, over the service's frame limit of {self._max_frame}")
            if job.dep_futures:  # their ids, once the service has accepted them (read here, not by the reader)
                job.deps, job.dep_futures = (*job.deps, *(f.job_id for f in job.dep_futures)), ()
            job.future._job = job  # type: ignore[attr-defined]
        if not self._connected.is_set():
            self._connected.wait(self._reconnect_s)
        self._check_open()
        self._queue([j.future for j in jobs])  # type: ignore[misc]

    def _ask(self, what: str, *args: Any) -> Any:
        if threading.current_thread() is self._reader:
            raise PoolError(f"{what}() cannot be called from a future's done-callback (it runs on the client's reader)")
        if self._broken is not None:
            raise PoolError(f"the client is broken: {self._broken}")
        if not self._connected.wait(self._reconnect_s):
            raise PoolError(f"not connected to the service at {self.address}")
        ref = next(self._refs)
        slot: list[Any] = [threading.Event(), None]
        self._asks[ref] = slot
        try:
            self._send(p.frame(_REQUESTS[what](ref, *args)))
        except OSError as e:
            self._asks.pop(ref, None)
            raise PoolError(f"lost the connection to the service at {self.address}: {e}") from None
        if not slot[0].wait(self._timeout + 60):
            self._asks.pop(ref, None)
            raise TimeoutError(f"the service at {self.address} did not answer {what}()")
        reply = slot[1]
        if type(reply) is p.Failure:
            raise _error(reply.kind, reply.message)
        if what == "resubmit":
            return self._follow(reply.value)
        return reply.value

    def _follow(self, job_id: int) -> RemoteFuture:
        """A future for a job the service made for us (a resubmitted dead letter)."""
        fut = self._new_future()
        assert isinstance(fut, RemoteFuture)
        fut._id = job_id
        self._pending[job_id] = fut
        self._send(p.frame(p.Watch(next(self._refs), [job_id])))
        return fut

    # -- the Executor --------------------------------------------------------------
    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
        chunksize: int | None = 1, key: Callable[..., Key] | None = None, progress: bool | None = None,
    ) -> Iterator[Any]:  # fmt: skip
        """``Pool.map`` through the service, with a progress bar (``progress``: default the client's)."""
        calls = [list(it) for it in iterables]
        results = super().map(fn, *calls, timeout=timeout, chunksize=chunksize, key=key)
        show = self._progress if progress is None else progress
        if show is None:
            show = "ipykernel" in sys.modules or sys.stderr.isatty()
        if not show:
            return results
        return _with_progress(results, min(map(len, calls)) if calls else 0, _label(fn))

    def stats(self) -> dict[str, Any]:
        """The service's counters: jobs by outcome, queue depth, workers, restarts."""
        return dict(self._ask("stats"))

    def logs(self, job: JobFuture | int, offset: int = 0, limit: int = 1 << 20) -> dict[str, Any]:
        """A job's captured stdout and stderr from ``offset``: ``{"data", "offset", "running"}``."""
        return dict(self._ask("logs", job.job_id if isinstance(job, JobFuture) else job, offset, limit))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop submitting; with ``cancel_futures``, cancel the jobs that have not started; with
        ``wait``, wait for the others' outcomes. Then disconnect. Jobs are never cancelled otherwise."""
        if self._closed and self._stopping.is_set():
            return
        self._closed = True
        with self._lock:
            unsent, self._outbox = self._outbox, []
            futures = self._held + [f for batch in self._unacked for f in batch]
        if cancel_futures:
            for fut in unsent:  # never sent: cancelled here
                fut._job = None
                fut.cancel_running()
        else:
            futures += unsent
            if unsent:
                self._queue(unsent)
        futures += list(self._pending.values()) + [f for fs in list(self._twins.values()) for f in fs]
        if cancel_futures and self._broken is None:
            for fut in futures:
                try:
                    if not fut.done() and fut.job_id:  # (waits for the service to have accepted it)
                        self._send(p.frame(p.Cancel(0, fut._id, False)))
                except (OSError, PoolError, TimeoutError):
                    break
        if wait and self._broken is None:
            wait_futures(futures)
        self.close()

    def close(self) -> None:
        """Disconnect now. The service keeps running this client's jobs; their futures here
        fail with ``PoolError`` (naming the job: another client can still ``show`` it)."""
        self._closed = True
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(5)
        if self._broken is None:
            self._give_up(PoolError(f"the client was closed before the job finished; it runs on in the service at {self.address}"))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<procsched.Client {self.address} {state}>"


def _bar_class() -> Any:
    """tqdm's notebook widget in a Jupyter kernel that has ipywidgets, else its text bar
    (tqdm.auto would warn in a notebook without ipywidgets); None without tqdm."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return None
    if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as widget

        return widget
    return tqdm


def _with_progress(results: Iterator[Any], total: int, label: str) -> Iterator[Any]:
    bar_class = _bar_class()
    if bar_class is None:  # no tqdm: no bar
        yield from results
        return
    with bar_class(total=total, desc=label, unit="job") as bar:
        for value in results:
            bar.update(1)
            yield value
