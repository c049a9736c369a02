"""The journal's view of every job: a fold over records.

:meth:`JournalState.apply` is the one place a record changes state. The
supervisor calls it (through ``Journal.append``) for each transition as it
writes the record; recovery calls it for each record read back from disk.
So the state rebuilt from a journal is the state the live supervisor had
when it wrote it, by construction, and a test checks it.

Pure: no files, no clock (times are in the records), no threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..model import CANCELLED, CRASHED, FAILED, PENDING, QUEUED, RUNNING, SUCCEEDED, TIMED_OUT, JobOptions, Key
from . import records as r

FINAL = frozenset((SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, CRASHED))
_FINAL_STATE = {"error": FAILED, "crash": CRASHED, "timeout": TIMED_OUT}
#: the empty list every entry without buffers, prerequisites or failures shares (never appended
#: to): three lists of their own per entry made each job three more objects for the cyclic GC
#: to walk (about 4 us a job in its collections with 100k jobs journaled)
_NONE: list[Any] = []
_IMAGES_PER_FRAME, _BYTES_PER_FRAME = 1024, 8 << 20  # compaction's frames: bulk decoding, bounded size
_OVERHEAD = 96  # bytes an image costs beyond its payloads (an estimate for the dead fraction)


Entry = r.Image  # one job as the journal knows it: the state keeps the image compaction writes


def _estimate(e: Entry) -> int:
    """About how many bytes a job's image takes."""
    n = _OVERHEAD + len(e.args) + len(e.checkpoint) + len(e.result) + len(e.error)
    if e.buffers:
        n += sum(map(len, e.buffers))
    if e.result_buffers:
        n += sum(map(len, e.result_buffers))
    return n


def describe(e: Entry) -> dict[str, Any]:
    """What ``journal inspect`` shows of a job."""
    return {
        "job": e.job, "key": e.key, "name": e.label, "state": e.state, "attempt": e.attempt,
        "submitted": e.at, "finished": e.finished_at or None, "retry_at": (e.retry_at or None) if e.state == PENDING else None,
        "dead_letter": e.dead, "error": e.message or None, "spill": e.spill or None,
    }  # fmt: skip


class JournalState:
    def __init__(self) -> None:
        self.jobs: dict[int, Entry] = {}
        self.keys: dict[Key, int] = {}
        self.fns: dict[int, bytes] = {}
        self.options: dict[int, JobOptions] = {}
        #: finished jobs, oldest first (the order retention drops them in)
        self.finished: dict[int, None] = {}
        self.next_job = 1
        self.schedules: dict[str, r.ScheduleSet] = {}
        self._apply: dict[type, Callable[[Any], None]] = {
            r.Meta: self._meta,
            r.Fn: self._fn,
            r.Opts: self._opts,
            r.Submitted: self._submitted,
            r.Dispatched: self._dispatched,
            r.Checkpoint: self._checkpoint,
            r.Succeeded: self._succeeded,
            r.Failed: self._failed,
            r.DeadLettered: self._dead,
            r.Cancelled: self._cancelled,
            r.Requeued: self._requeued,
            r.Dropped: self._dropped,
            r.Image: self._image,
            r.Images: self._images,
            r.Changed: self._changed,
            r.ScheduleSet: self._schedule_set,
            r.ScheduleFired: self._schedule_fired,
            r.SchedulePaused: self._schedule_paused,
            r.Unscheduled: self._unscheduled,
            r.Released: self._released,
        }

    def apply(self, rec: r.Record) -> None:
        self._apply[type(rec)](rec)

    @property
    def handlers(self) -> dict[type, Callable[[Any], None]]:
        """``apply`` by record type (replay looks the handler up itself: a call less per record)."""
        return self._apply

    # -- one method per record type ------------------------------------------
    def _meta(self, rec: r.Meta) -> None:
        self.next_job = max(self.next_job, rec.next_job)

    def _fn(self, rec: r.Fn) -> None:
        self.fns[rec.id] = rec.data

    def _opts(self, rec: r.Opts) -> None:
        self.options[rec.id] = rec.options

    def _add(self, e: Entry) -> None:
        self.jobs[e.job] = e
        if e.key is not None:
            self.keys[e.key] = e.job
        if e.job >= self.next_job:
            self.next_job = e.job + 1

    # Replay runs these once per record (a million records must replay
    # within seconds), so the frequent ones are written out flat.

    def _submitted(self, rec: r.Submitted) -> None:
        job = rec.job
        e = self.jobs[job] = Entry(
            job, rec.fn, rec.opts, rec.flags, rec.args, rec.buffers, rec.label, rec.key, rec.at,
            result_buffers=_NONE, deps=_NONE, history=_NONE,
        )  # fmt: skip
        if rec.not_before:  # delayed: it waits as a retry does
            e.state, e.retry_at = PENDING, rec.not_before
        if rec.deps:
            e.deps, e.dep_policy = rec.deps, rec.dep_policy
        if rec.key is not None:
            self.keys[rec.key] = job
        if job >= self.next_job:
            self.next_job = job + 1

    def _schedule_set(self, rec: r.ScheduleSet) -> None:
        self.schedules[rec.name] = msgspec.structs.replace(rec)

    def _schedule_fired(self, rec: r.ScheduleFired) -> None:
        self.schedules[rec.name].last = rec.last

    def _schedule_paused(self, rec: r.SchedulePaused) -> None:
        s = self.schedules[rec.name]
        s.paused, s.last = rec.paused, rec.last

    def _unscheduled(self, rec: r.Unscheduled) -> None:
        self.schedules.pop(rec.name, None)

    def _released(self, rec: r.Released) -> None:
        e = self.jobs[rec.job]
        e.args, e.flags = rec.args, rec.flags

    def _changed(self, rec: r.Changed) -> None:
        self.jobs[rec.job].opts = rec.opts

    def _dispatched(self, rec: r.Dispatched) -> None:
        e = self.jobs[rec.job]
        e.state = RUNNING
        e.attempt = rec.attempt

    def _checkpoint(self, rec: r.Checkpoint) -> None:
        self.jobs[rec.job].checkpoint = rec.state

    def _succeeded(self, rec: r.Succeeded) -> None:
        job = rec.job
        e = self.jobs[job]
        e.state = SUCCEEDED
        e.finished_at = rec.at
        e.result = rec.result
        if rec.buffers:
            e.result_buffers = rec.buffers
        if rec.spill:
            e.spill = rec.spill
        if e.args:  # not needed again: it will not rerun
            e.args = b""
        if e.buffers:
            e.buffers = _NONE
        if e.checkpoint:
            e.checkpoint = b""
        self.finished[job] = None

    def _failed(self, rec: r.Failed) -> None:
        e = self.jobs[rec.job]
        e.error, e.message = rec.error, rec.message
        e.history = [*e.history, (rec.attempt, rec.kind, rec.message, rec.at)]  # (not appended: see _NONE)
        if rec.retry_at:
            e.state = PENDING
            e.attempt = rec.attempt + 1
            e.retry_at = rec.retry_at
        else:  # the payload stays: a dead letter can be inspected and submitted again
            e.state = _FINAL_STATE[rec.kind]
            e.attempt = rec.attempt
            e.retry_at = 0.0
            e.finished_at = rec.at
            self.finished[rec.job] = None

    def _dead(self, rec: r.DeadLettered) -> None:
        self.jobs[rec.job].dead = True

    def _cancelled(self, rec: r.Cancelled) -> None:
        e = self.jobs[rec.job]
        e.args, e.buffers = b"", _NONE
        e.state = CANCELLED
        e.finished_at = rec.at
        self.finished[rec.job] = None

    def _requeued(self, rec: r.Requeued) -> None:
        e = self.jobs[rec.job]
        e.state = QUEUED
        e.checkpoint = rec.checkpoint

    def _dropped(self, rec: r.Dropped) -> None:
        jobs, keys, finished = self.jobs, self.keys, self.finished
        for job in rec.jobs:
            e = jobs.pop(job, None)
            if e is None:
                continue
            finished.pop(job, None)
            if e.key is not None and keys.get(e.key) == job:
                del keys[e.key]

    def _image(self, e: r.Image) -> None:
        if e.state in FINAL:
            self.finished[e.job] = None
        self._add(e)

    def _images(self, rec: r.Images) -> None:
        jobs, keys, finished = self.jobs, self.keys, self.finished
        for e in rec.images:
            job = e.job
            jobs[job] = e
            if e.key is not None:
                keys[e.key] = job
            if e.state in FINAL:
                finished[job] = None
            if job >= self.next_job:
                self.next_job = job + 1

    # -- questions the supervisor and the tools ask ----------------------------
    def unfinished(self) -> list[Entry]:
        """Jobs still to run, in submission order."""
        return sorted((e for e in self.jobs.values() if e.state not in FINAL), key=lambda e: e.job)

    def expired(self, keep: int, max_age: float, now: float) -> list[int]:
        """Finished jobs past the retention policy: beyond the newest ``keep``, or older than ``max_age``."""
        out: list[int] = []
        excess = len(self.finished) - keep if keep >= 0 else 0
        for job in self.finished:
            if excess > 0:
                out.append(job)
                excess -= 1
                continue
            if max_age and self.jobs[job].finished_at < now - max_age:
                out.append(job)
                continue
            break  # oldest first: the rest are newer
        return out

    def compacted(self) -> list[r.Record]:
        """The records that rebuild this state from nothing (the body of a compacted segment).

        Functions and options no job refers to any more are forgotten here,
        so the writer must learn them again (``Journal`` resets its caches).
        """
        live_fns = {e.fn for e in self.jobs.values()}
        live_opts = {e.opts for e in self.jobs.values()}
        self.fns = {i: data for i, data in self.fns.items() if i in live_fns}
        self.options = {i: o for i, o in self.options.items() if i in live_opts}
        out: list[r.Record] = [r.Meta(self.next_job), *self.schedules.values()]
        out += [r.Fn(i, data) for i, data in self.fns.items()]
        out += [r.Opts(i, o) for i, o in self.options.items()]
        finished = [self.jobs[j] for j in self.finished]
        unfinished = [e for e in self.jobs.values() if e.state not in FINAL]
        chunk: list[Entry] = []
        size = 0
        for e in finished + unfinished:  # frames of up to 1024 images or about 8 MiB
            chunk.append(e)
            size += _estimate(e)
            if len(chunk) == _IMAGES_PER_FRAME or size >= _BYTES_PER_FRAME:
                out.append(r.Images(chunk))
                chunk, size = [], 0
        if chunk:
            out.append(r.Images(chunk))
        return out

    def live_bytes(self) -> int:
        """About how many bytes a compacted journal would take (one pass over the jobs)."""
        return sum(map(_estimate, self.jobs.values()))

    def dump(self) -> dict[str, Any]:
        """Everything this state holds, as plain values (two states are equal when their dumps are)."""
        return {
            "jobs": {j: msgspec.structs.astuple(e) for j, e in self.jobs.items()},
            "keys": dict(self.keys),
            "finished": list(self.finished),
            "fns": dict(self.fns),
            "options": dict(self.options),
            "next_job": self.next_job,
            "schedules": {n: msgspec.structs.astuple(s) for n, s in self.schedules.items()},
        }

    def summary(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for e in self.jobs.values():
            by_state[e.state] = by_state.get(e.state, 0) + 1
        return {"jobs": len(self.jobs), "by_state": by_state, "keys": len(self.keys), "next_job": self.next_job}
