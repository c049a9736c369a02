"""How a run ends: the backend's events applied to the job they concern.

``Outcomes`` is a part of :class:`~procsched.supervisor.Supervisor` kept in
a module of its own (a mixin: the same object, the same loop thread, no
state of its own), as ``requests.py`` is. It takes each event the backend
reports for a run (``backends.Result``, ``Started``, ``Returned``,
``Lost``) and decides the job's fate:

* a result settles the future (``_settle``; under ``fsync="always"`` once
  its record is durable) and ``_finish`` drops the job and releases the
  jobs that waited for it;
* a failure is retried after its backoff (``PENDING`` and a timer) or ends
  the job, a crash or timeout out of attempts as a dead letter (``_failed``);
* a preempted or returned run goes back to the front of its lane without
  spending an attempt (``_requeue``);
* a run a cancel was stopping ends cancelled, whatever it did;
* timers (``_fire_timers``): a run past its deadline is killed and fails
  with ``JobTimeout``, a retry's backoff or a delayed job's time queues it,
  a schedule fires;
* the pool's end (``_shutdown``): queued jobs cancelled if asked, every job
  failed at once on ``terminate()`` or when the loop crashes (``_abandon``).
"""

from __future__ import annotations

import heapq
import time
from typing import TYPE_CHECKING, Any

from . import policy
from .errors import JobTimeout, PoolError, WorkerCrashed
from .futures import Encoded, EncodedError, describe, new
from .ipc import frames
from .jobs import Job, resolve
from .log import get_logger
from .model import CANCELLED, CRASHED, FAILED, PENDING, QUEUED, SUCCEEDED, TIMED_OUT
from .backends import Broken, Lost, Result, Returned, Started
from .requests import Requests

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

    from .backends import Backend
    from .schedules import Schedules

log = get_logger("procsched.supervisor")

#: how many finished jobs' outcomes are remembered for prerequisites given by id
_OUTCOMES_KEPT = 100_000
_TIMEOUT, _RETRY, _DUE, _CRON = 0, 1, 2, 3  # timer kinds: a run's deadline, a retry's backoff, a delayed job's time


class Outcomes(Requests):
    # the supervisor's, declared for the type checker
    killing: bool
    closing: bool
    now: float
    yielding: set[int]
    _rng: random.Random
    _hold: Callable[[tuple[Any, ...]], None] | None

    timers: list[tuple[float, int, int, int]]
    _timer_seq: Any  # itertools.count
    schedules: Schedules
    backend: Backend
    broken: BaseException | None

    # -- events ---------------------------------------------------------------
    def _event(self, ev: Any, now: float) -> None:
        t = type(ev)
        if t is Result:
            job = self.runs.get(ev.job_id)
            if job is None:
                return
            status = ev.status
            if status == frames.CHECKPOINT:
                job.resume = ev.payload
                if self.rec is not None:
                    self.rec.checkpoint(job, ev.payload)
                return
            self._end_run(job)
            self.timings.runs.append(ev.run_us / 1e6)
            if job.withdrawing is not None and status != frames.PREEMPTED:  # it ran after all: not cancelled
                self._withdrawn(job, False)
            if job.cancelling or job.withdrawing is not None:  # a cancel said True (or a preempted run stops here)
                self._cancelled_running(job)
            elif status == frames.OK:
                if self.rec is not None:
                    self.rec.succeeded(job, ev.payload, ev.buffers)
                value = new(Encoded, (ev.payload, ev.buffers))
                self._settle(job, value, None)
                self._finish(job, SUCCEEDED, value)
            elif status == frames.ERROR:
                self._failed(job, policy.ERROR, EncodedError(ev.payload), frames.error_types(ev.payload), now)
            else:  # PREEMPTED
                self.stats.preempted += 1
                job.resume = ev.payload
                self._requeue(job, True)
        elif t is Started:
            job = self.runs.get(ev.job_id)
            if job is not None and job.opts.timeout is not None:
                self._timer(ev.at + job.opts.timeout, _TIMEOUT, ev.job_id)
        elif t is Returned:
            job = self.runs.get(ev.job_id)
            if job is not None:
                self._end_run(job)
                if job.cancelling or job.withdrawing is not None:
                    self._cancelled_running(job)
                else:
                    self._requeue(job, False)
        elif t is Lost:
            job = self.runs.get(ev.job_id)
            if job is None:
                return
            self._end_run(job)
            if job.cancelling or job.withdrawing is not None:
                self._cancelled_running(job)
            elif ev.killed_for == "preempt":
                self.stats.preempted += 1
                self._requeue(job, True)
            else:
                err: WorkerCrashed = ev.error.for_job(f"{job.label}#{job.id}")
                self._failed(job, policy.CRASH, err, (), now)
        elif t is Broken:
            self._break(ev.error)

    def _break(self, error: BaseException) -> None:
        """No job can ever run (a worker's initializer raised): as a broken ``ProcessPoolExecutor``,
        every job not finished fails with ``error``, the workers go, and later submits raise it."""
        if self.broken is not None:
            return
        self.broken = error
        self.closing = self.killing = True
        self.schedules.stopped = True
        self._abandon(error)

    def _shutdown(self, cancel_futures: bool, kill: bool) -> None:
        self.closing = True
        self.schedules.stopped = True
        self.killing = self.killing or kill  # (before cancelling: terminate() cancels nothing in the journal)
        if cancel_futures or kill:
            for job in list(self.jobs.values()):
                if job.id not in self.jobs:  # a cancel cascaded to it already
                    continue
                if not job.dispatched and job.future.cancel():
                    job.future.notify_cancelled()
                    self._finish(job, CANCELLED)
        if kill:
            self._abandon(PoolError("the pool was terminated while this job ran"))

    def _abandon(self, error: BaseException) -> None:
        """Fail every job now (terminate(), or the loop crashed).

        The journal records nothing of it: terminate() (and Ctrl-C) stop this
        process's work, they do not cancel it, so the jobs run again when the
        journal is reopened, as they would after a crash.
        """
        for job in list(self.jobs.values()):
            if job.id not in self.jobs:  # a cancel cascaded to it already
                continue
            if job.run:
                self._end_run(job)  # a late outcome of this run must find nothing to settle
            fut = job.future
            if job.dispatched or fut.set_running_or_notify_cancel():  # (a cancelled one is notified)
                if not fut.done():
                    resolve(fut, None, error, job.followers)
                self._finish(job, FAILED)
            else:
                self._finish(job, CANCELLED)

    def _end_run(self, job: Job) -> None:
        del self.runs[job.run]
        if self.yielding:
            self.yielding.discard(job.run)
        job.run = 0

    def _requeue(self, job: Job, preempted: bool) -> None:
        """Back to the front of its lane, without spending an attempt."""
        if self.rec is not None:
            self.rec.requeued(job, preempted)
        job.state = QUEUED
        self.queue.push(job.id, job.opts.priority, job.opts.hot, job.queued_at, front=True)

    def _failed(self, job: Job, kind: str, error: BaseException, types: Any, now: float) -> None:
        if job.cancelling:  # pool.cancel(kill=True) came first: it ends cancelled, not retried
            self._cancelled_running(job)
            return
        if job.withdrawing is not None:  # it ran (and timed out) before its worker could give it back
            self._withdrawn(job, False)
        if job.history is None:
            job.history = []
        job.history.append((job.attempt, kind, describe(error), time.time()))
        retry = job.opts.retries
        if policy.should_retry(retry, job.attempt, kind, types):
            delay = policy.backoff(retry, job.attempt, self._rng.random())
            log.info("retry", job=job.id, name=job.label, attempt=job.attempt, kind=kind, pid=getattr(error, "pid", None), error=describe(error), delay=round(delay, 3))
            if self.rec is not None:
                self.rec.failed(job, kind, error, delay)
            self.stats.retried += 1
            job.attempt += 1
            job.state = PENDING
            self._timer(now + delay, _RETRY, job.id)
            return
        if kind == policy.CRASH:
            log.warning("job_crashed", job=job.id, name=job.label, attempt=job.attempt, pid=getattr(error, "pid", None), error=str(error))
        if self.rec is not None:
            self.rec.failed(job, kind, error, None)
        if kind != policy.ERROR:  # out of attempts after a crash or a timeout: kept to inspect and resubmit
            self.dead.add(self._dead_letter(job, CRASHED if kind == policy.CRASH else TIMED_OUT))
        self._settle(job, None, error)
        self._finish(job, {policy.ERROR: FAILED, policy.CRASH: CRASHED, policy.TIMEOUT: TIMED_OUT}[kind])

    def _finish(self, job: Job, state: str, result: Encoded | None = None) -> None:
        job.state = state
        del self.jobs[job.id]
        if job.oob:
            job.release_args()
        self.timings.finishes.append(self.now)
        outcomes = self.outcomes
        outcomes[job.id] = state == SUCCEEDED
        if len(outcomes) >= _OUTCOMES_KEPT:  # two generations: between half and all of them are kept
            self.outcomes_old, self.outcomes = outcomes, {}
        if job.dependents:
            self._release_dependents(job, state == SUCCEEDED, result, self.now)
        s = self.stats
        if state == SUCCEEDED:
            s.succeeded += 1
        elif state == CANCELLED:
            s.cancelled += 1
            if self.rec is not None and not self.killing:  # a caller's cancel, not terminate()
                self.rec.cancelled(job)
            for fut in job.followers or ():
                if fut.cancel():
                    fut.notify_cancelled()
        else:
            s.failed += 1
            if state == CRASHED:
                s.crashed += 1
            elif state == TIMED_OUT:
                s.timed_out += 1

    # -- settling, and the journal ---------------------------------------------
    def _settle(self, job: Job, result: Any, error: BaseException | None) -> None:
        if self._hold is not None:  # fsync="always": once the turn's records are durable
            self._hold((job.future, result, error, job.followers))
        elif error is None and not job.followers:
            job.future.set_result(result)  # (resolve's common case, one call fewer per job)
        else:
            resolve(job.future, result, error, job.followers)

    def _promote(self, job: Job) -> bool:
        """The job's own future was cancelled: let a follower's future own it, if any still waits."""
        while job.followers:
            fut = job.followers.pop(0)
            if fut.set_running_or_notify_cancel():
                job.future = fut
                return True
        return False

    # -- timers ---------------------------------------------------------------
    def _timer(self, when: float, kind: int, ref: int) -> None:
        heapq.heappush(self.timers, (when, next(self._timer_seq), kind, ref))

    def _fire_timers(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            _, _, kind, ref = heapq.heappop(timers)
            if kind == _TIMEOUT:
                job = self.runs.get(ref)
                if job is None or job.opts.timeout is None:
                    continue
                log.warning("job_timeout", job=job.id, name=job.label, attempt=job.attempt, timeout=job.opts.timeout)
                self.backend.kill(ref, "timeout", now)
                self._end_run(job)
                self._failed(job, policy.TIMEOUT, JobTimeout(job.opts.timeout, f"{job.label}#{job.id}"), (), now)
            elif kind == _CRON:
                self.schedules.due(ref, time.time())
            else:
                job = self.jobs.get(ref)
                if job is not None and job.state == PENDING:
                    job.state = QUEUED
                    if kind == _DUE:  # it starts waiting now: aging counts from here
                        job.queued_at = now
                    self.queue.push(job.id, job.opts.priority, job.opts.hot, job.queued_at, front=kind == _RETRY)
