"""The journal: every job transition, appended to disk, so nothing accepted is lost.

:class:`Journal` is what the supervisor holds. Opening one takes the
directory's lock, replays its segments into a :class:`JournalState`
(``records`` says what is on disk, ``store`` how it is read and written)
and leaves the last segment open for appending. During a loop turn the
supervisor calls :meth:`Journal.append` for each transition, which frames
the record and applies it to the state, then :meth:`Journal.commit` once:
one ``write`` per turn. The ``fsync`` policy decides when that write is
made durable (see :class:`~procsched.model.JournalConfig`).

Compaction writes the live state (unfinished jobs, retained results,
checkpoints) as a fresh ``BASE`` segment under a temporary name, renames it
in place and removes the segments before it; a crash at any point leaves
either the old segments or the new one in charge, never a mix.

Only the supervisor's loop thread calls the methods that write. The CLI
opens a journal read-only to inspect or verify it (without the lock, so it
can look at a journal in use), or with the lock to compact it.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import msgspec

from ..log import get_logger
from ..model import JobOptions, JournalConfig
from . import records as r
from .state import JournalState
from .store import (
    Damage,
    JournalCorrupt,
    JournalError,
    JournalLocked,
    SegmentWriter,
    fsync_dir,
    list_segments,
    lock,
    new_segment,
    read_blob,
    read_segment,
    segment_path,
    write_blob,
    write_segment,
)

__all__ = ["Damage", "Journal", "JournalCorrupt", "JournalError", "JournalLocked", "JournalState"]

log = get_logger("procsched.journal")
_encode = msgspec.msgpack.Encoder().encode
_pack_frame = r.FRAME.pack
_crc = zlib.crc32


class Journal:
    def __init__(self, config: JournalConfig, *, readonly: bool = False) -> None:
        self.config = config
        self.path = os.path.abspath(config.path)
        self.readonly = readonly
        self.state = JournalState()
        self._handlers = self.state.handlers
        self.damage: list[Damage] = []
        self.segments: list[tuple[int, str]] = []
        self.total_bytes = 0  # bytes in the segments replay reads
        self.writer: SegmentWriter | None = None
        self._pending: list[bytes] = []  # this turn's frames (the writer's list once it is open)
        self._next_look = config.compact_min_bytes  # journal size at which should_compact() looks again
        self._unlink: list[str] = []  # spill files of dropped results, removed once the drop is written
        self._lock_fd = -1
        self._fn_ids: dict[bytes, int] = {}
        self._opt_ids: dict[int, tuple[JobOptions, int]] = {}  # by identity: the common case costs a lookup
        self._opt_values: dict[bytes, int] = {}  # by value: equal options made apart share an id
        self._next_fn = self._next_opts = 1
        if readonly:
            if not os.path.isdir(self.path):
                raise JournalError(f"no journal at {self.path}")
        else:
            try:
                os.makedirs(os.path.join(self.path, "spill"), exist_ok=True)
            except OSError as e:
                raise JournalError(f"cannot create journal directory {self.path}: {e.strerror or e}") from None
            self._lock_fd = lock(self.path)
        try:
            end = self._replay()
            self._learn_ids()
            if not readonly:
                self._open_writer(end)
        except BaseException:
            self._release_lock()
            raise

    # -- opening ----------------------------------------------------------------
    def _replay(self) -> int:
        """Apply every record from the newest base segment on; the valid end of the last one."""
        segments = list_segments(self.path)
        start = 0
        for i, (_, path) in enumerate(segments):
            if _is_base(path):
                start = i
        if self.readonly and not segments:
            raise JournalError(f"{self.path} holds no journal segments")
        if not self.readonly:
            for name in os.listdir(self.path):  # a compaction that died before its rename
                if name.endswith(".seg.tmp"):
                    os.unlink(os.path.join(self.path, name))
            for _, path in segments[:start]:  # history a finished compaction did not get to remove
                os.unlink(path)
            if start:
                fsync_dir(self.path)
        self.segments = segments[start:]
        end = 0
        handlers = self.state.handlers
        for i, (_, path) in enumerate(self.segments):
            last = i == len(self.segments) - 1
            _, end, damage = read_segment(path, handlers, last, self.config.salvage, log)
            self.damage += damage
            self.total_bytes += end
        return end

    def _learn_ids(self) -> None:
        st = self.state
        self._fn_ids = {data: i for i, data in st.fns.items()}
        self._opt_ids = {id(o): (o, i) for i, o in st.options.items()}
        self._opt_values = {_encode(o): i for i, o in st.options.items()}
        self._next_fn = max(st.fns, default=0) + 1
        self._next_opts = max(st.options, default=0) + 1

    def _open_writer(self, end: int) -> None:
        cfg = self.config
        if not self.segments:
            self.writer = SegmentWriter.create(self.path, 1, 0, cfg.fsync, cfg.fsync_interval)
            self._pending = self.writer.pending
            self.segments = [(1, segment_path(self.path, 1))]
            self.total_bytes = self.writer.size
            return
        seq, path = self.segments[-1]
        if end < r.HEADER_SIZE:  # the crash came before its header was durable: start it again
            os.unlink(path)
            fd = new_segment(self.path, seq, 0)
            end = r.HEADER_SIZE
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            if os.fstat(fd).st_size > end:  # a torn tail: cut it off before appending
                os.ftruncate(fd, end)
                os.fsync(fd)
        self.writer = SegmentWriter(self.path, fd, seq, end, cfg.fsync, cfg.fsync_interval)
        self._pending = self.writer.pending

    # -- writing (the supervisor's loop thread) ---------------------------------
    def append(self, rec: r.Record) -> None:
        """Frame ``rec`` for this turn's commit and apply it to the state."""
        body = _encode(rec)
        pending = self._pending
        pending.append(_pack_frame(len(body), _crc(body)))  # (joined at commit: no copy here)
        pending.append(body)
        self.total_bytes += len(body) + 8
        self._handlers[type(rec)](rec)

    @property
    def bytes_written(self) -> int:
        return 0 if self.writer is None else self.writer.written

    def fn_id(self, data: bytes) -> int:
        """The id of a pickled function, writing it the first time."""
        i = self._fn_ids.get(data)
        if i is None:
            i = self._fn_ids[data] = self._next_fn
            self._next_fn += 1
            self.append(r.Fn(i, data))
        return i

    def opts_id(self, opts: JobOptions) -> int:
        """The id of a set of options, writing it the first time (equal options share one)."""
        hit = self._opt_ids.get(id(opts))
        if hit is not None and hit[0] is opts:
            return hit[1]
        if len(self._opt_ids) > 4096:  # options made per submit: keep the identity cache small
            self._opt_ids.clear()
        value = _encode(opts)
        i = self._opt_values.get(value)
        if i is None:
            i = self._opt_values[value] = self._next_opts
            self._next_opts += 1
            self.append(r.Opts(i, opts))
        self._opt_ids[id(opts)] = (opts, i)
        return i

    def commit(self) -> int:
        """Write this turn's records (durable on return under fsync="always"); the commit's number."""
        assert self.writer is not None
        n = self.writer.commit()
        if self._unlink:  # after the write: a crash before it leaves a file no record names, not the reverse
            for path in self._unlink:
                _remove(path)
            self._unlink.clear()
        if self.writer.size >= self.config.segment_bytes:
            self._roll()
        return n

    def _roll(self) -> None:
        assert self.writer is not None
        seq = self.writer.seq + 1
        fd = new_segment(self.path, seq, 0)
        self.writer.switch(fd, seq, r.HEADER_SIZE)
        self.segments.append((seq, segment_path(self.path, seq)))

    def retire(self, now: float) -> None:
        """Drop finished jobs past the retention policy (``now``: wall clock)."""
        cfg = self.config
        expired = self.state.expired(cfg.keep_results, cfg.result_ttl, now)
        if expired:
            self.drop(expired, "retention")

    def drop(self, jobs: list[int], reason: str) -> None:
        held = self.state.jobs
        self._unlink += [self.spill_path(held[j].spill) for j in jobs if j in held and held[j].spill]
        self.append(r.Dropped(jobs, reason))

    def should_compact(self) -> bool:
        """Whether most of the journal is history (asked every turn; it looks only as the journal grows)."""
        total = self.total_bytes
        if total < self._next_look:
            return False
        cfg = self.config
        live = self.state.live_bytes()  # a pass over the jobs: at most once per quarter of growth
        if total - live > cfg.compact_dead_fraction * total:
            return True
        self._next_look = max(cfg.compact_min_bytes, total + total // 4)
        return False

    def compact(self) -> tuple[int, int]:
        """Rewrite the live state as a fresh segment; (bytes before, bytes after)."""
        assert self.writer is not None
        before = self.total_bytes
        self.writer.commit()
        recs = self.state.compacted()
        self._learn_ids()
        seq = self.writer.seq + 1
        write_segment(self.path, seq, r.BASE, [r.frame(rec) for rec in recs])
        fd = os.open(segment_path(self.path, seq), os.O_WRONLY | os.O_APPEND)
        size = os.fstat(fd).st_size
        self.writer.switch(fd, seq, size)
        for _, path in self.segments:
            _remove(path)
        fsync_dir(self.path)
        self.segments = [(seq, segment_path(self.path, seq))]
        self.total_bytes = size
        self._next_look = max(self.config.compact_min_bytes, size * 2)
        self._sweep_spill()
        log.info("journal_compacted", path=self.path, before=before, after=size, jobs=len(self.state.jobs))
        return before, size

    # -- large results ------------------------------------------------------------
    def spill_path(self, name: str) -> str:
        return os.path.join(self.path, "spill", name)

    def spill(self, job: int, payload: bytes, buffers: list[Any]) -> str:
        """Write a large result to its own file (durable before its record is); its name."""
        name = f"{job}.res"
        write_blob(self.spill_path(name), payload, buffers, self.config.fsync != "never")
        return name

    def load_spill(self, name: str) -> tuple[bytes, list[bytes]]:
        return read_blob(self.spill_path(name))

    def _sweep_spill(self) -> None:
        keep = {e.spill for e in self.state.jobs.values() if e.spill}
        directory = os.path.join(self.path, "spill")
        for name in os.listdir(directory):
            if name not in keep:
                _remove(os.path.join(directory, name))

    # -- closing ------------------------------------------------------------------
    def close(self) -> None:
        """Write what is pending and sync; the lock and the flusher go even if that fails."""
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                try:
                    writer.commit()
                finally:
                    writer.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _is_base(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return bool(r.parse_header(f.read(r.HEADER_SIZE))[1] & r.BASE)
    except (OSError, ValueError):
        return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
