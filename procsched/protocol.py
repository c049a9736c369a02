"""The wire protocol between ``procsched serve`` and its clients.

A connection is a stream of frames, each ``length (4 bytes, big-endian) |
msgpack body``, over a Unix socket (the default) or TCP. Every body is one
typed msgspec Struct, encoded as an array whose first item is its tag, so a
frame decodes straight into the right class or fails with a message that
says what was wrong. Every frame has a size limit, checked on the length
prefix before a byte of the body is buffered.

A conversation::

    client                               server
    Hello(version, token)        ──▶
                                 ◀──     Welcome(version, epoch, ...)   (or Failure, then close)
    Submit([JobSpec, ...])       ──▶     (one frame may carry many jobs)
                                 ◀──     Accepted([job id, ...])        (one per Submit, in order)
    Cancel(ref, ...), Show(ref, ...) ──▶ (one Struct per control request)
                                 ◀──     Answer(ref, value) or Failure(ref, kind, message)
                                 ◀──     Outcomes([Outcome, ...])       (pushed as jobs finish)
    Watch([job id, ...])         ──▶     (after a reconnect: push these jobs' outcomes)
                                 ◀──     Answer(ref, [unknown ids])

Payloads (a job's function and arguments, a result, a job's exception)
are opaque bytes here: the server passes them between clients and workers
and never unpickles them. Only ``Outcome.status == ERROR`` carries bytes
the server made itself (a pickled procsched error: a crash, a timeout).

``epoch`` names the server's job-id space: it is kept in the journal's
directory, so a restarted service with the same journal has the same
epoch and a client may ``Watch`` its job ids again; a different epoch (no
journal) means those ids mean nothing there and the client resubmits.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Union

import msgspec

from .journal.records import ScheduleSet
from .model import JobOptions, Key

VERSION = 1
#: the largest frame either side accepts by default (``[service] max_frame``)
MAX_FRAME = 64 << 20
HEADER = struct.Struct(">I")

# Outcome.status
OK, RAISED, ERROR, CANCELLED = 0, 1, 2, 3


class _Msg(msgspec.Struct, array_like=True, tag=True, omit_defaults=False):
    pass


# -- handshake -----------------------------------------------------------------
class Hello(_Msg, tag=1):
    version: int
    token: str = ""
    client: str = ""


class Welcome(_Msg, tag=2):
    version: int
    epoch: str
    server: str
    max_frame: int
    max_workers: int


# -- requests (client to server) -------------------------------------------------
class JobSpec(msgspec.Struct, array_like=True):
    """One job as a client made it: ``submit()``'s pickled call and its options."""

    #: the pickled function, or the number of one this connection defined in a Submit's ``fns``
    fn: Union[bytes, int]
    flags: int
    args: bytes
    label: str
    options: JobOptions
    key: Union[Key, None] = None
    #: wall-clock time before which it must not start (0: at once)
    not_before: float = 0.0
    deps: list[int] = []
    dep_policy: str = "cancel"


class Submit(_Msg, tag=10):
    jobs: list[JobSpec]
    #: functions the jobs (of this Submit and later ones on the connection) name by number:
    #: a function sent once, not with each of a batch's jobs
    fns: dict[int, bytes] = {}


class Watch(_Msg, tag=11):
    ref: int
    jobs: list[int]


class Cancel(_Msg, tag=12):
    ref: int
    job: int
    kill: bool = False


class Reprioritize(_Msg, tag=13):
    ref: int
    job: int
    priority: int


class ListJobs(_Msg, tag=14):
    ref: int
    state: Union[str, None] = None
    tag: Union[str, None] = None
    name: Union[str, None] = None


class Show(_Msg, tag=15):
    ref: int
    job: int


class GetStats(_Msg, tag=16):
    ref: int


class Status(_Msg, tag=17):
    """What ``procsched status`` shows: workers, queue depth per lane, throughput, degraded."""

    ref: int


class Logs(_Msg, tag=18):
    """Up to ``limit`` bytes of a job's captured output, from ``offset``."""

    ref: int
    job: int
    offset: int = 0
    limit: int = 1 << 20


class DeadLetters(_Msg, tag=19):
    ref: int


class Resubmit(_Msg, tag=30):
    ref: int
    job: int
    options: dict[str, Any] = {}


class Purge(_Msg, tag=31):
    ref: int
    job: Union[int, None] = None


class Schedules(_Msg, tag=32):
    ref: int


class Unschedule(_Msg, tag=33):
    ref: int
    name: str


class Pause(_Msg, tag=34):
    ref: int
    name: str
    paused: bool


class Trigger(_Msg, tag=35):
    ref: int
    name: str


class Compact(_Msg, tag=36):
    ref: int


class Schedule(_Msg, tag=37):
    """``cron()``/``every()`` from a client: the journal's own record of a schedule."""

    ref: int
    spec: ScheduleSet
    replace: bool = False


Request = Union[
    Hello, Submit, Watch, Cancel, Reprioritize, ListJobs, Show, GetStats, Status, Logs,
    DeadLetters, Resubmit, Purge, Schedules, Unschedule, Pause, Trigger, Compact, Schedule,
]  # fmt: skip


# -- replies (server to client) ----------------------------------------------------
class Accepted(_Msg, tag=20):
    """A Submit's answer: each job's id, in order; a job refused alone has id 0 and its
    reason in ``errors`` (by position: [exception type name, message])."""

    jobs: list[int]
    errors: dict[int, list[str]] = {}


#: ``Rejected.kind`` of a service that is stopping: the client keeps the jobs for the next one
UNAVAILABLE = "Unavailable"


class Rejected(_Msg, tag=21):
    """A whole Submit refused (nothing of it was accepted)."""

    kind: str
    message: str


class Answer(_Msg, tag=22):
    ref: int
    value: Any


class Failure(_Msg, tag=23):
    """A request failed (``ref`` 0: the connection's own error, e.g. a bad frame)."""

    ref: int
    kind: str  # an exception type name the client raises: ValueError, KeyError, PoolError ...
    message: str


class Outcome(msgspec.Struct, array_like=True):
    job: int
    status: int  # OK, RAISED, ERROR, CANCELLED
    payload: bytes = b""
    buffers: list[bytearray] = []


class Outcomes(_Msg, tag=24):
    items: list[Outcome]


Reply = Union[Welcome, Accepted, Rejected, Answer, Failure, Outcomes]


class ProtocolError(Exception):
    """A frame that breaks the protocol: too large, not decodable, out of place."""


_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def frame(msg: Any) -> bytes:
    """``msg`` as one frame: length prefix and body."""
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frame bodies, refusing any longer than ``limit``.

    A length over the limit ends the stream: the frames before it are
    returned, then the next ``feed`` (or ``check``) raises :class:`ProtocolError`.
    """

    __slots__ = ("buf", "limit", "error")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.error = ""

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The frames ``data`` completes (each body copied once: ``data`` may be a reused buffer)."""
        self.check()
        buf = self.buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data  # the common case: parse in place, keep only an incomplete tail
        out: list[bytes] = []
        pos, end = 0, len(src)
        with memoryview(src) as view:
            while end - pos >= 4:
                (n,) = HEADER.unpack_from(view, pos)
                if n > self.limit:
                    self.error = f"frame of {n} bytes is over the limit of {self.limit}"
                    break
                if end - pos - 4 < n:
                    break
                out.append(bytes(view[pos + 4 : pos + 4 + n]))
                pos += 4 + n
            if src is not buf and pos < end and not self.error:
                buf += view[pos:]
        if src is buf and pos:
            del buf[:pos]
        if self.error and not out:
            self.check()
        return out

    def check(self) -> None:
        if self.error:
            raise ProtocolError(self.error)


def decode_request(body: bytes) -> Any:
    try:
        return request_decoder.decode(body)
    except msgspec.MsgspecError as e:
        raise ProtocolError(f"malformed request: {e}") from None


#: how many functions one connection may define (``Submit.fns``)
MAX_FNS = 4096


def runtime_dir() -> str:
    """Where the service puts its socket: systemd's RuntimeDirectory, the user's
    runtime directory, or a directory of this user's under /tmp."""
    given = os.environ.get("RUNTIME_DIRECTORY")
    if given:
        return given.split(":")[0]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "procsched")
    return f"/tmp/procsched-{os.getuid()}"


def untrusted(directory: str) -> str:
    """Why another user could swap a socket in ``directory`` for their own ("" if none can):
    it must belong to us or to root, and be writable by no one else unless sticky (as /tmp)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return ""
    if st.st_uid not in (os.getuid(), 0):
        return f"{directory} belongs to user {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & 0o1000:
        return f"{directory} is writable by other users (mode {st.st_mode & 0o7777:o})"
    return ""


def default_address() -> str:
    """``$PROCSCHED_ADDRESS``, else the first socket that exists of this user's
    runtime directory's and the system service's (``/run/procsched``), skipping
    a directory another user could have planted a socket in."""
    given = os.environ.get("PROCSCHED_ADDRESS")
    if given:
        return given
    candidates = [os.path.join(runtime_dir(), "procsched.sock"), "/run/procsched/procsched.sock"]
    for path in candidates:
        if os.path.exists(path) and not untrusted(os.path.dirname(path)):
            return "unix://" + path
    return "unix://" + candidates[0]


def parse_address(address: str) -> tuple[str, Any]:
    """``unix:///path``, a plain path, or ``tcp://host:port`` as (family, socket address)."""
    if address.startswith("tcp://"):
        hostport = address[len("tcp://") :]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"address {address!r}: expected tcp://host:port")
        return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    if address.startswith("unix://"):
        address = address[len("unix://") :]
    elif "://" in address:
        raise ValueError(f"address {address!r}: expected unix:///path or tcp://host:port")
    if not address:
        raise ValueError("an empty socket path")
    return "unix", address
