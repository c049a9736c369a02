"""Client: a running service's front door, a ``concurrent.futures.Executor``.

``procsched.connect()`` returns a :class:`Client` with the surface of
``Pool`` (``submit``, ``map``, ``options``, ``then``, ``cron``, ``cancel``,
``jobs``, ``stats`` ...), shared with it through ``submit.py`` and
``controls.py``. A call is pickled here (cloudpickle: functions and
classes defined in a notebook cell travel by value) and sent to the
service; the future resolves when the service pushes the outcome.

One thread reads the socket (``procsched-client``); callers write to it
under ``_sending``. Submits are pipelined: ``submit()`` returns once its frame
is written, and the service answers each Submit frame, in order, with the
jobs' ids (``Accepted``). A future's ``job_id`` waits for that answer.

When the connection drops (the service restarted, a network blip), the
reader reconnects with backoff for up to ``reconnect`` seconds, then:

* if the service has the same ``epoch`` (the same journal), it asks for
  the outcomes of its unfinished jobs (``Watch``): ones that finished
  meanwhile arrive at once, the rest when they finish;
* jobs the service does not know (another journal, none, or a submit the
  journal had not yet made durable) are submitted again from the bytes
  kept for them, and so are Submits never acknowledged. Execution is
  at-least-once, as after any crash; a job submitted again gets a new id.

Closing a client, or losing it, never cancels its jobs: they run on, and
their outcomes wait in the service for a client that asks.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from concurrent.futures import wait as wait_futures
from typing import Any

from . import protocol as p
from .codec import CallEncoder, callable_of
from .controls import Controls
from .errors import PoolError
from .futures import Encoded, EncodedError, JobFuture
from .jobs import Job
from .log import get_logger
from .model import DEFAULT_OPTIONS, JobOptions, Key
from .submit import KeyedFutures, _label, _Submitter

log = get_logger("procsched.client")

#: Submit frames sent before waiting for an answer; jobs submitted meanwhile go in one frame
_IN_FLIGHT = 2
_OUTBOX_BYTES = 8 << 20
#: functions a connection keeps by number (past that, a job carries its function's bytes)
_FN_CACHE = 1024
_ERRORS: dict[str, type[Exception]] = {
    "KeyError": KeyError, "ValueError": ValueError, "TypeError": TypeError,
    "PermissionError": PermissionError, "FileNotFoundError": FileNotFoundError,
}  # fmt: skip
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


class RemoteFuture(JobFuture):
    """A job's future on the client's side; ``job_id`` is known once the service accepts it."""

    _client: Client
    _id = 0
    _job: Job | None = None  # kept until settled: the job is sent again if the service lost it

    @property
    def job_id(self) -> int:
        """The service's id for the job: waits for the service to accept it (0: not submitted yet)."""
        if self._id == 0 and self._job is not None:
            self._client._await_id(self)
        return self._id

    @job_id.setter
    def job_id(self, value: int) -> None:
        self._id = value

    def cancel(self) -> bool:
        """Cancel the job in the service if it has not started (as ``Future.cancel``)."""
        if self.done():
            return self.cancelled()
        client = self._client
        if threading.current_thread() is client._reader or client._broken is not None:
            return False
        if not client._ask("cancel", self.job_id, False):
            return False
        self.cancel_running()  # (the service's CANCELLED outcome may have done it already: idempotent)
        return True

    def __repr__(self) -> str:
        return f"<RemoteFuture job={self._id or '?'} state={self._state.lower()}>"


class Client(_Submitter, Controls, Executor):
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
        self._pool = self
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

    # -- the connection -----------------------------------------------------------
    def _dial(self) -> tuple[socket.socket, p.Welcome]:
        if self._family == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.create_connection(self._sockaddr, timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.settimeout(self._timeout)
            if self._family == "unix":
                sock.connect(self._sockaddr)
            try:
                sock.sendall(p.frame(p.Hello(p.VERSION, self._token, f"pid {os.getpid()}")))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at once: the reason is waiting to be read
            reader = p.FrameReader(p.MAX_FRAME)
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"{self.address}: the service closed the connection during the handshake")
                bodies = reader.feed(data)
                if bodies:
                    break
            msg = p.reply_decoder.decode(bodies[0])
            if type(msg) is p.Failure:
                raise _error(msg.kind, f"{self.address}: {msg.message}")
            if type(msg) is not p.Welcome:
                raise p.ProtocolError(f"{self.address}: expected Welcome, got {type(msg).__name__}")
            sock.settimeout(None)
            self._frames = reader
            return sock, msg
        except BaseException:
            sock.close()
            raise

    def _welcome(self, w: p.Welcome) -> None:
        self._epoch = w.epoch
        self._max_workers = w.max_workers
        self._max_frame = w.max_frame
        self._frames.limit = max(w.max_frame, 1 << 30)  # results may be larger than what the server accepts
        self._fns = {}

    def _read_loop(self) -> None:
        try:
            self._read()
        except BaseException as e:  # a bug of ours: the futures must not wait forever
            log.exception("client_reader_failed", error=repr(e))
            self._give_up(PoolError(f"the client's reader failed: {e!r}"))

    def _read(self) -> None:
        buf = bytearray(1 << 20)  # reused: no allocation per read
        view = memoryview(buf)
        while True:
            try:
                n = self._sock.recv_into(buf)
            except OSError:
                n = 0
            data = view[:n]
            if not n:
                if self._stopping.is_set() or not self._reconnect():
                    return
                continue
            try:
                bodies = self._frames.feed(data)
                for body in bodies:
                    self._on_reply(p.reply_decoder.decode(body))
            except Exception as e:  # a broken stream: start over on a new connection
                _warn(f"dropping the connection to {self.address}: {e!r}")
                self._sock.close()

    def _on_reply(self, msg: Any) -> None:
        t = type(msg)
        if t is p.Outcomes:
            pending, twins = self._pending, self._twins
            for o in msg.items:
                fut = pending.pop(o.job, None)
                if fut is None:
                    self._early[o.job] = o
                    continue
                _settle(fut, o)
                for twin in twins.pop(o.job, ()) if twins else ():
                    _settle(twin, o)
        elif t is p.Accepted:
            refused = msg.errors
            with self._lock:
                futures = self._unacked.popleft()
                for i, (fut, job_id) in enumerate(zip(futures, msg.jobs)):
                    if i in refused:
                        continue
                    fut._id = job_id
                    if job_id in self._pending:
                        self._twins.setdefault(job_id, []).append(fut)
                    else:
                        self._pending[job_id] = fut
                self._ids_known.notify_all()
            for i, (kind, message) in refused.items():
                _fail(futures[i], _error(kind, message))
            if self._outbox:
                self._flush_outbox()
            early = self._early
            if early:
                for job_id in msg.jobs:
                    o = early.pop(job_id, None)
                    if o is not None:
                        self._on_reply(p.Outcomes([o]))
        elif t is p.Rejected:
            with self._lock:
                futures = self._unacked.popleft()
                if msg.kind == p.UNAVAILABLE:  # the service is stopping: these go to the next one
                    self._held += futures
                self._ids_known.notify_all()
            if msg.kind != p.UNAVAILABLE:
                err = _error(msg.kind, msg.message)
                for fut in futures:
                    _fail(fut, err)
            if self._outbox:
                self._flush_outbox()
        elif t is p.Answer or t is p.Failure:
            slot = self._asks.pop(msg.ref, None)
            if callable(slot):
                slot(msg)
            elif slot is not None:
                slot[1] = msg
                slot[0].set()
            elif t is p.Failure and msg.ref == 0:
                _warn(f"the service at {self.address} reports: {msg.message}")

    def _reconnect(self) -> bool:
        """The connection dropped: dial again until ``reconnect`` runs out, then pick up the jobs."""
        self._connected.clear()
        self._sock.close()
        for slot in list(self._asks.values()):  # requests in flight: their answers are lost
            if not callable(slot):
                slot[1] = p.Failure(0, "ConnectionError", f"lost the connection to {self.address}; the request may or may not have been done")
                slot[0].set()
        self._asks.clear()
        deadline = time.monotonic() + self._reconnect_s
        delay = 0.05
        while not self._stopping.is_set():
            try:
                sock, welcome = self._dial()
                break
            except Exception as e:  # not there yet, or refusing us (a restarting service): try again
                if time.monotonic() >= deadline:
                    self._give_up(PoolError(f"lost the connection to the service at {self.address} and could not reconnect: {e}"))
                    return False
                self._stopping.wait(delay)
                delay = min(delay * 2, 1.0)
        else:
            return False
        if self._stopping.is_set():  # closed while we dialled
            sock.close()
            return False
        with self._sending, self._lock:  # (no frame is half on the old socket and half on the new)
            same = welcome.epoch == self._epoch
            self._sock = sock
            self._welcome(welcome)
            unsent = self._held + [fut for batch in self._unacked for fut in batch] + self._outbox
            self._unacked.clear()
            self._held, self._outbox, self._outbox_bytes = [], [], 0
            if not same:  # a service that never knew our jobs: send them all again
                unsent = [*self._take_pending(), *unsent]
                for fut in unsent:
                    if fut._job is not None and fut._job.deps:  # their prerequisites' ids mean nothing there
                        _fail(fut, PoolError(f"job {fut._id or '?'} depends on jobs of a service that restarted without its journal; submit the chain again"))
        if same and self._pending:
            ref = next(self._refs)
            self._asks[ref] = self._rewatched
            self._send(p.frame(p.Watch(ref, list(self._pending))))
        self._resend(unsent)
        self._connected.set()
        return True

    def _take_pending(self) -> list[RemoteFuture]:
        futures = [f for f in self._pending.values()] + [f for fs in self._twins.values() for f in fs]
        self._pending.clear()
        self._twins.clear()
        return futures

    def _rewatched(self, msg: Any) -> None:
        """The service's answer to Watch: these job ids it does not know; submit them again."""
        if type(msg) is not p.Answer:
            return
        lost = []
        for job_id in msg.value:
            fut = self._pending.pop(job_id, None)
            if fut is not None:
                lost.append(fut)
            lost.extend(self._twins.pop(job_id, ()))
        self._resend(lost)

    def _resend(self, futures: list[RemoteFuture]) -> None:
        for fut in futures:
            if fut._job is None:  # made by the service (a resubmitted dead letter): no bytes to send again
                _fail(fut, PoolError(f"the service lost job {fut._id} (it restarted without its journal)"))
        futures = [f for f in futures if not f.done()]
        if futures:
            self._queue(futures)

    def _give_up(self, error: BaseException) -> None:
        self._broken = error
        with self._lock:
            futures = self._held + [f for batch in self._unacked for f in batch] + self._outbox
            self._unacked.clear()
            self._held, self._outbox = [], []
            futures += self._take_pending()
            self._ids_known.notify_all()
        for fut in futures:
            _fail(fut, error)
        self._connected.set()  # wake senders: they see _broken

    def _send(self, data: bytes) -> None:
        with self._sending:
            self._sock.sendall(data)

    # -- what the shared methods need (submit.Front) ----------------------------------
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

    def _queue(self, futures: list[RemoteFuture]) -> None:
        """Jobs to send: at once while fewer than ``_IN_FLIGHT`` Submits await their answer,
        else with the next answer, together (a burst of submits becomes a few large frames)."""
        size = 0
        for fut in futures:
            size += len(fut._job.args)  # type: ignore[union-attr]
        with self._lock:
            self._outbox += futures
            self._outbox_bytes += size
            now = len(self._unacked) < _IN_FLIGHT or self._outbox_bytes > _OUTBOX_BYTES
        if now:
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        """Send what waits in the outbox as Submit frames, each under the frame limit.

        Under ``_sending`` (the socket's writing side) from taking the outbox to the
        last write: the order of ``_unacked`` is the order of the frames on the wire.
        """
        with self._sending:
            with self._lock:
                futures, self._outbox, self._outbox_bytes = self._outbox, [], 0
            futures = [f for f in futures if not f.done()]
            if not futures:
                return
            limit = self._max_frame - 4096
            fns = self._fns
            start, size = 0, 0
            defs: dict[int, bytes] = {}
            wire: list[p.JobSpec] = []
            out: list[tuple[list[RemoteFuture], bytes]] = []
            for i, fut in enumerate(futures):
                job = fut._job
                assert job is not None
                fn: bytes | int = job.fn
                ref = fns.get(job.fn)
                if ref is None and len(fns) < _FN_CACHE and len(job.fn) > 64:
                    ref = fns[job.fn] = len(fns) + 1
                    defs[ref] = job.fn
                    size += len(job.fn)
                if ref is not None:
                    fn = ref
                cost = len(job.args) + len(job.label) + (0 if ref else len(job.fn)) + 10 * len(job.deps) + len(str(job.key)) + 512
                if wire and size + cost > limit:
                    out.append((futures[start:i], p.frame(p.Submit(wire, defs))))
                    start, size, defs, wire = i, 0, {}, []
                wire.append(p.JobSpec(fn, job.flags, job.args, job.label, job.opts, job.key, job.not_before, list(job.deps), job.dep_policy))
                size += cost
            out.append((futures[start:], p.frame(p.Submit(wire, defs))))
            with self._lock:
                self._unacked.extend(batch for batch, _ in out)
            try:
                for _, data in out:
                    self._sock.sendall(data)
            except OSError:
                pass  # the connection dropped: what was not answered is sent again on reconnecting

    def _await_id(self, fut: RemoteFuture) -> None:
        if threading.current_thread() is self._reader:  # (only the reader could read the answer)
            raise PoolError("a job's id cannot be read in a done-callback before the service has accepted the job")
        end = time.monotonic() + self._timeout + self._reconnect_s
        with self._lock:
            while fut._id == 0 and not fut.done():
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the service has not acknowledged the job")
                self._ids_known.wait(left)
        if fut._id == 0:
            raise PoolError(f"the job was never accepted: {fut.exception()!r}")

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


def _settle(fut: RemoteFuture, o: p.Outcome) -> None:
    fut._job = None
    if o.status == p.CANCELLED:
        fut.cancel_running()  # (not cancel(): the service has cancelled it already)
        return
    if not fut.set_running_or_notify_cancel():
        return
    if o.status == p.OK:
        fut.set_result(Encoded(o.payload, [memoryview(b) for b in o.buffers]))
    elif o.status == p.RAISED:
        fut.set_exception(EncodedError(o.payload))
    else:
        try:
            err = pickle.loads(o.payload)  # one of procsched's errors, pickled by the service
        except Exception as e:
            err = PoolError(f"the job failed, and its error could not be read: {e!r}")
        fut.set_exception(err)


def _fail(fut: RemoteFuture, error: BaseException) -> None:
    fut._job = None
    if not fut.done() and fut.set_running_or_notify_cancel():
        fut.set_exception(error)


def _error(kind: str, message: str) -> Exception:
    if kind == "ConnectionError":
        return ConnectionError(message)
    cls = _ERRORS.get(kind)
    return cls(message) if cls is not None else PoolError(message)


def _warn(text: str) -> None:
    log.warning("client_warning", detail=text)


def _with_progress(results: Iterator[Any], total: int, label: str) -> Iterator[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no tqdm: no bar
        yield from results
        return
    with tqdm(total=total, desc=label, unit="job") as bar:
        for value in results:
            bar.update(1)
            yield value
