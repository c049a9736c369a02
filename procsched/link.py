"""The client's connection to the service: pipelined submits, answers, pushes, reconnects.

``Link`` is a part of :class:`~procsched.client.Client` kept in a module of
its own (a mixin: the same object), as ``requests.py`` is of the
supervisor. One thread reads the socket (``procsched-client``); callers
write to it under ``_sending``, which keeps whole frames, and the order of
the Submits awaiting their answer (``_unacked``), in wire order.

Submits are pipelined: ``submit()`` queues the job in the outbox and it is
sent at once while fewer than ``_IN_FLIGHT`` Submit frames await their
answer, else with the next answer, together with whatever was submitted
meanwhile. The service answers each Submit frame, in order, with the jobs'
ids (``Accepted``; a job refused alone carries its reason), and pushes
outcomes (``Outcomes``) as jobs finish.

When the connection drops (the service restarted, a network blip), the
reader dials again with backoff for up to ``reconnect`` seconds, then:

* if the service has the same ``epoch`` (the same journal), it asks for
  the outcomes of its unfinished jobs (``Watch``): ones that finished
  meanwhile arrive at once, the rest when they finish;
* jobs the service does not know (another journal, none, or a submit the
  journal had not yet made durable) are submitted again from the job kept
  with each future, and so are Submits never answered and those a stopping
  service refused. Execution is at-least-once, as after any crash; a job
  submitted again gets a new id. A job whose prerequisites a journal-less
  restart forgot fails instead (their ids mean nothing there).
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .errors import PoolError
from .futures import Encoded, EncodedError, JobFuture
from .jobs import Job
from .log import get_logger

if TYPE_CHECKING:
    from .client import Client

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


class Link:
    """The connection half of a Client (see the module doc)."""

    # the Client's, declared for the type checker
    address: str
    _family: str
    _sockaddr: Any
    _token: str
    _timeout: float
    _reconnect_s: float
    _sending: threading.Lock
    _lock: threading.Lock
    _ids_known: threading.Condition
    _unacked: deque[list[RemoteFuture]]
    _outbox: list[RemoteFuture]
    _held: list[RemoteFuture]
    _outbox_bytes: int
    _pending: dict[int, RemoteFuture]
    _twins: dict[int, list[RemoteFuture]]
    _early: dict[int, p.Outcome]
    _asks: dict[int, Any]
    _fns: dict[bytes, int]
    _broken: BaseException | None
    _stopping: threading.Event
    _connected: threading.Event
    _sock: socket.socket
    _reader: threading.Thread
    _max_workers: int
    _max_frame: int
    _epoch: str
    _frames: p.FrameReader
    _refs: Any  # itertools.count

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
                replies = [p.reply_decoder.decode(body) for body in self._frames.feed(data)]
            except Exception as e:  # a broken stream: start over on a new connection
                _warn(f"dropping the connection to {self.address}: {e!r}")
                self._sock.close()
                continue
            for reply in replies:
                try:
                    self._on_reply(reply)
                except Exception as e:  # one reply we could not apply: the stream is fine
                    log.exception("client_reply_failed", reply=type(reply).__name__, error=repr(e))

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


def _settle(fut: RemoteFuture, o: p.Outcome) -> None:
    fut._job = None
    if fut.done():  # settled here already (closed, given up): a late outcome changes nothing
        return
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
