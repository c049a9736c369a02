"""Journal records: one typed msgspec Struct per job transition, and their framing.

A record is a msgpack array whose first element is its tag
(``array_like=True``, integer tags): compact, and a record type evolves by
appending fields with defaults, which the records of older files simply
lack. A tag is never reused.

On disk a segment is a header followed by frames::

    header  b"PSJL" | u16 version | u16 flags | u64 segment number | u32 crc32 of the 16 bytes before
    frame   u32 body length | u32 crc32 of the body | body (one msgpack record)

``BASE`` in a header's flags marks a segment written by compaction: it
holds the whole live state, so every segment numbered below it is history.

Nothing here touches a file or a clock.
"""

from __future__ import annotations

import struct
import zlib
from typing import Union

import msgspec

from ..model import QUEUED, JobOptions, Key

VERSION = 1
MAGIC = b"PSJL"
BASE = 1  # header flag: a compacted segment that starts from nothing
HEADER = struct.Struct("<4sHHQ")
HEADER_SIZE = HEADER.size + 4
FRAME = struct.Struct("<II")
#: no record is this large (payloads past ``spill_bytes`` go to their own file)
MAX_RECORD = 1 << 30


class Record(msgspec.Struct, array_like=True, gc=False):
    """Base of every record; ``job`` is the job it belongs to (0 for none)."""


class Meta(Record, tag=0):
    """First record of a compacted segment: what is not any one job's."""

    next_job: int
    created: float = 0.0


class Fn(Record, tag=1):
    """A pickled function, written once and named by ``id`` in the submits that use it."""

    id: int
    data: bytes


class Opts(Record, tag=2):
    """A set of job options, written once and named by ``id``."""

    id: int
    options: JobOptions


class _Job(Record):
    """What a job is made of, as submitted; an ``Image`` starts with the same fields."""

    job: int
    fn: int
    opts: int
    flags: int
    args: bytes
    buffers: list[bytes]
    label: str
    key: Key | None
    at: float  # wall clock


class Submitted(_Job, tag=3):
    not_before: float = 0.0  # wall clock: a delayed job waits until then
    deps: list[int] = []  # prerequisites: it runs once they have finished
    dep_policy: str = "cancel"  # a prerequisite that fails cancels it, or ("run") does not


class Changed(Record, tag=14):
    """A job not yet started got new options (``pool.reprioritize``)."""

    job: int
    opts: int


class Dispatched(Record, tag=4):
    job: int
    attempt: int
    worker: int = -1


class Checkpoint(Record, tag=5):
    """A running job saved its state (streamed by ``preempt="kill"`` jobs)."""

    job: int
    state: bytes


class Succeeded(Record, tag=6):
    job: int
    result: bytes
    buffers: list[bytes]
    spill: str  # a file under the journal's spill/ directory holds the result instead
    at: float


class Failed(Record, tag=7):
    """An attempt failed; with ``retry_at`` the job waits to run again, else it is final."""

    job: int
    attempt: int
    kind: str  # "error", "crash" or "timeout" (policy.ERROR, CRASH, TIMEOUT)
    error: bytes  # the encoded exception, for "error"
    message: str
    retry_at: float  # wall clock; 0.0 when final
    at: float


class DeadLettered(Record, tag=8):
    """A job out of attempts whose last failure was a crash or a timeout."""

    job: int


class Cancelled(Record, tag=9):
    job: int
    at: float


class Requeued(Record, tag=10):
    """Back to the front of the queue without spending an attempt: preempted, or never started."""

    job: int
    checkpoint: bytes
    preempted: bool


class Dropped(Record, tag=11):
    """Finished jobs the retention policy let go (``reason``: count, age or fetched)."""

    jobs: list[int]
    reason: str


class Image(_Job, tag=12):
    """One job's whole state: what compaction writes, and the entry the journal's state keeps."""

    state: str = QUEUED
    attempt: int = 1
    checkpoint: bytes = b""
    result: bytes = b""
    result_buffers: list[bytes] = []
    spill: str = ""
    error: bytes = b""
    message: str = ""
    retry_at: float = 0.0
    finished_at: float = 0.0
    dead: bool = False
    deps: list[int] = []
    dep_policy: str = "cancel"
    history: list[tuple[int, str, str, float]] = []  # (attempt, kind, message, at) of each failure


class Images(Record, tag=13):
    """Many images in one frame: compaction writes these, so reopening decodes in bulk."""

    images: list[Image]


class ScheduleSet(Record, tag=15):
    """A recurring schedule, whole (added, or as compaction writes it)."""

    name: str
    kind: str  # "cron" or "every"
    expr: str
    every: float
    anchor: float
    tz: str
    fn: bytes
    flags: int
    args: bytes
    options: JobOptions
    label: str
    misfire: str
    overlap: str
    last: float  # wall clock: fire times up to here are decided
    paused: bool = False


class ScheduleFired(Record, tag=16):
    name: str
    last: float


class SchedulePaused(Record, tag=17):
    name: str
    paused: bool
    last: float


class Unscheduled(Record, tag=18):
    name: str


class Released(Record, tag=19):
    """A continuation's prerequisite succeeded: its arguments now hold that result."""

    job: int
    args: bytes
    flags: int


AnyRecord = Union[Meta, Fn, Opts, Submitted, Dispatched, Checkpoint, Succeeded, Failed, DeadLettered, Cancelled, Requeued, Dropped, Image, Images, Changed, ScheduleSet, ScheduleFired, SchedulePaused, Unscheduled, Released]

_encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(AnyRecord)
_pack_frame = FRAME.pack
_crc = zlib.crc32


def frame(rec: Record) -> bytes:
    """A record as it goes to disk: length, checksum, body."""
    body = _encoder.encode(rec)
    return _pack_frame(len(body), _crc(body)) + body


def header(seq: int, flags: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, flags, seq)
    return head + struct.pack("<I", _crc(head))


def parse_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """(version, flags, segment number); ``ValueError`` says what is wrong."""
    if len(data) < HEADER_SIZE:
        raise ValueError("the segment header is cut short")
    magic, version, flags, seq = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a procsched journal segment (bad magic)")
    if struct.unpack_from("<I", data, HEADER.size)[0] != _crc(data[: HEADER.size]):
        raise ValueError("the segment header's checksum does not match")
    if version > VERSION:
        raise ValueError(f"journal format version {version} is newer than this procsched reads ({VERSION})")
    return version, flags, seq
