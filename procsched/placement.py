"""Placing jobs: the ready queue's head handed to the backend, and room made for hot jobs.

``Placement`` is a part of :class:`~procsched.supervisor.Supervisor` kept in
a module of its own (a mixin: the same object, the same loop thread, no
state of its own), as ``outcomes.py`` and ``requests.py`` are. Once a turn,
after the events are applied, ``_dispatch``:

* places hot jobs on idle workers, each as its own ``Dispatch`` frame;
* while a hot job still waits, asks the lowest-ranked running cold runs to
  yield (``_preempt``; a ``preempt="kill"`` run is killed past its grace)
  and places no cold work, so the first worker to come free takes it;
* otherwise places as many cold jobs as the backend has room for
  (``headroom``: its prefetch, or Ray's window) in one batch.

A job is claimed as it is placed (``_claim``): its future becomes running,
or it is settled cancelled if its caller cancelled it while it queued.
Each placement is a new run id (``_dispatch_frame``), which is what the
backend reports back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .ipc import frames
from .jobs import Job
from .log import get_logger
from .model import CANCELLED, QUEUED, RUNNING
from .outcomes import Outcomes

if TYPE_CHECKING:
    from .model import PoolConfig

log = get_logger("procsched.supervisor")


class Placement(Outcomes):
    # the supervisor's, declared for the type checker
    config: PoolConfig
    _run_ids: Any

    def _dispatch_frame(self, job: Job) -> frames.Dispatch:
        rid = next(self._run_ids)
        job.run = rid
        job.state = RUNNING
        self.runs[rid] = job
        self.timings.waits.append(self.now - job.queued_at)
        flags = job.flags | (frames.F_CHECKPOINT_LIVE if job.opts.preempt == "kill" else 0)
        return frames.new(frames.Dispatch, (rid, job.attempt, flags, job.fn, job.args, job.resume, job.oob, job.id))

    def _claim(self, job: Job | None) -> bool:
        """Whether a popped queue entry is a job to run now (cancelled ones are settled)."""
        if job is None or job.state != QUEUED:
            return False
        if not job.dispatched:
            if not job.future.set_running_or_notify_cancel() and not self._promote(job):
                self._finish(job, CANCELLED)
                return False
            job.dispatched = True
        return True

    def _dispatch(self, now: float, booting: bool = False) -> None:
        if self.draining:
            return
        q, backend, jobs = self.queue, self.backend, self.jobs
        while q.hot and backend.idle_workers():
            job = jobs.get(q.pop_hot())
            if self._claim(job):
                assert job is not None
                backend.start_hot(self._dispatch_frame(job), job.opts.timeout is not None)
                if self.rec is not None:
                    self.rec.dispatched(job, backend.worker_of(job.run))
        while (head := q.peek_hot()) is not None and _stale(jobs.get(head)):  # cancelled while waiting
            self._claim(jobs.get(q.pop_hot()))  # settles it
        if q.hot:
            self._preempt(q.hot, now)
            return  # cold work waits while a hot job does: a worker must come free
        if self.yielding:
            self._cancel_yields()
        if not q.cold:
            return
        room = backend.headroom(booting)
        if not room:
            return
        batch: list[frames.Dispatch] = []
        track: list[int] = []
        while room:
            taken = q.take_cold(room)
            if not taken:
                break
            for job_id in taken:
                job = jobs.get(job_id)
                if not self._claim(job):
                    continue  # (taken again: room is what was placed)
                assert job is not None
                batch.append(self._dispatch_frame(job))
                if job.opts.timeout is not None:
                    track.append(job.run)
                room -= 1
        if batch:
            backend.start(batch, track, booting)
            if self.rec is not None:  # after start: the record names the worker (a job given back is requeued)
                for d in batch:
                    self.rec.dispatched(self.runs[d.job_id], backend.worker_of(d.job_id))

    def _preempt(self, waiting: int, now: float) -> None:
        # Executors already coming free (a worker that yielded or was killed for a hot
        # job, starting again or giving its prefetch back) count: one hot job, one victim.
        need = waiting - len(self.yielding) - self.backend.coming_free()
        if need <= 0:
            return
        victims = [
            self.runs[rid]
            for rid in self.backend.running()
            if rid in self.runs and not self.runs[rid].opts.hot and rid not in self.yielding
        ]
        victims.sort(key=lambda j: self.queue.rank(j.opts.priority, j.queued_at), reverse=True)
        for job in victims:
            if need <= 0:
                break
            grace = self.config.preempt_grace if job.opts.preempt == "kill" else None
            if self.backend.request_yield(job.run, grace, now):  # (refused: the next one is asked)
                need -= 1
                self.yielding.add(job.run)
                log.info("preempt", job=job.id, name=job.label, attempt=job.attempt, policy=job.opts.preempt)

    def _cancel_yields(self) -> None:
        for rid in self.yielding:
            self.backend.cancel_yield(rid)
        self.yielding.clear()


def _stale(job: Job | None) -> bool:
    """A queue entry that will never run: gone, no longer queued, or cancelled by its caller
    (and by every caller that submitted its key since)."""
    return job is None or job.state != QUEUED or (job.future.cancelled() and not any(not f.cancelled() for f in job.followers or ()))
