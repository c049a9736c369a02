"""The supervisor's side of the journal: one method per job transition.

The supervisor calls these from its loop thread as each transition
happens; each appends one record (``journal.records``) and so applies it
to the journal's state. At the end of a loop turn :meth:`Recorder.end_turn`
commits the turn's records with one write, lets retention drop old
results and compacts when the journal is mostly history.

:meth:`Recorder.recover` is the other direction: after the journal has
been replayed it rebuilds the supervisor's jobs from the state, so the
jobs a dead supervisor had accepted run again. A job that was running
when it died gets a ``crash`` record for that attempt and runs again
(at-least-once), whatever its retry policy says: the attempt was not its
fault, but it is counted.

Nothing here unpickles: payloads and results stay bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import policy
from .futures import Encoded, EncodedError, JobFuture, describe
from .ipc import oob
from .journal import Journal
from .journal import records as r
from .journal.state import PENDING, RUNNING, SUCCEEDED, Entry
from .log import get_logger
from .model import JournalConfig

if TYPE_CHECKING:
    from .supervisor import Job

log = get_logger("procsched.journal")


class Recorder:
    def __init__(self, config: JournalConfig, on_durable: Callable[[int], None] | None) -> None:
        self.journal = Journal(config, on_durable=on_durable)
        self.always = config.fsync == "always"
        self.spill_bytes = config.spill_bytes
        self.drop_fetched = config.drop_fetched
        self._retire_at = 0.0

    # -- transitions ----------------------------------------------------------
    def submitted(self, job: Job) -> None:
        j = self.journal
        buffers = [bytes(b) for b in oob.read(job.oob, False)] if job.oob else []
        j.append(r.Submitted(job.id, j.fn_id(job.fn), j.opts_id(job.opts), job.flags, job.args, buffers, job.label, job.key, time.time()))

    def dispatched(self, job: Job) -> None:
        self.journal.append(r.Dispatched(job.id, job.attempt))

    def checkpoint(self, job: Job, state: bytes) -> None:
        self.journal.append(r.Checkpoint(job.id, state))

    def succeeded(self, job: Job, payload: bytes, buffers: list[Any]) -> None:
        size = len(payload) + sum(memoryview(b).nbytes for b in buffers)
        if size > self.spill_bytes:
            name = self.journal.spill(job.id, payload, buffers)
            self.journal.append(r.Succeeded(job.id, b"", [], name, time.time()))
        else:
            self.journal.append(r.Succeeded(job.id, payload, [bytes(b) for b in buffers], "", time.time()))

    def failed(self, job: Job, kind: str, error: BaseException, retry_in: float | None) -> None:
        now = time.time()
        encoded = error.payload if isinstance(error, EncodedError) else b""
        retry_at = 0.0 if retry_in is None else now + retry_in
        self.journal.append(r.Failed(job.id, job.attempt, kind, encoded, describe(error), retry_at, now))
        if retry_in is None and kind != policy.ERROR:
            self.journal.append(r.DeadLettered(job.id))

    def cancelled(self, job: Job) -> None:
        self.journal.append(r.Cancelled(job.id, time.time()))

    def requeued(self, job: Job, preempted: bool) -> None:
        self.journal.append(r.Requeued(job.id, job.resume, preempted))

    def end_turn(self, fetched: list[int]) -> int:
        """Commit the turn's records; the commit number."""
        j = self.journal
        if fetched:
            jobs = j.state.jobs
            gone = [i for i in fetched if i in jobs and jobs[i].state == SUCCEEDED]
            if gone:
                j.drop(gone, "fetched")
        now = time.monotonic()
        if now >= self._retire_at:  # at most a few times a second: retention is not urgent
            self._retire_at = now + 0.2
            j.retire(time.time())
        n = j.commit()
        if j.should_compact():
            j.compact()
        return n

    # -- recovery -------------------------------------------------------------
    def stored_result(self, entry: Entry) -> Encoded:
        if entry.spill:
            payload, buffers = self.journal.load_spill(entry.spill)
            return Encoded(payload, [memoryview(b) for b in buffers])
        return Encoded(entry.result, [memoryview(b) for b in entry.result_buffers])

    def recover(self) -> list[Entry]:
        """Jobs to run again, in submission order; records the attempts the stop interrupted."""
        st = self.journal.state
        entries = st.unfinished()
        for e in entries:
            if e.state == RUNNING:
                now = time.time()
                self.journal.append(r.Failed(e.job, e.attempt, policy.CRASH, b"", "the supervisor stopped while this job ran", now, now))
        self.journal.commit()
        if entries:
            log.warning("journal_recovered", path=self.journal.path, jobs=len(entries), pending=sum(1 for e in entries if e.state == PENDING))
        return entries

    def close(self) -> None:
        self.journal.close()


def follow(fut: JobFuture, value: Encoded) -> None:
    """Resolve a future with a stored result (a key that already succeeded)."""
    if fut.set_running_or_notify_cancel():
        fut.set_result(value)
