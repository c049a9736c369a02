"""What a running pool does besides the hot path: its job graph and the requests callers make.

``Requests`` is a part of :class:`~procsched.supervisor.Supervisor` kept in
a module of its own (a mixin: the same object, the same single loop thread,
no state of its own). It holds

* the dependency graph: ``_link`` counts a new job's unfinished
  prerequisites, ``_release_dependents`` settles the jobs that waited for
  one that finished (a failure cancels them per ``on_failure``; a
  continuation gets the result's bytes);
* the requests ``pool.cancel``, ``reprioritize``, ``resubmit``, ``purge``,
  ``dead_letters`` and ``jobs`` make through ``Supervisor._asks``, and the
  service's ``show``, ``status`` and stored outcomes;
* ``snapshot``, the counters ``pool.stats()`` reads from any thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from .futures import Encoded, JobFuture
from .ipc import frames, oob
from .jobs import Job, Later, then_arguments
from .ledger import DeadLetter, DeadLetters
from .log import get_logger
from .journal.state import describe as describe_entry
from .errors import JobTimeout, PoolError, WorkerCrashed
from .model import CANCELLED, CRASHED, FAILED, PENDING, QUEUED, RUNNING, SUCCEEDED, TIMED_OUT, make_options

if TYPE_CHECKING:
    from .heap import ReadyQueue
    from .jobs import Stats
    from .ledger import Timings
    from .recorder import Recorder
    from .backends import Backend
    from .model import PoolConfig

log = get_logger("procsched.supervisor")

WAITING = "waiting"  # for prerequisites (the supervisor's own state: the journal keeps it queued)


class Requests:
    # the supervisor's, declared for the type checker
    jobs: dict[int, Job]
    rec: Recorder | None
    queue: ReadyQueue
    backend: Backend
    dead: DeadLetters
    prefix: str
    outcomes: dict[int, bool]
    outcomes_old: dict[int, bool]
    new_id: Any
    runs: dict[int, Job]
    draining: bool
    config: PoolConfig
    stats: Stats
    timings: Timings

    if TYPE_CHECKING:

        def _finish(self, job: Job, state: str, result: Encoded | None = None) -> None: ...
        def _admit(self, job: Job, now: float) -> None: ...
        def _ready(self, job: Job, now: float) -> None: ...

    # -- prerequisites ----------------------------------------------------------
    def _link(self, job: Job) -> bool:
        """Count the prerequisites still to finish; settle what the finished ones mean.

        False when one that failed has cancelled this job. Prerequisites
        always have smaller ids (they exist when this job is submitted), so
        no cycle can form.
        """
        futures = {f.job_id: f for f in job.dep_futures}
        waiting = 0
        for dep_id in job.deps:
            dep = self.jobs.get(dep_id)
            if dep is not None:
                if dep.dependents is None:
                    dep.dependents = []
                dep.dependents.append(job.id)
                waiting += 1
                continue
            ok, result = self._outcome(dep_id, futures.get(dep_id))
            if not self._prerequisite_done(job, dep_id, ok, result):
                return False
        job.waiting = waiting
        return True

    def _outcome(self, job_id: int, fut: JobFuture | None) -> tuple[bool, Encoded | None]:
        """How a finished job ended: (succeeded, its result when known)."""
        if fut is not None and fut.done():
            return not fut.cancelled() and fut._exception is None, fut.encoded_result()
        if self.rec is not None:
            stored = self.rec.outcome(job_id)
            if stored is not None:
                return stored
        ok = self.outcomes.get(job_id, self.outcomes_old.get(job_id))
        return (True if ok is None else ok), None  # (None: gone from every record, it ended long ago)

    def _prerequisite_done(self, job: Job, dep_id: int, ok: bool, result: Encoded | None) -> bool:
        """One prerequisite of ``job`` finished; False if that cancelled ``job``."""
        then = job.flags & frames.F_THEN
        if (not ok and (job.dep_policy == "cancel" or then)) or (then and result is None):
            log.info("dependency_cancelled", job=job.id, name=job.label, prerequisite=dep_id)
            if job.future.cancel():
                job.future.notify_cancelled()
            self._finish(job, CANCELLED)
            return False
        if then:
            assert result is not None
            job.args = then_arguments(job.args, result)
            job.flags &= ~frames.F_THEN
            if self.rec is not None:  # so a restart need not find the result again
                self.rec.released(job)
        return True

    def _release_dependents(self, job: Job, ok: bool, result: Encoded | None, now: float) -> None:
        for did in job.dependents or ():
            d = self.jobs.get(did)
            if d is None or d.state != WAITING:
                continue
            if self._prerequisite_done(d, job.id, ok, result):
                d.waiting -= 1
                if not d.waiting:
                    self._ready(d, now)

    def _cancel(self, job_id: int, kill: bool, now: float) -> bool | Later:
        """``pool.cancel``: a job not started is cancelled; a running one only with ``kill``.
        A job placed on a worker that may have begun it: the answer comes with the run's end."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if not job.dispatched:
            if job.future.cancel():
                job.future.notify_cancelled()
            self._finish(job, CANCELLED)  # its queue entry or timer finds it gone
            return True
        if job.cancelling:
            return True
        if job.state in (PENDING, QUEUED):  # between attempts, or back in the queue (preempted): nothing runs
            self._cancelled_running(job)
            return True
        if job.withdrawing is not None and not kill:  # asked already: the same answer
            return job.withdrawing
        back = self.backend.withdraw(job.run)  # placed but maybe not begun
        if back:  # it comes back unrun
            job.cancelling = True
            return True
        if back is None and not kill:  # its worker was between jobs: the run's end says whether it began
            job.withdrawing = Later()  # True if it comes back unrun, False if it ran after all
            return job.withdrawing
        if kill and self.backend.kill(job.run, "cancel", now):
            log.info("job_cancel_kill", job=job.id, name=job.label, attempt=job.attempt)
            job.cancelling = True
            return True
        return False

    def _withdrawn(self, job: Job, cancelled: bool) -> None:
        """The run a cancel tried to take back has ended: say whether it was cancelled."""
        answer, job.withdrawing = job.withdrawing, None
        if answer is not None:
            answer.give(cancelled)

    def _cancelled_running(self, job: Job) -> None:
        self._withdrawn(job, True)
        job.future.cancel_running()
        for fut in job.followers or ():
            fut.cancel_running()
        job.followers = None
        self._finish(job, CANCELLED)

    def _reprioritize(self, job_id: int, priority: int, now: float) -> bool:
        """A job not yet started gets a new priority (and keeps its place among equals)."""
        job = self.jobs.get(job_id)
        if job is None or job.dispatched:
            return False
        job.opts = msgspec.structs.replace(job.opts, priority=priority)
        if self.rec is not None:
            self.rec.changed(job)
        if job.state == QUEUED and self.queue.remove(job.id):
            self.queue.push(job.id, priority, job.opts.hot, job.queued_at)
        return True

    # -- dead letters and introspection -------------------------------------------
    def _dead_letter(self, job: Job, state: str) -> DeadLetter:
        buffers = [bytes(b) for b in oob.read(job.oob, False)] if job.oob else []
        return DeadLetter(job.id, job.label, job.key, job.fn, job.flags, job.args, buffers, job.opts, state, list(job.history or ()), time.time())

    def _resubmit(self, job_id: int, changes: dict[str, Any]) -> JobFuture:
        """A dead letter as a new job (with changed options); it leaves the dead letters."""
        letter = self.dead.by_job.get(job_id)
        if letter is None:
            raise KeyError(f"no dead letter for job {job_id}")
        opts = make_options(letter.opts, changes)
        self.dead.take(job_id)
        if self.rec is not None:
            self.rec.journal.drop([job_id], "resubmitted")
        fut = JobFuture()
        fut.job_id = self.new_id()
        desc = oob.write(f"{self.prefix}d{fut.job_id}", letter.buffers) if letter.buffers else b""
        self._admit(Job(fut.job_id, fut, opts.name or letter.label, letter.fn, letter.flags, letter.args, desc, opts, letter.key), time.monotonic())
        return fut

    def _purge(self, job_id: int | None) -> int:
        gone = self.dead.purge(job_id)
        if gone and self.rec is not None:
            self.rec.journal.drop(gone, "purged")
        return len(gone)

    def _jobs(self, state: str | None, tag: str | None, name: str | None) -> list[dict[str, Any]]:
        out = []
        for job in self.jobs.values():
            if (state is None or job.state == state) and (tag is None or tag in job.opts.tags) and (name is None or job.label == name):
                out.append({
                    "job": job.id, "name": job.label, "state": job.state, "attempt": job.attempt, "priority": job.opts.priority,
                    "hot": job.opts.hot, "tags": list(job.opts.tags), "key": job.key, "waiting_for": job.waiting or None,
                })  # fmt: skip
        for letter in self.dead.by_job.values():
            if (state in (None, "dead", letter.state)) and (tag is None or tag in letter.opts.tags) and (name is None or letter.label == name):
                out.append({**letter.describe(), "dead_letter": True})
        if self.rec is not None:  # finished jobs the journal keeps (dead letters are listed above)
            st = self.rec.journal.state
            for job_id in st.finished:
                e = st.jobs[job_id]
                tags = st.options[e.opts].tags
                if not e.dead and (state is None or e.state == state) and (tag is None or tag in tags) and (name is None or e.label == name):
                    out.append({**describe_entry(e), "tags": list(tags)})
        return out

    # -- for the service: one job, a stored outcome, the workers ---------------------
    def _show(self, job_id: int) -> dict[str, Any]:
        """Everything known of one job: live, dead-lettered, or finished and journaled."""
        job = self.jobs.get(job_id)
        if job is not None:
            o = job.opts
            return {
                "job": job.id, "name": job.label, "state": job.state, "attempt": job.attempt, "key": job.key,
                "priority": o.priority, "hot": o.hot, "timeout": o.timeout, "retries": o.retries.retries,
                "tags": list(o.tags), "waiting_for": job.waiting or None, "not_before": job.not_before or None,
                "depends_on": list(job.deps), "history": [list(h) for h in job.history or ()],
                "worker": self.backend.worker_of(job.run) if job.run else None,
            }  # fmt: skip
        letter = self.dead.by_job.get(job_id)
        if letter is not None:
            return {**letter.describe(), "dead_letter": True}
        if self.rec is not None:
            e = self.rec.journal.state.jobs.get(job_id)
            if e is not None:
                return {**describe_entry(e), "history": [list(h) for h in e.history]}
        raise KeyError(f"no job {job_id}")

    def _stored(self, job_id: int) -> tuple[str, Any] | None:
        """How a job the journal holds as finished ended, for a client asking after a restart:
        ("ok", Encoded), ("raised", the job's encoded exception), ("error", an exception
        of procsched's own) or ("cancelled", None); None if the journal does not know it."""
        if self.rec is None:
            return None
        e = self.rec.journal.state.jobs.get(job_id)
        if e is None or e.state in (QUEUED, PENDING, RUNNING):
            return None
        if e.state == SUCCEEDED:
            try:
                return "ok", self.rec.stored_result(e)
            except Exception:  # a spill file gone: the result is lost, run it again
                return None
        if e.state == CANCELLED:
            return "cancelled", None
        if e.state == FAILED and e.error:
            return "raised", e.error
        label = f"{e.label}#{e.job}"
        if e.state == TIMED_OUT:
            return "error", JobTimeout(self.rec.journal.state.options[e.opts].timeout or 0.0, label)
        if e.state == CRASHED:
            return "error", WorkerCrashed(None, 0, label)
        return "error", PoolError(f"job {label} failed: {e.message}")

    def _reconfigure(self, config: PoolConfig) -> None:
        """``pool.reconfigure`` (SIGHUP's live changes): the checked settings, from this turn on."""
        self.config = self.backend.config = config
        self.backend.resize(config.max_workers, time.monotonic())

    def _status(self, now: float) -> dict[str, Any]:
        """Workers (pid, RSS, current job, uptime), queue depth per lane, running count."""
        def job_of(run: int) -> tuple[int, str] | None:
            job = self.runs.get(run)
            return None if job is None else (job.id, job.label)

        workers = self.backend.workers_status(now, job_of)
        return {
            "workers": workers, "degraded": self.backend.degraded, "restarts": self.backend.restarts,
            "queued_hot": self.queue.hot, "queued_cold": self.queue.cold, "running": len(self.runs),
            "jobs": len(self.jobs), "draining": self.draining,
        }  # fmt: skip

    # -- reading (any thread; values may be a turn old) -------------------------
    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats.as_dict())
        out["queued"] = len(self.queue)
        out["queued_hot"], out["queued_cold"] = self.queue.hot, self.queue.cold
        out["jobs"] = len(self.jobs)
        by_state: dict[str, int] = {}
        for job in list(self.jobs.values()):
            by_state[job.state] = by_state.get(job.state, 0) + 1
        out["by_state"] = by_state
        out["dead_letters"] = len(self.dead.by_job)
        out.update(self.timings.summary(time.monotonic()))
        out.update(self.backend.stats())
        return out
