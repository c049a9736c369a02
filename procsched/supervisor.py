"""The supervisor: one event loop that owns every job from submit to outcome.

A job's path::

    submit() (caller thread)         pickles the call, builds a Job, post()s it
      │ intake deque (+ doorbell if the loop sleeps)
      ▼
    _intake        QUEUED: job table, ready queue (hot lane, cold lane)
      ▼
    _dispatch      RUNNING: a fresh run id, a Dispatch frame to the backend
      │            (hot: an idle worker, else ask the lowest-ranked cold run to yield)
      ▼
    backend        worker rings; reports Result / Started / Lost / Returned
      ▼
    _event         SUCCEEDED → future.set_result(Encoded bytes)
                   FAILED / CRASHED / TIMED_OUT → retry later (PENDING + timer) or
                   future.set_exception; preempted or returned → QUEUED at the front
      ▼
    _finish        drop the job, unlink its argument segment

Everything in this list is mutated by the loop alone (``_turn``); the
caller's threads only ``post()`` messages. Run ids (not job ids) cross to
the backend, so a late event from an abandoned run (a killed worker, a
retried job) is recognised and ignored. The loop sleeps in one ``poll``
over the doorbell (rung by workers and by ``post``) and every worker's
pidfd, with the timeout set to the next timer (or a 1 s backstop, see
``lending.BACKSTOP_MS``); work and deaths wake it, it does not poll for them.

The loop is one role that one thread at a time plays, the holder of
``baton``: the supervisor's thread, except while it sleeps, when a caller
about to wait for the loop may run its turns instead (``lending.py``: a
round trip then costs two thread wakes, not four). DESIGN.md's "one loop
alone owns the job table, no locks around scheduling state" holds with that
reading: the baton is the loop's, taken once per stretch of turns, never
around a single piece of state.

With a journal (``self.rec``, see ``recorder.py``), each step above is
also a record: ``_admit`` writes the submit (or answers a known key from
the journal), ``_dispatch`` the placement, ``_event`` and ``_failed`` the
outcome, and the end of every turn commits them with one write. A pool
opened on a journal starts with the jobs it had not finished
(``_restore``).

Placing jobs on the backend (``_dispatch``, hot jobs and preemption) is
``placement.py``; how a run's end decides the job's fate (``_event``,
``_failed``, ``_finish``, the timers, shutdown) is ``outcomes.py``; the
dependency graph, the requests callers make of a running pool (cancel,
reprioritize, dead letters, listing) and ``snapshot`` are ``requests.py``:
all three are the same object, mixins of this class. Recurring schedules
are in ``schedules.py``.

Under ``procsched serve`` the loop also serves the clients' sockets
(``self.front``, see ``server.py``): their fds are in the same poll, their
requests are handled in the turn they arrive, and outcomes go out at the
end of the turn they settle in.

It never unpickles anything (futures decode on the caller's side) and never
imports cloudpickle.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from .errors import PoolError
from .futures import JobFuture
from .heap import ReadyQueue
from .ipc import oob
from .ipc.doorbell import Doorbell
from .jobs import Job, Later, Stats
from .journal import records as r
from .log import get_logger
from .model import PENDING, QUEUED, JournalConfig, PoolConfig
from .ledger import DeadLetter, DeadLetters, Timings
from .lending import Lending, sleep_ms
from .recorder import Recorder
from .outcomes import _CRON, _DUE, _RETRY
from .placement import Placement
from .requests import WAITING
from .schedules import Schedules
from .backends import Backend, Lendable, Local, Spec

log = get_logger("procsched.supervisor")


class Supervisor(Lending, Placement):
    def __init__(
        self, config: PoolConfig, prefix: str, journal: JournalConfig | None = None, backend: Spec | None = None, init: bytes = b""
    ) -> None:
        self.config = config
        self.prefix = prefix
        # The journal (None without one), opened first: a locked or damaged
        # journal fails the pool before anything else is made.
        self.rec = None if journal is None else Recorder(journal)
        try:
            self.bell = Doorbell.create()
            self.lent_bell = Doorbell.create()  # rung instead while a caller has borrowed the loop
            try:
                self.backend: Backend = (backend or Local()).open(config, prefix, self.bell, self.lent_bell, init)
            except BaseException:
                self.bell.close()
                self.lent_bell.close()
                raise
        except BaseException:
            if self.rec is not None:
                self.rec.close()
            raise
        self.queue = ReadyQueue(config.aging_rate)
        self.jobs: dict[int, Job] = {}
        self.runs: dict[int, Job] = {}
        self.timers: list[tuple[float, int, int, int]] = []
        self.yielding: set[int] = set()
        self.intake: deque[Any] = deque()
        #: whoever runs the loop sleeps and must be rung (by ``sleeper``) for what is posted
        self.sleeping = False
        self.sleeper = self.bell
        #: held by the thread that runs the loop now (see ``lending.py``)
        self.baton = threading.Lock()
        self.holder = 0  # that thread's ident (0: the loop sleeps)
        self.lendable = self.backend.lendable
        self.lends = 0  # how many times the loop was lent (the loop thread's poll result may be stale)
        self.loop_wake = float("inf")  # when the loop's thread, asleep, wakes on its own
        self.lent_failure: BaseException | None = None  # a borrowed turn raised: the loop's thread fails the pool
        self.idle = False  # when the loop went to sleep, a worker had nothing to do
        self.ended = False
        self.crashed: BaseException | None = None
        #: a worker's initializer raised: every job fails with this, and every submit raises it
        self.broken: BaseException | None = None
        self._ended_lock = threading.RLock()  # (reentrant: a dropped pool's finalizer may post from a GC under it)
        self.exiting = False  # interpreter exit has begun (at_exit): submits raise
        self.closing = False
        self.killing = False
        #: a service stopping: queued jobs stay queued (and journaled), running ones may finish
        self.draining = False
        self.drained: threading.Event | None = None  # set once draining and no job runs
        #: (interval, callback) the loop calls every ``interval`` seconds (systemd's watchdog)
        self.heartbeat: tuple[float, Callable[[], None]] | None = None
        self.beat_at = float("inf")
        #: the service's socket front door (``server.Front``), served by this loop once attached
        self.front: Any = None
        #: called (from the loop's thread) once the loop has ended, for whatever reason
        self.on_end: Callable[[], None] | None = None
        self.stop_grace = 0.0  # terminate(): how long workers get to stop before SIGKILL
        self.stats = Stats()
        #: the loop's clock, read once per turn (per-job bookkeeping reads this, not the clock)
        self.now = time.monotonic()
        # job id -> succeeded, of recently finished jobs (for prerequisites given by id)
        self.outcomes: dict[int, bool] = {}
        self.outcomes_old: dict[int, bool] = {}
        self._run_ids = itertools.count(1)
        self._timer_seq = itertools.count()
        self._rng = random.Random()
        self.thread = threading.Thread(target=self._main, name="procsched-supervisor", daemon=True)
        self.new_id: Callable[[], int] = itertools.count(1).__next__  # the pool's, once it has one
        self.dead = DeadLetters()
        self.timings = Timings()
        self.schedules = Schedules(
            self._schedule_job,
            lambda job: self._admit(job, time.monotonic()),
            lambda job_id: self._cancel(job_id, True, time.monotonic()),
            self.jobs.__contains__,
            lambda delay, handle: self._timer(time.monotonic() + delay, _CRON, handle),
            None if self.rec is None else self.rec.journal.append,
        )
        # requests a caller waits on: ("name", *args, answer list, done event)
        self._asks: dict[str, Callable[..., Any]] = {
            "cancel": lambda job_id, kill: self._cancel(job_id, kill, time.monotonic()),
            "reprioritize": lambda job_id, priority: self._reprioritize(job_id, priority, time.monotonic()),
            "schedule": lambda spec, replace: self.schedules.add(spec, time.time(), replace),
            "unschedule": self.schedules.remove,
            "pause": lambda name, paused: self.schedules.pause(name, paused, time.time()),
            "trigger": self.schedules.trigger,
            "schedules": self.schedules.snapshot,
            "resubmit": self._resubmit,
            "purge": self._purge,
            "dead_letters": self.dead.listing,
            "list_jobs": self._jobs,
            "show": self._show,
            "status": lambda: self._status(time.monotonic()),
            "reconfigure": self._reconfigure,
        }
        # Under fsync="always" futures settle once their records are durable.
        self._hold = self.rec.hold if self.rec is not None and self.rec.always else None
        #: futures of the jobs a journal brought back, by job id
        self.recovered: dict[int, JobFuture] = {}
        self.first_job_id = 1
        if self.rec is not None:
            try:
                self._restore(time.monotonic())
            except BaseException:
                self.backend.close(time.monotonic())  # (nothing started yet: it lets go of what it holds)
                self.rec.close()
                self.bell.close()
                self.lent_bell.close()
                oob.sweep(prefix)  # argument segments of the jobs restored so far
                raise
            self.first_job_id = self.rec.journal.state.next_job

    # -- the only entry points for other threads: start, and post() or lend() (lending.py)
    def start(self) -> None:
        self.thread.start()

    # -- the loop -------------------------------------------------------------
    def at_exit(self) -> None:
        """Interpreter exit (the pool's atexit hook, bound to this and not to the pool): the
        accepted jobs finish, as the stdlib's executors wait for theirs, then the loop ends."""
        self.exiting = True
        self.post(("shutdown", False, False, 0.0))
        if not self.on_loop():
            self.thread.join()

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the loop must not vanish silently: fail every job
            log.exception("supervisor_crashed", error=repr(e))
            self.crashed = e
            self._abandon(PoolError(f"the pool's supervisor crashed: {e!r}"))
            self.backend.close(time.monotonic())
        finally:
            if self.rec is not None:
                self.rec.close()
            oob.sweep(self.prefix)
            with self._ended_lock:
                self.ended = True
                self.bell.close()
                self.lent_bell.close()
            self._refuse_intake()
            if self.on_end is not None:
                self.on_end()

    def _loop(self) -> None:
        backend = self.backend
        poller = backend.poller
        watcher = cast("Lendable", backend) if backend.lendable else None
        baton = self.baton
        baton.acquire()  # (kept once the loop ends: nobody can borrow an ended loop)
        self.holder = threading.get_ident()
        backend.spawn_all(time.monotonic())
        ready: list[tuple[int, int]] = []
        while True:
            now = self.now = time.monotonic()
            self._turn(now, ready)
            if self.closing and not self.jobs and not self.intake:
                break
            if self.front is not None and watcher is not None and (spin := watcher.spin_for()):
                # The service's loop shares its GIL with no caller: with short jobs about, it
                # watches the rings and the sockets a while before it sleeps, so the next
                # outcome or request needs no wake-up (see lending.py for the embedded pool's)
                seen = watcher.watch(time.monotonic() + spin, self.intake, poller)
                if seen is not None:
                    if any(fd == self.bell.read_fd for fd, _ in seen):
                        self.bell.drain()  # (or every later watch would see it rung)
                    ready = seen
                    continue
            wake = self._next_wake()
            self.sleeping = True
            self.idle = backend.idle_workers() > 0
            if self.intake or not backend.prepare_sleep():
                ready = poller.poll(0)  # work arrived while we looked: only check for deaths
                self.sleeping = False
                backend.woke()
                continue
            timeout = sleep_ms(wake)  # (no timer: a lost wakeup still costs at most the backstop)
            self.loop_wake, lends = wake, self.lends
            self.holder = 0
            baton.release()  # asleep, the loop may be borrowed (lending.py)
            try:
                ready = poller.poll(timeout)
            finally:
                baton.acquire()
                self.holder = threading.get_ident()
            if self.lent_failure is not None:
                raise self.lent_failure
            if self.lends != lends:  # a caller ran the loop meanwhile: what the poll saw is stale
                ready = poller.poll(0)
            self.sleeping = False
            self.loop_wake = float("inf")
            self.bell.drain()
            backend.woke()
        backend.close(time.monotonic() + (self.stop_grace if self.killing else self.config.stop_timeout))

    def _turn(self, now: float, ready: list[tuple[int, int]]) -> None:
        """One turn of the loop, by whichever thread holds the baton: take what was posted
        and what the backend reports (``ready``: what the poll saw), fire due timers,
        place jobs, commit the journal."""
        backend = self.backend
        if self.intake:
            self._intake(now)
        if self.front is not None and ready:
            self.front.collect(ready)
        self._events(backend.collect(now, ready), now)
        if self.timers and self.timers[0][0] <= now:
            self._fire_timers(now)
        # dispatch before tick: a preemption no longer needed (its hot job
        # placed or cancelled) is called off before tick() kills for it
        self._dispatch(now)
        backend.tick(now)
        if self.rec is not None:
            self.rec.end_turn()
        if self.front is not None:
            self.front.flush()
        self.timings.tidy()
        if self.drained is not None and not self.runs:
            self.drained.set()
        if now >= self.beat_at:
            self._beat(now)

    def _next_wake(self) -> float:
        """When the loop must run next whatever happens: its next timer, or the backend's."""
        return min(self.timers[0][0] if self.timers else float("inf"), self.backend.next_deadline(), self.beat_at)

    def _events(self, events: list[Any], now: float) -> None:
        """Apply what the backend reported. A method, not a loop in ``_loop``: a loop variable
        there would keep the last result (and its shared memory) alive until the next one."""
        for ev in events:
            self._event(ev, now)

    def _intake(self, now: float) -> None:
        intake = self.intake
        while intake:
            msg = intake.popleft()
            if type(msg) is Job:
                self._admit(msg, now)
            elif type(msg) is list:
                for job in msg:
                    self._admit(job, now)
            elif msg[0] == "jobs":  # fsync="always": acknowledged once durable
                for job in msg[1]:
                    self._admit(job, now)
                assert self._hold is not None
                self._hold(("ack", msg[2]))
            elif msg[0] in self._asks:  # (what, *args, answer, done): a caller waits for the answer
                try:
                    value = self._asks[msg[0]](*msg[1:-2])
                except Exception as e:  # a bad request: the caller raises it
                    value = e
                if type(value) is Later:  # known when a run ends
                    value.then(lambda v, answer=msg[-2], done=msg[-1]: (answer.append(v), done.set()))
                else:
                    msg[-2].append(value)
                    msg[-1].set()
            elif msg[0] == "compact":
                assert self.rec is not None
                self.rec.journal.compact()
                msg[1].set()
            elif msg[0] == "call":  # (call, fn, done): run fn on the loop (the service's front door)
                try:
                    msg[1]()
                finally:
                    msg[2].set()
            elif msg[0] == "heartbeat":
                self.heartbeat = msg[1]
                self._beat(now)
            elif msg[0] == "drain":  # (drain, accepted, idle): idle is set once no job runs
                self.draining = True
                self.schedules.stopped = True
                self.drained = msg[2]
                msg[1].set()
            elif msg[0] == "shutdown":  # (shutdown, cancel_futures, kill, seconds the workers get to stop)
                self._dispatch(now, booting=True)  # what was submitted before may still take a worker
                self.stop_grace = msg[3]
                self._shutdown(cancel_futures=msg[1], kill=msg[2])

    def _beat(self, now: float) -> None:
        """The loop is alive: tell whoever asked (a hung loop stops these, and systemd restarts us)."""
        if self.heartbeat is None:
            return
        interval, beat = self.heartbeat
        self.beat_at = now + interval
        try:
            beat()
        except Exception as e:  # a heartbeat must not take the loop down
            log.error("heartbeat_failed", error=repr(e))

    def _admit(self, job: Job, now: float) -> None:
        if self.broken is not None:  # a submit that raced the break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(self.broken)
            job.release_args()
            return
        if job.dep_futures:  # a future's id is final now (a keyed submit may follow another job's)
            job.deps = (*job.deps, *(f.job_id for f in job.dep_futures))
        if self.rec is not None:
            try:
                if job.key is not None and self.rec.follow(job, self.jobs):
                    return
                self.rec.submitted(job)
            except Exception as e:  # this job cannot be journaled (a key too large for msgpack ...): it alone fails
                log.error("journal_refused_job", job=job.id, name=job.label, error=repr(e))
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(PoolError(f"the journal could not record job {job.label}#{job.id}: {e!r}"))
                job.release_args()
                return
        self.stats.submitted += 1
        self.jobs[job.id] = job
        job.queued_at = now
        if job.deps and not self._link(job):
            return  # a prerequisite had failed: it is cancelled already
        if job.waiting:
            job.state = WAITING
        elif job.not_before:
            self._ready(job, now)
        else:  # (_ready's common case inline: one call fewer per job)
            self.queue.push(job.id, job.opts.priority, job.opts.hot, now)

    def _ready(self, job: Job, now: float) -> None:
        """Queue a job whose prerequisites are done (or that had none); a delayed one waits for its time."""
        job.state = QUEUED
        job.queued_at = now
        if job.not_before:
            wait = job.not_before - time.time()
            if wait > 0:  # delayed: the timer queues it, with its priority, when it is due
                job.state = PENDING
                self._timer(now + wait, _DUE, job.id)
                return
        self.queue.push(job.id, job.opts.priority, job.opts.hot, now)

    def _schedule_job(self, spec: r.ScheduleSet) -> Job:
        """A firing of a schedule: an ordinary job with the schedule's call and options."""
        fut = JobFuture()
        fut.job_id = self.new_id()
        return Job(fut.job_id, fut, spec.label, spec.fn, spec.flags, spec.args, b"", spec.options)

    def _restore(self, now: float) -> None:
        """Queue what the journal had not finished (before the loop starts); its schedules run again."""
        assert self.rec is not None
        state = self.rec.journal.state
        for spec in state.schedules.values():
            self.schedules.add(spec, time.time(), replace=True, record=False)
        for e in state.jobs.values():
            if e.dead:
                self.dead.add(DeadLetter(e.job, e.label, e.key, state.fns[e.fn], e.flags, e.args, list(e.buffers), state.options[e.opts], e.state, list(e.history), e.finished_at))
        for job, retry_in in self.rec.restore(self.prefix):
            job.queued_at = now
            self.jobs[job.id] = job
            self.recovered[job.id] = job.future
            if job.deps:
                if not self._link(job):
                    continue
                if job.waiting:
                    job.state = WAITING
                    continue
            if job.not_before:  # a delayed job: due at its time, with its priority
                self._ready(job, now)
            elif retry_in is not None:
                self._timer(now + retry_in, _RETRY, job.id)
            else:  # a preempted job goes first, as it would have
                self.queue.push(job.id, job.opts.priority, job.opts.hot, now, front=bool(job.resume))


