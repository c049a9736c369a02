"""The journal's view of every job: a fold over records.

:meth:`JournalState.apply` is the one place a record changes state. The
supervisor calls it (through ``Journal.append``) for each transition as it
writes the record; recovery calls it for each record read back from disk.
So the state rebuilt from a journal is the state the live supervisor had
when it wrote it, by construction, and a test checks it.

Pure: no files, no clock (times are in the records), no threads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from ..model import CANCELLED, CRASHED, FAILED, PENDING, QUEUED, RUNNING, SUCCEEDED, TIMED_OUT, JobOptions, Key
from . import records as r

FINAL = frozenset((SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, CRASHED))
_FINAL_STATE = {"error": FAILED, "crash": CRASHED, "timeout": TIMED_OUT}
_NONE: list[bytes] = []  # shared by the entries that no longer hold buffers (never appended to)
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
        "submitted": e.at, "finished": e.finished_at or None, "retry_at": e.retry_at or None,
        "dead_letter": e.dead, "error": e.message or None, "spill": e.spill or None,
    }  # fmt: skip


class JournalState:
    def __init__(self) -> None:
        self.jobs: dict[int, Entry] = {}
        self.keys: dict[Key, int] = {}
        self.fns: dict[int, bytes] = {}
        self.options: dict[int, JobOptions] = {}
        #: finished jobs, oldest first (the order retention drops them in)
        self.finished: OrderedDict[int, None] = OrderedDict()
        self.next_job = 1
        self.live_bytes = 0
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
        e.size = size = _estimate(e)
        self.live_bytes += size

    def _resize(self, e: Entry) -> None:
        size = _estimate(e)
        self.live_bytes += size - e.size
        e.size = size

    def _submitted(self, rec: r.Submitted) -> None:  # (frequent: _add and _estimate inlined)
        job = rec.job
        e = self.jobs[job] = Entry(job, rec.fn, rec.opts, rec.flags, rec.args, rec.buffers, rec.label, rec.key, rec.at)
        if rec.key is not None:
            self.keys[rec.key] = job
        if job >= self.next_job:
            self.next_job = job + 1
        e.size = size = _OVERHEAD + len(rec.args) + (sum(map(len, rec.buffers)) if rec.buffers else 0)
        self.live_bytes += size

    def _dispatched(self, rec: r.Dispatched) -> None:
        e = self.jobs[rec.job]
        e.state = RUNNING
        e.attempt = rec.attempt

    def _checkpoint(self, rec: r.Checkpoint) -> None:
        e = self.jobs[rec.job]
        e.checkpoint = rec.state
        self._resize(e)

    def _end(self, e: Entry, state: str, at: float) -> None:
        e.state = state
        e.finished_at = at
        self.finished[e.job] = None

    def _succeeded(self, rec: r.Succeeded) -> None:  # (the most frequent: _end and _resize inlined)
        job = rec.job
        e = self.jobs[job]
        e.result, e.result_buffers, e.spill = rec.result, rec.buffers, rec.spill
        e.args, e.buffers, e.checkpoint = b"", _NONE, b""  # not needed again: it will not rerun
        e.state, e.finished_at = SUCCEEDED, rec.at
        self.finished[job] = None
        size = _OVERHEAD + len(rec.result) + len(e.error) + (sum(map(len, rec.buffers)) if rec.buffers else 0)
        self.live_bytes += size - e.size
        e.size = size

    def _failed(self, rec: r.Failed) -> None:
        e = self.jobs[rec.job]
        e.error, e.message = rec.error, rec.message
        if rec.retry_at:
            e.state = PENDING
            e.attempt = rec.attempt + 1
            e.retry_at = rec.retry_at
        else:  # the payload stays: a dead letter can be inspected and submitted again
            e.attempt = rec.attempt
            e.retry_at = 0.0
            self._end(e, _FINAL_STATE[rec.kind], rec.at)
        self._resize(e)

    def _dead(self, rec: r.DeadLettered) -> None:
        self.jobs[rec.job].dead = True

    def _cancelled(self, rec: r.Cancelled) -> None:
        e = self.jobs[rec.job]
        e.args, e.buffers = b"", _NONE
        self._end(e, CANCELLED, rec.at)
        self._resize(e)

    def _requeued(self, rec: r.Requeued) -> None:
        e = self.jobs[rec.job]
        e.state = QUEUED
        e.checkpoint = rec.checkpoint
        self._resize(e)

    def _dropped(self, rec: r.Dropped) -> None:
        for job in rec.jobs:
            e = self.jobs.pop(job, None)
            if e is None:
                continue
            self.finished.pop(job, None)
            self.live_bytes -= e.size
            if e.key is not None and self.keys.get(e.key) == job:
                del self.keys[e.key]

    def _image(self, e: r.Image) -> None:
        if e.state in FINAL:
            self.finished[e.job] = None
        self._add(e)

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
        out: list[r.Record] = [r.Meta(self.next_job)]
        out += [r.Fn(i, data) for i, data in self.fns.items()]
        out += [r.Opts(i, o) for i, o in self.options.items()]
        finished = [self.jobs[j] for j in self.finished]
        unfinished = [e for e in self.jobs.values() if e.state not in FINAL]
        out += finished + unfinished
        return out

    def dump(self) -> dict[str, Any]:
        """Everything this state holds, as plain values (two states are equal when their dumps are)."""
        return {
            "jobs": {j: msgspec.structs.astuple(e) for j, e in self.jobs.items()},
            "keys": dict(self.keys),
            "finished": list(self.finished),
            "fns": dict(self.fns),
            "options": dict(self.options),
            "next_job": self.next_job,
        }

    def summary(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for e in self.jobs.values():
            by_state[e.state] = by_state.get(e.state, 0) + 1
        return {"jobs": len(self.jobs), "by_state": by_state, "keys": len(self.keys), "next_job": self.next_job}
