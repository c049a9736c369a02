"""The supervisor's side of the journal: one method per job transition.

The supervisor calls these from its loop thread as each transition
happens; each appends one record (``journal.records``) and so applies it
to the journal's state. At the end of a loop turn :meth:`Recorder.end_turn`
commits the turn's records with one write, lets retention drop old
results and compacts when the journal is mostly history.

:meth:`Recorder.restore` is the other direction: after the journal has
been replayed it rebuilds the supervisor's jobs from the state, so the
jobs a dead supervisor had accepted run again. A job that was running
when it died gets a ``crash`` record for that attempt and runs again
(at-least-once), whatever its retry policy says: the attempt was not its
fault, but it is counted.

Keys: :meth:`Recorder.follow` answers a submit whose key the journal
knows, with the live job's outcome (the new future follows it) or the
stored result. Under ``fsync="always"`` the futures a turn settles, and
the submits it acknowledges, are held (:meth:`Recorder.hold`) until the
turn's commit has been fsynced.

Nothing here unpickles: payloads and results stay bytes.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from . import policy
from .futures import Encoded, EncodedError, JobFuture, describe
from .ipc import oob
from .journal import Journal, JournalError
from .journal import records as r
from .journal.state import FINAL, Entry
from .jobs import Job, resolve
from .log import get_logger
from .model import PENDING, RUNNING, SUCCEEDED, JournalConfig

log = get_logger("procsched.journal")
_NO_BUFFERS: list[bytes] = []  # shared, never appended to


class Recorder:
    def __init__(self, config: JournalConfig) -> None:
        self.journal = Journal(config)
        self.always = config.fsync == "always"
        self.spill_bytes = config.spill_bytes
        self.drop_fetched = config.drop_fetched
        self._retire_at = 0.0
        #: ids of results their callers have read (appended by any thread; drop_fetched)
        self.fetched: deque[int] = deque()
        # fsync="always": this turn's settlements, made once its commit is on disk
        self._held: list[tuple[Any, ...]] = []

    # -- transitions ----------------------------------------------------------
    def submitted(self, job: Job) -> None:
        j = self.journal
        buffers = [bytes(b) for b in oob.read(job.oob, False)] if job.oob else _NO_BUFFERS
        j.append(r.Submitted(job.id, j.fn_id(job.fn), j.opts_id(job.opts), job.flags, job.args, buffers, job.label, job.key, time.time(), job.not_before, list(job.deps), job.dep_policy))

    def released(self, job: Job) -> None:
        self.journal.append(r.Released(job.id, job.args, job.flags))

    def changed(self, job: Job) -> None:
        self.journal.append(r.Changed(job.id, self.journal.opts_id(job.opts)))

    def dispatched(self, job: Job, worker: int) -> None:
        self.journal.append(r.Dispatched(job.id, job.attempt, worker))

    def checkpoint(self, job: Job, state: bytes) -> None:
        self.journal.append(r.Checkpoint(job.id, state))

    def succeeded(self, job: Job, payload: bytes, buffers: list[Any]) -> None:
        if buffers:
            if len(payload) + sum(memoryview(b).nbytes for b in buffers) > self.spill_bytes:
                self._spilled(job, payload, buffers)
            else:
                self.journal.append(r.Succeeded(job.id, payload, [bytes(b) for b in buffers], "", time.time()))
        elif len(payload) > self.spill_bytes:
            self._spilled(job, payload, buffers)
        else:
            self.journal.append(r.Succeeded(job.id, payload, _NO_BUFFERS, "", time.time()))

    def _spilled(self, job: Job, payload: bytes, buffers: list[Any]) -> None:
        name = self.journal.spill(job.id, payload, buffers)
        self.journal.append(r.Succeeded(job.id, b"", _NO_BUFFERS, name, time.time()))

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

    def follow(self, job: Job, live: dict[int, Job]) -> bool:
        """A job whose key the journal knows: follow the job running it, or take its stored result.

        False when the key is new, or its last job failed or was cancelled (it runs again).
        """
        state = self.journal.state
        prior = None if job.key is None else state.keys.get(job.key)
        if prior is None:
            return False
        leader = live.get(prior)
        if leader is not None:
            job.future.job_id = prior  # it is that job's future now (and what drop_fetched reports)
            if leader.followers is None:
                leader.followers = []
            leader.followers.append(job.future)
        elif state.jobs[prior].state == SUCCEEDED:
            try:
                value = self.stored_result(state.jobs[prior])
            except (OSError, JournalError) as e:  # a spill file gone or damaged: run it again
                log.warning("journal_result_lost", job=prior, key=job.key, error=str(e))
                return False
            job.future.job_id = prior
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(value)
        else:
            return False
        job.release_args()
        return True

    # -- the end of a loop turn -------------------------------------------------
    def hold(self, item: tuple[Any, ...]) -> None:
        """Keep a settlement (future, result, error, followers) or an ack ("ack", event) until durable."""
        self._held.append(item)

    def end_turn(self, final: bool = False) -> None:
        """Commit the turn's records with one write; retention; compaction (not when ``final``)."""
        j = self.journal
        if self.fetched:
            fetched = []
            while self.fetched:
                fetched.append(self.fetched.popleft())
            jobs = j.state.jobs
            gone = [i for i in fetched if i in jobs and jobs[i].state == SUCCEEDED]
            if gone:
                j.drop(gone, "fetched")
        now = time.monotonic()
        if now >= self._retire_at or final:  # a few times a second: retention is not urgent
            self._retire_at = now + 0.2
            j.retire(time.time())
        j.commit()
        if j.should_compact() and not final:
            j.compact()
        if self._held:
            self.release()

    def release(self) -> None:
        """Settle what waited for its records to be durable (they are, or the loop is ending)."""
        held, self._held = self._held, []
        for item in held:
            if len(item) == 2:
                item[1].set()
            else:
                resolve(*item)

    # -- recovery -------------------------------------------------------------
    def outcome(self, job_id: int) -> tuple[bool, Encoded | None] | None:
        """How a finished job the journal still holds ended: (succeeded, its result if it did)."""
        e = self.journal.state.jobs.get(job_id)
        if e is None or e.state not in FINAL:
            return None
        if e.state != SUCCEEDED:
            return False, None
        try:
            return True, self.stored_result(e)
        except (OSError, JournalError):
            return True, None

    def stored_result(self, entry: Entry) -> Encoded:
        """A result from the journal, its buffers writable as a live result's are."""
        if entry.spill:
            payload, buffers = self.journal.load_spill(entry.spill)
        else:
            payload, buffers = entry.result, entry.result_buffers
        return Encoded(payload, [memoryview(bytearray(b)) for b in buffers])

    def restore(self, prefix: str) -> list[tuple[Job, float | None]]:
        """Jobs to run again, in submission order, each with its retry delay if it waits for one.

        A job the stop interrupted gets a crash record for that attempt first.
        """
        st = self.journal.state
        wall = time.time()
        out: list[tuple[Job, float | None]] = []
        for e in st.unfinished():
            if e.state == RUNNING:
                self.journal.append(r.Failed(e.job, e.attempt, policy.CRASH, b"", "the supervisor stopped while this job ran", wall, wall))
            desc = oob.write(f"{prefix}r{e.job}", e.buffers) if e.buffers else b""
            fut = JobFuture()
            fut.job_id = e.job
            if self.drop_fetched:
                fut._on_fetch = self.fetched.append
            job = Job(e.job, fut, e.label, st.fns[e.fn], e.flags, e.args, desc, st.options[e.opts], e.key)
            job.attempt = e.attempt
            job.resume = e.checkpoint
            job.deps, job.dep_policy = tuple(e.deps), e.dep_policy
            if e.state == PENDING:
                job.state = PENDING
                if not e.history:  # never failed: it is a delayed job, due at its time
                    job.not_before = e.retry_at
                out.append((job, max(0.0, e.retry_at - wall)))
            else:
                out.append((job, None))
        self.journal.commit()
        if out:
            log.warning("journal_recovered", path=self.journal.path, jobs=len(out), pending=sum(1 for _, d in out if d is not None))
        return out

    def close(self) -> None:
        """Write and sync what is left; settle everything still held."""
        try:
            try:
                self.end_turn(final=True)
            finally:
                self.journal.close()
        except Exception as e:  # a dying disk must not hide why the loop ended
            log.error("journal_close_failed", error=repr(e))
        self.release()
