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

from ..model import CANCELLED, CRASHED, FAILED, PENDING, QUEUED, RUNNING, SUCCEEDED, TIMED_OUT, JobOptions, Key
from . import records as r

FINAL = frozenset((SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, CRASHED))
_FINAL_STATE = {"error": FAILED, "crash": CRASHED, "timeout": TIMED_OUT}
_OVERHEAD = 96  # bytes an image costs beyond its payloads (an estimate for the dead fraction)


class Entry:
    """One job as the journal knows it."""

    __slots__ = (
        "job", "fn", "opts", "flags", "args", "buffers", "label", "key", "at", "state", "attempt",
        "checkpoint", "result", "result_buffers", "spill", "error", "message", "retry_at", "finished_at", "dead", "size",
    )  # fmt: skip

    def __init__(self, rec: r.Submitted | r.Image) -> None:
        self.job = rec.job
        self.fn = rec.fn
        self.opts = rec.opts
        self.flags = rec.flags
        self.args = rec.args
        self.buffers = rec.buffers
        self.label = rec.label
        self.key = rec.key
        self.at = rec.at
        self.state = QUEUED
        self.attempt = 1
        self.checkpoint = b""
        self.result = b""
        self.result_buffers: list[bytes] = []
        self.spill = ""
        self.error = b""
        self.message = ""
        self.retry_at = 0.0
        self.finished_at = 0.0
        self.dead = False
        self.size = 0

    def estimate(self) -> int:
        """About how many bytes this job's image takes."""
        n = _OVERHEAD + len(self.args) + len(self.checkpoint) + len(self.result) + len(self.error)
        for b in self.buffers:
            n += len(b)
        for b in self.result_buffers:
            n += len(b)
        return n

    def image(self) -> r.Image:
        return r.Image(
            self.job, self.fn, self.opts, self.flags, self.args, self.buffers, self.label, self.key, self.at,
            self.state, self.attempt, self.checkpoint, self.result, self.result_buffers, self.spill,
            self.error, self.message, self.retry_at, self.finished_at, self.dead,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """What ``journal inspect`` shows of a job."""
        return {
            "job": self.job, "key": self.key, "name": self.label, "state": self.state, "attempt": self.attempt,
            "submitted": self.at, "finished": self.finished_at or None, "retry_at": self.retry_at or None,
            "dead_letter": self.dead, "error": self.message or None, "spill": self.spill or None,
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
        e.size = e.estimate()
        self.live_bytes += e.size

    def _resize(self, e: Entry) -> None:
        size = e.estimate()
        self.live_bytes += size - e.size
        e.size = size

    def _submitted(self, rec: r.Submitted) -> None:
        self._add(Entry(rec))

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

    def _succeeded(self, rec: r.Succeeded) -> None:
        e = self.jobs[rec.job]
        e.result, e.result_buffers, e.spill = rec.result, rec.buffers, rec.spill
        e.args, e.buffers, e.checkpoint = b"", [], b""  # not needed again: it will not rerun
        self._end(e, SUCCEEDED, rec.at)
        self._resize(e)

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
        e.args, e.buffers = b"", []
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

    def _image(self, rec: r.Image) -> None:
        e = Entry(rec)
        e.state, e.attempt, e.checkpoint = rec.state, rec.attempt, rec.checkpoint
        e.result, e.result_buffers, e.spill = rec.result, rec.result_buffers, rec.spill
        e.error, e.message, e.retry_at, e.finished_at, e.dead = rec.error, rec.message, rec.retry_at, rec.finished_at, rec.dead
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
        out += [e.image() for e in finished + unfinished]
        return out

    def dump(self) -> dict[str, Any]:
        """Everything this state holds, as plain values (two states are equal when their dumps are)."""
        return {
            "jobs": {j: tuple(getattr(e, name) for name in Entry.__slots__) for j, e in self.jobs.items()},
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
