"""The service's front door: client sockets served by the supervisor's own loop.

``procsched serve`` (``service.py``) makes a :class:`Front` and hands it to
the pool's supervisor, whose loop then polls the listening sockets and every
client connection together with its workers' wakeups and deaths. So a
request is read, and a job admitted, by the thread that owns the job table:
no lock, no queue and no thread hand-off between a client's bytes and the
heap, and an outcome is written to its client in the turn it settles (one
``Outcomes`` frame per connection per turn, however many jobs finished).

Everything here runs on the loop thread, except ``start``/``call`` (which
post to the loop) and ``close`` (after the loop has ended). Sockets are
non-blocking: a connection reads what has arrived, answers each frame, and
keeps what it could not write yet in its buffer until the socket is
writable again (a client that stops reading for good is dropped once its
buffer passes ``_MAX_BUFFERED``; it can reconnect and ask again).

A client that disconnects leaves its jobs running; their outcomes wait in
``futures`` (bounded by ``keep_results``, oldest dropped first) and, with a
journal, in the journal, until a client ``Watch``es them. Payloads stay
opaque bytes: nothing here unpickles what a client sent.
"""

from __future__ import annotations

import errno
import hmac
import os
import select
import socket
import struct
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable

from . import protocol as p
from .errors import PoolError
from .futures import JobFuture
from .handlers import HANDLERS, check_spec, outcome, stored_outcome
from .jobs import Job, Later
from .log import get_logger

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = get_logger("procsched.server")

_UCRED = struct.Struct("3i")
_MAX_OUTCOME_BATCH = 16 << 20  # bytes of payload per Outcomes frame
_MAX_BUFFERED = 256 << 20  # a client holding this much unsent...
_STALL_LIMIT = 60.0  # ...that has read none of it for this long is dropped
_READS_PER_TURN = 8  # recv calls per connection per turn (fairness between clients)
_IN, _OUT = select.POLLIN | select.POLLPRI, select.POLLOUT


class Connection:
    """One client: its socket, its frame reader, what it still has to be sent."""

    def __init__(self, front: Front, sock: socket.socket, tcp: bool, peer: str) -> None:
        self.front = front
        self.sock = sock
        self.fd = sock.fileno()
        self.tcp = tcp
        self.peer = peer
        self.reader = p.FrameReader(front.max_frame)
        self.out = bytearray()
        self.stalled_at = 0.0  # since when the socket has taken none of ``out`` (0: it has been taking it)
        self.greeted = False
        self.closed = False
        self.fns: dict[int, bytes] = {}  # functions this client defined (Submit.fns)

    def send(self, msg: Any) -> None:
        if not self.closed:
            self.out += p.frame(msg)
            self.front.dirty.add(self)

    def fail(self, message: str, ref: int = 0, kind: str = "ProtocolError", close: bool = False) -> None:
        log.warning("client_refused" if close else "client_error", peer=self.peer, error=message)
        self.send(p.Failure(ref, kind, message))
        if close:
            self.flush()
            self.close()

    def readable(self) -> None:
        buf = self.front.inbuf
        for _ in range(_READS_PER_TURN):
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if not n:
                self.close()
                return
            data = self.front.inview[:n]
            try:
                bodies = self.reader.feed(data)
            except p.ProtocolError as e:  # the stream cannot be followed past this
                self.fail(str(e), close=True)
                return
            for body in bodies:
                if self.closed:
                    return
                try:
                    msg = p.decode_request(body)
                except p.ProtocolError as e:
                    self.fail(str(e), close=not self.greeted)
                    continue
                if self.greeted:
                    self.front.handle(self, msg)
                else:
                    self.hello(msg)
            if self.reader.error and not self.closed:
                self.fail(self.reader.error, close=True)
                return
            if n < len(buf):
                return  # drained

    def flush(self) -> None:
        """Write what the socket takes now; wait for POLLOUT for the rest."""
        if self.closed:
            return
        try:
            n = self.sock.send(self.out) if self.out else 0
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.close()
            return
        if n:
            del self.out[:n]
            self.stalled_at = 0.0
        elif self.out and not self.stalled_at:
            self.stalled_at = self.front.sup.now
        if self.stalled_at and len(self.out) > _MAX_BUFFERED and self.front.sup.now - self.stalled_at > _STALL_LIMIT:
            log.warning("client_not_reading", peer=self.peer, buffered=len(self.out))
            self.close()  # it can reconnect and Watch its jobs again
            return
        self.front.poller.modify(self.fd, _IN | _OUT if self.out else _IN)  # type: ignore[union-attr]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.front.conns.pop(self.fd, None)
        self.front.dirty.discard(self)
        try:
            self.front.poller.unregister(self.fd)  # type: ignore[union-attr]
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()

    def hello(self, msg: Any) -> None:
        if type(msg) is not p.Hello:
            self.fail(f"expected Hello first, got {type(msg).__name__}", close=True)
            return
        if msg.version != p.VERSION:
            self.fail(f"protocol version {msg.version} is not supported (this server speaks {p.VERSION})", close=True)
            return
        token = self.front.token
        if self.tcp and not (token and hmac.compare_digest(msg.token.encode(), token.encode())):
            self.fail("authentication failed: a wrong or missing token", kind="PermissionError", close=True)
            return
        self.greeted = True
        f = self.front
        self.send(p.Welcome(p.VERSION, f.epoch, f.version, f.max_frame, f.pool.max_workers))


class Front:
    def __init__(self, pool: Any, *, epoch: str, token: str = "", max_frame: int = p.MAX_FRAME,
                 allow_users: tuple[int, ...] = (), allow_groups: tuple[int, ...] = (),
                 log_dir: str = "", keep_results: int = 100_000) -> None:  # fmt: skip
        from . import __version__

        self.pool = pool
        self.sup: Supervisor = pool._sup
        self.epoch = epoch
        self.token = token
        self.max_frame = max_frame
        self.allow(allow_users, allow_groups)
        self.log_dir = log_dir
        self.keep_results = keep_results
        self.version = __version__
        self.poller: Any = None
        self.inbuf = bytearray(1 << 20)  # every connection reads into this (one thread reads)
        self.inview = memoryview(self.inbuf)
        self.listeners: dict[int, tuple[socket.socket, bool]] = {}
        self.conns: dict[int, Connection] = {}
        self.dirty: set[Connection] = set()
        #: jobs accepted over the socket (or recovered) whose outcome no client has yet received
        self.futures: dict[int, JobFuture] = {}
        #: outcomes already sent, kept a while for a client that reconnects and asks again
        self.sent: OrderedDict[int, JobFuture] = OrderedDict()
        self.watchers: dict[int, list[Connection]] = {}
        self.settled: deque[JobFuture] = deque()
        self.draining: bool = False
        self.mute: bool = False  # stopping with a journal: jobs failed by the stop are not reported
        for job_id, fut in pool.recovered.items():
            self.adopt(fut)
            self.futures[job_id] = fut

    # -- from the service's thread --------------------------------------------------
    def allow(self, users: tuple[int, ...], groups: tuple[int, ...]) -> None:
        """Who may connect over the Unix socket: the service's own user and group (those the
        socket file's 0660 mode lets in), root, and these (replaced whole: SIGHUP may narrow it)."""
        self.allow_users = frozenset((os.getuid(), 0, *users))
        self.allow_groups = frozenset((os.getgid(), *groups))

    def add_listener(self, sock: socket.socket) -> None:
        """A listening socket to serve (before ``start``)."""
        sock.setblocking(False)
        self.listeners[sock.fileno()] = (sock, sock.family != socket.AF_UNIX)

    def start(self) -> None:
        """Hand this front door to the supervisor's loop, which serves it from now on."""
        self.call(self.attach)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop and wait for it (nothing if the loop has ended); what it
        raises is raised here, not in the loop."""
        failed: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except Exception as e:
                failed.append(e)

        done = threading.Event()
        self.sup.post(("call", run, done))
        while not done.wait(0.5):
            if self.sup.ended:
                return
        if failed:
            raise failed[0]

    def stop_listening(self) -> None:
        """Accept no one new (a drain); connected clients stay."""
        self.call(self._close_listeners)

    def close(self) -> None:
        """After the loop has ended: close every socket."""
        self._close_listeners()
        for conn in list(self.conns.values()):
            conn.close()

    # -- the loop's side -----------------------------------------------------------
    def attach(self) -> None:
        self.poller = self.sup.backend.poller
        self.sup.front = self
        self.sup.lendable = False  # the sockets are in the loop thread's poll alone
        for fd in self.listeners:
            self.poller.register(fd, _IN)

    def _close_listeners(self) -> None:
        for fd, (sock, _) in list(self.listeners.items()):
            if self.poller is not None:
                try:
                    self.poller.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            sock.close()
        self.listeners.clear()

    def collect(self, ready: list[tuple[int, int]]) -> None:
        """Serve the sockets the loop's poll found ready (called once per turn)."""
        for fd, ev in ready:
            conn = self.conns.get(fd)
            if conn is not None:
                if ev & _OUT:
                    conn.flush()
                if ev & ~_OUT:  # data, hang-up or error: a read tells which
                    conn.readable()
            elif fd in self.listeners:
                self._accept(*self.listeners[fd])

    def _accept(self, listener: socket.socket, tcp: bool) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept_failed", error=str(e))
                return
            sock.setblocking(False)
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, tcp, str(addr) if tcp else "unix")
            self.conns[conn.fd] = conn
            self.poller.register(conn.fd, _IN)
            if not tcp:
                refusal = self.check_peer(sock)
                if refusal:
                    conn.fail(refusal, kind="PermissionError", close=True)

    def check_peer(self, sock: socket.socket) -> str:
        """Why a Unix-socket peer is refused ("" if it is allowed)."""
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid in self.allow_users or _in_groups(uid, gid, self.allow_groups):
            return ""
        return f"user {uid} (pid {pid}) is not allowed to use this service"

    def flush(self) -> None:
        """End of a turn: outcomes settled this turn go out, and every buffer is written."""
        if self.settled:
            batch = list(self.settled)
            self.settled.clear()
            if not self.mute:
                self._deliver(batch)
        while self.dirty:
            self.dirty.pop().flush()

    # -- requests --------------------------------------------------------------
    def handle(self, conn: Connection, msg: Any) -> None:
        t = type(msg)
        if t is p.Submit:
            if msg.fns:
                if len(conn.fns) + len(msg.fns) > p.MAX_FNS:
                    self.answer_submit(conn, p.Rejected("ValueError", f"a connection may define at most {p.MAX_FNS} functions"))
                    return
                conn.fns.update(msg.fns)
            self.submit(conn, msg.jobs)
        elif t is p.Watch:
            self.watch(conn, msg)
        elif t is p.Hello:
            conn.fail("Hello sent twice")
        else:
            handler = HANDLERS.get(t)
            if handler is None:
                conn.fail(f"{t.__name__} is not a request", getattr(msg, "ref", 0))
                return
            try:
                value = handler(self, msg)
                if type(value) is Later:  # known when a run ends (a cancel its worker may have begun)
                    value.then(lambda v, ref=msg.ref: conn.send(p.Answer(ref, v)))
                    return
                reply: Any = p.Answer(msg.ref, value)
            except Exception as e:
                known = isinstance(e, (KeyError, ValueError, TypeError, PermissionError, FileNotFoundError))
                text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                reply = p.Failure(msg.ref, type(e).__name__ if known else "PoolError", text)
            conn.send(reply)

    def adopt(self, fut: JobFuture) -> None:
        """Owe ``fut``'s outcome to the clients watching it."""
        fut._on_settle = self.settled.append

    def answer_submit(self, conn: Connection, reply: Any) -> None:
        """A Submit's answer, in Submit order: under ``fsync="always"`` an Accepted waits for
        its records to be durable, so every answer waits its turn behind the ones before."""
        if self.sup._hold is not None:
            self.sup._hold(("ack", _Later(conn, reply)))
        else:
            conn.send(reply)

    def submit(self, conn: Connection, specs: list[p.JobSpec]) -> None:
        if self.draining or self.pool._closed:  # the client holds these for the next service
            self.answer_submit(conn, p.Rejected(p.UNAVAILABLE, "the service is stopping and accepts no new jobs"))
            return
        jobs, futures, errors = self.build(specs, conn.fns)
        ids = [0 if f is None else f.job_id for f in futures]
        for f in futures:
            if f is not None:
                self.futures[f.job_id] = f
                self._watch(f.job_id, conn)
        sup = self.sup
        now = sup.now  # the turn's clock, as every other job's wait is measured from
        for job in jobs:
            sup._admit(job, now)
        self.answer_submit(conn, p.Accepted(ids, errors))
        for f in futures:
            if f is not None and f.done() and f not in self.settled:  # a key that had finished: its result now
                self.settled.append(f)

    def build(self, specs: list[p.JobSpec], fns: dict[int, bytes]) -> tuple[list[Job], list[JobFuture | None], dict[int, list[str]]]:
        """Jobs from a client's specs (which are separate submits: each is checked, and refused, alone);
        a future per spec (None for a refused one), and why each refused one was."""
        pool = self.pool
        jobs: list[Job] = []
        futures: list[JobFuture | None] = []
        errors: dict[int, list[str]] = {}
        for i, s in enumerate(specs):
            try:
                fn = check_spec(s, pool, fns)
            except (TypeError, ValueError) as e:
                errors[i] = [type(e).__name__, str(e)]
                futures.append(None)
                continue
            if s.key is not None:
                known = pool._keys.get(s.key)
                if known is not None:
                    self.adopt(known)
                    futures.append(known)
                    continue
            fut = JobFuture()
            fut._on_settle = self.settled.append
            fut.job_id = next(pool._ids)
            job = Job(fut.job_id, fut, s.label, fn, s.flags, s.args, b"", s.options, s.key)
            job.not_before = s.not_before
            if s.deps:
                job.deps, job.dep_policy = tuple(s.deps), s.dep_policy
            if s.key is not None:
                winner = pool._keys.claim(job)
                if winner is not fut:
                    self.adopt(winner)
                    futures.append(winner)
                    continue
            jobs.append(job)
            futures.append(fut)
        return jobs, futures, errors

    def watch(self, conn: Connection, msg: p.Watch) -> None:
        """A reconnected client's jobs: push the outcomes of finished ones, subscribe to the rest;
        answer with the ids this service does not know."""
        unknown: list[int] = []
        found: list[p.Outcome] = []
        ready: list[JobFuture] = []
        for job_id in msg.jobs:
            fut = self.futures.get(job_id) or self.sent.get(job_id)
            if fut is not None:
                self._watch(job_id, conn)
                if fut.done():
                    ready.append(fut)
                continue
            stored = self.sup._stored(job_id)  # finished before this process started
            if stored is None:
                unknown.append(job_id)
            else:
                found.append(stored_outcome(job_id, *stored))
        conn.send(p.Answer(msg.ref, unknown))
        if found:
            conn.send(p.Outcomes(found))
        self._deliver(ready)

    # -- outcomes ----------------------------------------------------------------
    def _watch(self, job_id: int, conn: Connection) -> None:
        conns = self.watchers.get(job_id)
        if conns is None:
            self.watchers[job_id] = [conn]
        elif conn not in conns:
            conns.append(conn)

    def _deliver(self, futures: list[JobFuture]) -> None:
        by_conn: dict[Connection, list[p.Outcome]] = {}
        sizes: dict[Connection, int] = {}
        for fut in futures:
            job_id = fut.job_id
            conns = [c for c in self.watchers.get(job_id, ()) if not c.closed]
            if not conns:
                continue  # nobody listening: it waits in self.futures for a Watch
            self.watchers.pop(job_id, None)
            out = outcome(fut)
            for c in conns:
                items = by_conn.setdefault(c, [])
                items.append(out)
                sizes[c] = sizes.get(c, 0) + len(out.payload) + sum(map(len, out.buffers))
                if sizes[c] > _MAX_OUTCOME_BATCH:
                    c.send(p.Outcomes(items))
                    by_conn[c], sizes[c] = [], 0
            if self.futures.pop(job_id, None) is not None:
                self.sent[job_id] = fut
        for c, items in by_conn.items():
            if items:
                c.send(p.Outcomes(items))
        self._trim()

    def _trim(self) -> None:
        """Keep at most ``keep_results`` outcomes for clients that may come back."""
        keep = self.keep_results
        sent = self.sent
        while len(sent) > keep:
            sent.popitem(last=False)
        if len(self.futures) > 2 * keep:  # undelivered: drop the oldest finished ones
            extra = len(self.futures) - 2 * keep
            for job_id in [j for j, f in self.futures.items() if f.done()][:extra]:
                del self.futures[job_id]
                self.watchers.pop(job_id, None)


class _Later:
    """A reply the loop sends once the turn's records are durable (``fsync="always"``)."""

    __slots__ = ("conn", "reply")

    def __init__(self, conn: Connection, reply: Any) -> None:
        self.conn, self.reply = conn, reply

    def set(self) -> None:
        self.conn.send(self.reply)


def _in_groups(uid: int, gid: int, allowed: frozenset[int]) -> bool:
    if gid in allowed:
        return True
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return any(g in allowed for g in os.getgrouplist(name, gid))


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0660; a stale socket file is replaced,
    a live one (another server) is an error."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left over from a crash
        else:
            raise PoolError(f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # never a moment with looser permissions
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(256)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=256)
    return sock
