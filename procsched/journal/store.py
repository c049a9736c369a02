"""Journal files: segments, the lock, reading back, and the group-commit writer.

A journal is a directory::

    LOCK                 flock()ed by the one process that writes; holds its pid
    00000001.seg ...     segments, numbered; see ``records`` for the layout
    spill/<job>.res      results too large to sit in a record

Reading (:func:`read_segment`) walks the frames of a segment. A frame that
is cut short or fails its checksum is *torn* when nothing valid follows it
in the last segment (a crash mid-write): the writer truncates it and logs a
warning. A bad frame with valid frames after it, or in an earlier segment,
is *corruption*: the open stops with :class:`JournalCorrupt`, naming the
file and offset, unless the caller asked to salvage (skip to the next valid
frame, with a warning).

Writing (:class:`SegmentWriter`): the supervisor adds frames during a loop
turn and ``commit()`` writes them with one ``write`` (group commit). Under
``fsync="always"`` the commit also fsyncs, in the loop; under ``"interval"``
a flusher thread fsyncs every ``interval`` seconds when anything was
written, so the loop never waits for the disk. Each fsync the writer does
(either policy, and the one before a segment switch) is timed into
``SegmentWriter.fsync_times``, a :class:`~procsched.ledger.Histogram` a
metrics endpoint reads from its own thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from ..errors import PoolError
from ..ledger import Histogram
from . import records as r

FSYNC_POLICIES = ("always", "interval", "never")
_SUFFIX = ".seg"
#: upper bounds (seconds) of the fsync latency histogram's buckets
FSYNC_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class JournalError(PoolError):
    """A journal cannot be opened or written."""


class JournalLocked(JournalError):
    """Another process has the journal open."""


class JournalCorrupt(JournalError):
    """Damage before a journal's tail: records after it would be lost by truncating."""

    def __init__(self, path: str, offset: int, detail: str) -> None:
        super().__init__(f"journal segment {path} is damaged at byte offset {offset}: {detail} (open with salvage=True to skip the damaged records)")
        self.path = path
        self.offset = offset


class Damage(NamedTuple):
    path: str
    offset: int  # where the bad bytes start
    resumed: int  # where valid frames start again (the file's size for a torn tail)
    kind: str  # "torn" or "corrupt"
    detail: str


def segment_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"{seq:08d}{_SUFFIX}")


def list_segments(directory: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(directory):
        if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
            out.append((int(name[: -len(_SUFFIX)]), os.path.join(directory, name)))
    return sorted(out)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock(directory: str) -> int:
    """Take the journal's exclusive lock; the fd holds it until closed."""
    path = os.path.join(directory, "LOCK")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise JournalLocked(f"journal {directory} is in use by another process (pid {holder}); one supervisor per journal") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# -- reading ----------------------------------------------------------------


def _frame_at(data: bytes, mv: memoryview, off: int, n: int) -> tuple[int, Any] | str:
    """The record starting at ``off`` and where the next one starts, or why there is none."""
    if off + r.FRAME.size > n:
        return "a frame header cut short"
    length, crc = r.FRAME.unpack_from(data, off)
    end = off + r.FRAME.size + length
    if length > r.MAX_RECORD or end > n:
        return f"a frame of {length} bytes runs past the end of the file"
    body = mv[off + r.FRAME.size : end]
    if zlib.crc32(body) != crc:
        return "checksum mismatch"
    try:
        return end, r.decoder.decode(body)
    except msgspec.DecodeError as e:  # a valid checksum over something we cannot read
        return f"unreadable record ({e})"


def _describe_bad_frame(data: bytes, mv: memoryview, off: int, n: int) -> tuple[str, bool]:
    """Why the frame at ``off`` could not be applied, and whether its bytes are whole (checksum good)."""
    got = _frame_at(data, mv, off, n)
    if isinstance(got, str):
        return got, got.startswith("unreadable")
    return f"record {type(got[1]).__name__} refers to a job this journal does not hold", True


# A frame's body is a msgpack array whose first element is the record's tag:
# the two bytes that must follow a frame header, checked before a checksum.
_ARRAY_HEADS = frozenset([*range(0x91, 0xA0), 0xDC])
_TAGS = frozenset(range(32))


_RESYNC_BUDGET = 256 << 20  # bytes checksummed looking for a frame before giving up


def _resync(data: bytes, mv: memoryview, start: int, n: int) -> int:
    """The first offset after ``start`` where a valid frame begins (``n`` if none).

    Each offset is first checked for the two bytes a record starts with, so
    only a few are checksummed; the bytes checksummed are bounded too, so a
    large payload that happens to look like frames cannot make it quadratic.
    """
    head = r.FRAME.size
    budget = _RESYNC_BUDGET
    for off in range(start, n - head - 2):
        first = data[off + head]
        if first not in _ARRAY_HEADS:
            continue  # cannot be a record: no checksum to compute
        tag_at = off + head + (3 if first == 0xDC else 1)
        if tag_at >= n or data[tag_at] not in _TAGS:
            continue
        length = int.from_bytes(data[off : off + 4], "little")
        if off + head + length > n:
            continue
        budget -= length
        if budget < 0:
            return n
        if not isinstance(_frame_at(data, mv, off, n), str):
            return off
    return n


def read_segment(path: str, handlers: dict[type, Callable[[Any], None]], last: bool, salvage: bool, log: Any) -> tuple[int, int, list[Damage]]:
    """Apply every record of one segment (``handlers``: by record type); (flags, end of the valid frames, damage found)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        _, flags, _ = r.parse_header(data)
    except ValueError as e:
        if last and len(data) < r.HEADER_SIZE:  # created, then the crash came before the header was durable
            return 0, 0, [Damage(path, 0, len(data), "torn", str(e))]
        raise JournalCorrupt(path, 0, str(e)) from None
    mv = memoryview(data)
    n = len(data)
    off = r.HEADER_SIZE
    damage: list[Damage] = []
    unpack, crc32, decode, head = r.FRAME.unpack_from, zlib.crc32, r.decoder.decode, r.FRAME.size
    try:
        while off < n:
            # the fast path, inlined: a whole frame, its checksum good, a record we can apply
            if off + head <= n:
                length, crc = unpack(data, off)
                end = off + head + length
                if end <= n:
                    body = mv[off + head : end]
                    if crc32(body) == crc:
                        try:
                            rec = decode(body)
                            handlers[type(rec)](rec)
                            off = end
                            continue
                        except (msgspec.DecodeError, KeyError, AttributeError):
                            pass  # described below
            detail, whole = _describe_bad_frame(data, mv, off, n)
            if last and not whole:
                # torn: the crash cut the last write short (nothing valid after
                # it; a frame running past the end may be a flipped length)
                if _resync(data, mv, off + 1, n) == n:
                    damage.append(Damage(path, off, n, "torn", detail))
                    log.warning("journal_torn_tail", path=path, offset=off, dropped_bytes=n - off, detail=detail)
                    break
            if not salvage:
                raise JournalCorrupt(path, off, detail)
            resumed = _resync(data, mv, off + 1, n)
            damage.append(Damage(path, off, resumed, "corrupt", detail))
            log.warning("journal_salvaged", path=path, offset=off, skipped_bytes=resumed - off, detail=detail)
            off = resumed
    finally:
        mv.release()
    return flags, off, damage


# -- writing ----------------------------------------------------------------


class SegmentWriter:
    """The open segment, the frames of the turn, and (``fsync="interval"``) the flusher thread."""

    def __init__(self, directory: str, fd: int, seq: int, size: int, policy: str, interval: float) -> None:
        self.directory = directory
        self.fd = fd
        self.seq = seq
        self.size = size  # bytes in the open segment
        self.policy = policy
        self.interval = interval
        self.pending: list[bytes] = []
        self.commits = 0  # commits written
        self.written = 0  # bytes written since the journal opened
        self.durable = 0  # commits fsynced
        #: how long each fsync of a segment took (observed by the loop and the flusher: under _times_lock)
        self.fsync_times = Histogram(FSYNC_BOUNDS)
        self._times_lock = threading.Lock()
        self._fd_lock = threading.Lock()  # held while fsyncing, and to swap fd
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if policy == "interval":
            self._thread = threading.Thread(target=self._flusher, name="procsched-journal", daemon=True)
            self._thread.start()

    @classmethod
    def create(cls, directory: str, seq: int, flags: int, policy: str, interval: float) -> SegmentWriter:
        fd = new_segment(directory, seq, flags)
        return cls(directory, fd, seq, r.HEADER_SIZE, policy, interval)

    def commit(self) -> int:
        """Write the turn's frames with one ``write`` (and under "always", fsync); the commit's number.

        "always" fsyncs right here, in the supervisor's loop: the loop settles
        the turn's futures as soon as this returns, with no thread hand-off;
        everything the turn gathered (from every submitting thread) shares
        the one fsync.
        """
        if self._error is not None:
            raise JournalError(f"the journal's flusher failed: {self._error!r}") from self._error
        if not self.pending:
            return self.commits
        data = b"".join(self.pending)
        self.pending.clear()
        _write_all(self.fd, data)
        self.size += len(data)
        self.written += len(data)
        self.commits += 1
        if self.policy == "always":
            self._fsync(self.fd)
            self.durable = self.commits
        return self.commits

    def _flusher(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.sync()
        except BaseException as e:  # an fsync error: commit() raises it in the loop
            self._error = e

    def sync(self) -> None:
        """fsync everything committed so far (any thread)."""
        target = self.commits
        if target <= self.durable:
            return
        with self._fd_lock:
            self._fsync(self.fd)
        self.durable = max(self.durable, target)

    def switch(self, fd: int, seq: int, size: int) -> None:
        """Continue in another segment; the old one is fsynced and closed first."""
        self._fsync(self.fd)
        with self._fd_lock:
            os.close(self.fd)
            self.fd, self.seq, self.size = fd, seq, size

    def _fsync(self, fd: int) -> None:
        start = time.perf_counter()
        os.fsync(fd)
        elapsed = time.perf_counter() - start
        with self._times_lock:  # (the flusher's and the loop's fsyncs may end together)
            self.fsync_times.observe(elapsed)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.policy != "never":
            self.sync()
        os.close(self.fd)


def new_segment(directory: str, seq: int, flags: int) -> int:
    """Create segment ``seq`` with its header, durable along with its directory entry."""
    fd = os.open(segment_path(directory, seq), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    _write_all(fd, r.header(seq, flags))
    os.fsync(fd)
    fsync_dir(directory)
    return fd


def write_segment(directory: str, seq: int, flags: int, frames: list[bytes]) -> None:
    """Write a whole segment under a temporary name, then rename it in place (atomic)."""
    final = segment_path(directory, seq)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, r.header(seq, flags) + b"".join(frames))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_dir(directory)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_BLOB = struct.Struct("<4sII")  # magic, crc32 of the rest, number of parts; then u64 sizes, then the parts


def write_blob(path: str, payload: bytes, buffers: list[Any], durable: bool) -> None:
    """A result too large for a record, in its own file (fsynced when ``durable``)."""
    parts = [memoryview(payload)] + [memoryview(b).cast("B") for b in buffers]
    sizes = struct.pack(f"<{len(parts)}Q", *(p.nbytes for p in parts))
    crc = zlib.crc32(sizes)
    for p in parts:
        crc = zlib.crc32(p, crc)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, _BLOB.pack(b"PSJB", crc, len(parts)) + sizes)
        for p in parts:
            _write_all(fd, p)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:  # its directory entry too, before a record names it
        fsync_dir(os.path.dirname(path))


def read_blob(path: str) -> tuple[bytes, list[bytes]]:
    """A spilled result's parts; ``JournalError`` if the file is cut short or damaged."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        magic, crc, count = _BLOB.unpack_from(data)
        sizes = struct.unpack_from(f"<{count}Q", data, _BLOB.size)
    except struct.error:
        raise JournalError(f"spilled result {path} is cut short") from None
    off = _BLOB.size + 8 * count
    if magic != b"PSJB" or not count or zlib.crc32(data[_BLOB.size :]) != crc or off + sum(sizes) != len(data):
        raise JournalError(f"spilled result {path} is damaged")
    parts = []
    for n in sizes:
        parts.append(data[off : off + n])
        off += n
    return parts[0], parts[1:]
