"""The Ray backend: the same supervisor, its jobs run as Ray tasks.

Everything that makes procsched procsched stays in the supervisor (the
journal, the heap and aging, hot and cold, delays and cron, dependencies,
retries, timeouts, dead letters, the service); Ray only executes. Each run
is one task of ``raytask.execute``, with Ray's own retries off, so procsched's
policy alone decides what a failure costs. How each part of the backend
contract (``backends.Backend``) maps onto Ray:

* **capacity**: only as many runs are handed to Ray as the cluster has CPUs
  (or the pool's ``max_workers``, if lower; then no more), plus a window
  more that wait in Ray's queue, so that procsched's priority order is what
  runs, not Ray's queue. The window adapts as the local pool's prefetch
  does: enough runs to cover the pool's ``prefetch_s`` at the measured job
  length, at most ``_PER_CPU`` per CPU (and ``max_prefetch``), at least one
  (``Ray(window=n)`` fixes it). Tiny jobs need it: each Ray task costs milliseconds of round
  trip, and with one run in the window a 2-CPU Ray runs no-op jobs at 0.7x
  of its own speed with everything submitted at once; with 4 per CPU, at
  about 1x (docs/ray-backend.md). The count of CPUs is read once a second (a GCS
  round trip; Ray's own "available" figure lags by a third of a second, so
  we count our runs ourselves). A run with a timeout is *parked* here until
  a CPU is free, so its clock starts when it can start. While a hot job
  waits, the window's runs are taken back (``ray.cancel(force=False)``:
  dequeued, or interrupted if one has just begun; either way re-queued
  without spending an attempt), so the CPU a yield frees goes to the hot job;
* **outcomes**: each task's ``ObjectRef.future()`` calls back on Ray's
  thread, which queues the run and rings the supervisor's doorbell; the
  loop's ``collect()`` takes the value (the result is fetched at once, so
  a node that dies later cannot lose it). The task returns what a local
  worker would send: status, run time, the pickled result, its buffers;
* **kill** (timeout, ``cancel(kill=True)``, a preemption past its grace):
  ``ray.cancel(force=True)`` kills the task's worker process; Ray starts
  another. The run is reported ``Lost`` once Ray confirms it;
* **crashes**: a worker or node that dies (``WorkerCrashedError``,
  ``NodeDiedError``, a result lost with its node) is ``Lost`` with a
  :class:`~procsched.errors.WorkerLost`, and the retry policy applies;
* **cooperative preemption**: one small actor per driver process (made,
  and waited for, by its first Ray pool; ``raytask.py``) holds the yield
  flags and the streamed checkpoints of ``preempt="kill"`` runs, which the
  backend takes before it kills such a run. The flags of runs asked to
  yield are raised again once a second: an actor Ray restarted after its
  process died has lost them, and one ended by ``ray.kill`` is found so and
  made again under the same name (``_replace_flags``);
* **Ray itself** (``rayconnect.py``): a pool that finds no Ray starts one
  (or joins ``address``) and the last pool using it stops it; if Ray is shut down
  under a pool, its runs are lost (and retried per policy) and it reports
  itself degraded instead of letting Ray start itself again.

What differs from the local pool, and why (``docs/ray-backend.md`` has the
measurements): a yield request is seen within about 50 ms, not at once; a
cancel cannot take back a run Ray was given (Ray does not say whether a
task has begun); a crash carries no exit status; job output goes to Ray's
worker logs rather than per-job files; no per-worker memory caps (Ray's
own memory monitor applies).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ray
from ray import exceptions as rex

from ..errors import WorkerLost
from ..ipc import frames, oob
from ..log import get_logger
from . import Event, JobLength, Lost, Result, Returned, Started
from .rayconnect import flag_actor, join, leave, replace_flag_actor
from .raytask import execute

if TYPE_CHECKING:
    from ..ipc.doorbell import Doorbell
    from ..model import PoolConfig
    from . import Ray

log = get_logger("procsched.ray")

_CAPACITY_EVERY = 1.0  # seconds between reads of the cluster's CPU count
_TAKE_TIMEOUT = 2.0  # seconds the loop waits for a preempted run's last checkpoint
_PER_CPU = 4  # most runs an adaptive window queues in Ray per CPU (tiny jobs)


class RayBackend:
    """``backends.Backend`` over a Ray cluster; driven by the supervisor's loop thread alone,
    except :meth:`_done`, which Ray calls on its own thread."""

    lendable = False  # its outcomes arrive on Ray's threads, which ring the loop's doorbell

    def __init__(self, spec: Ray, config: PoolConfig, bell: Doorbell) -> None:
        self.config = config
        self.spec = spec
        self.bell = bell
        self.restarts = 0
        self.shares = join(spec)
        try:
            options: dict[str, Any] = {"max_retries": 0, "retry_exceptions": False, "num_cpus": 1}
            if spec.spread:
                options["scheduling_strategy"] = "SPREAD"
            self.task: Any = ray.remote(execute).options(**options)
            self.flags_name, self.flags = flag_actor()
        except BaseException:
            if self.shares:
                leave()
            raise
        self.token = os.urandom(6).hex()  # names this pool's runs in the shared flag actor
        #: what every task needs of the pool: the flag actor's name, this pool's token, sys.path
        self.pool_blob = pickle.dumps((self.flags_name, self.token, tuple(p for p in sys.path if p)))
        self.poller = select.poll()
        self.poller.register(bell.read_fd, select.POLLIN)
        #: run id -> ObjectRef of the runs Ray was given, in the order it was given them
        self.inflight: dict[int, Any] = {}
        self.started_at: dict[int, float] = {}
        #: runs with a timeout waiting for a free CPU (they count as placed)
        self.parked: deque[frames.Dispatch] = deque()
        self.done: deque[tuple[int, Any]] = deque()  # (run, future): appended by Ray's thread
        self._lock = threading.Lock()  # _done against close(): no ring after the doorbell is gone
        self.closed = False
        self.events: list[Event] = []
        self.killing: dict[int, str] = {}  # run -> why we cancelled it
        self.taking_back: set[int] = set()  # window runs called back for a hot job
        self.yield_at: dict[int, float] = {}  # run -> when a preempt="kill" run is killed (0: never)
        self.in_actor: set[int] = set()  # runs whose flag or checkpoints the actor may hold
        self.flags_lost = False  # set by Ray's thread: the flag actor has died for good
        self.flags_retry_at = 0.0
        self.cluster_cpus = 0
        self.capacity_at = 0.0
        self.length = JobLength()  # what the adaptive window follows
        self._refresh(time.monotonic())

    # -- capacity -----------------------------------------------------------------------
    def _refresh(self, now: float) -> None:
        self.capacity_at = now + _CAPACITY_EVERY
        if not ray.is_initialized():
            self._ray_gone()
            return
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))  # type: ignore[no-untyped-call]
        except Exception as e:  # noqa: BLE001 - a GCS hiccup: keep the last figure
            log.warning("ray_capacity_unknown", error=repr(e))
            return
        if cpus != self.cluster_cpus:
            log.info("ray_capacity", cpus=cpus, was=self.cluster_cpus)
            self.cluster_cpus = cpus

    def _ray_gone(self) -> None:
        """Ray was shut down under the pool: its runs are lost, and nothing more is placed."""
        if self.cluster_cpus or self.inflight:
            log.error("ray_gone", runs=len(self.inflight))
        self.cluster_cpus = 0
        for run in list(self.inflight):
            self._forget_run(run)
            self.events.append(Lost(run, WorkerLost("Ray was shut down"), self.killing.pop(run, "")))
        self.inflight.clear()

    @property
    def capacity(self) -> int:
        cap = self.config.max_workers
        return min(cap, self.cluster_cpus) if cap > 0 else self.cluster_cpus

    def _window(self) -> int:
        """Runs given beyond the free CPUs, to queue in Ray: none when ``max_workers`` caps the pool
        below the cluster (Ray would run them at once)."""
        cap = self.config.max_workers
        if cap and cap < self.cluster_cpus:
            return 0
        if self.spec.window is not None:
            return self.spec.window
        return max(1, self.capacity * self.length.ahead(self.config, _PER_CPU))

    @property
    def degraded(self) -> bool:
        return self.cluster_cpus == 0

    def spawn_all(self, now: float) -> None:
        self._refresh(now)

    def headroom(self, booting: bool = False) -> int:
        return max(0, self.capacity + self._window() - len(self.inflight) - len(self.parked))

    def idle_workers(self) -> int:
        return max(0, self.capacity - len(self.inflight) - len(self.parked))

    def coming_free(self) -> int:
        return 0  # a run that ends frees its CPU at once: there is no starting to wait for

    # -- placing ---------------------------------------------------------------------------
    def start(self, dispatches: list[frames.Dispatch], track: Iterable[int] = (), booting: bool = False) -> None:
        tracked = set(track)
        for d in dispatches:
            if d.job_id in tracked and (self.parked or len(self.inflight) >= self.capacity):
                self.parked.append(d)
            else:
                self._submit(d, d.job_id in tracked)

    def start_hot(self, d: frames.Dispatch, track: bool) -> bool:
        if not self.idle_workers():
            return False
        self._submit(d, track)
        return True

    def _submit(self, d: frames.Dispatch, track: bool) -> None:
        if not ray.is_initialized():  # (a .remote() now would start a Ray of its own)
            self._ray_gone()
            self.events.append(Returned(d.job_id))
            return
        buffers = [pickle.PickleBuffer(v) for v in oob.read(d.oob, unlink_now=False)] if d.oob else []
        now = time.monotonic()  # before the hand-over: a timeout's clock counts it, as the caller's does
        ref = self.task.remote(frames.encode_run([d]), self.pool_blob, *buffers)
        run = d.job_id
        self.inflight[run] = ref
        self.started_at[run] = now
        if d.flags & frames.F_CHECKPOINT_LIVE:
            self.in_actor.add(run)
        if track:
            self.events.append(Started(run, now))
        ref.future().add_done_callback(lambda fut: self._done(run, fut))

    def _done(self, run: int, fut: Any) -> None:
        """On Ray's thread: queue the finished run and wake the loop."""
        with self._lock:
            if not self.closed:
                self.done.append((run, fut))
                self.bell.ring()

    def _unpark(self) -> None:
        while self.parked and len(self.inflight) < self.capacity:
            self._submit(self.parked.popleft(), True)

    def running(self) -> dict[int, int]:
        """The runs on a CPU: the first ``capacity`` given (Ray starts them in order); the window's wait."""
        out: dict[int, int] = {}
        for run in self.inflight:
            if len(out) >= self.capacity:
                break
            if run not in self.taking_back:
                out[run] = -1  # Ray places it: no index of ours
        return out

    def worker_of(self, job_id: int) -> int:
        return -1

    # -- stopping runs ------------------------------------------------------------------------
    def kill(self, job_id: int, reason: str, now: float) -> bool:
        ref = self.inflight.get(job_id)
        if ref is None:
            return self._unplace(job_id, reason)
        if job_id not in self.killing:
            self.killing[job_id] = reason
            log.info("ray_cancel", run=job_id, reason=reason)
            try:
                ray.cancel(ref, force=True)
            except Exception as e:  # noqa: BLE001 - it finished meanwhile: its outcome tells
                log.debug("ray_cancel_failed", run=job_id, error=repr(e))
        return True

    def _unplace(self, job_id: int, reason: str) -> bool:
        """A parked run (not yet given to Ray) is stopped here; it ends as ``Lost`` for ``reason``."""
        for d in self.parked:
            if d.job_id == job_id:
                self.parked.remove(d)
                self.events.append(Lost(job_id, WorkerLost(f"stopped before it started ({reason})"), reason))
                return True
        return False

    def withdraw(self, job_id: int) -> bool | None:
        """Parked runs come back; Ray cannot say whether a task it was given has begun."""
        for d in self.parked:
            if d.job_id == job_id:
                self.parked.remove(d)
                self.events.append(Returned(job_id))
                return True
        return False

    def request_yield(self, job_id: int, kill_after: float | None, now: float) -> bool:
        self._take_back_window()
        if job_id not in self.inflight or job_id in self.killing:
            return False
        self._ask(job_id, True)
        self.in_actor.add(job_id)
        self.yield_at[job_id] = now + kill_after if kill_after is not None else 0.0
        log.info("preempt_requested", run=job_id, kill_after=kill_after)
        return True

    def _ask(self, run: int, on: bool) -> None:
        """Raise or lower a run's yield flag in the flag actor (its reply only tells whether it is there)."""
        actor = self.flags
        actor.ask.remote((self.token, run), on).future().add_done_callback(lambda fut: self._asked(actor, fut))

    def _asked(self, actor: Any, fut: Any) -> None:
        """On Ray's thread: a flag the actor did not take because it has died means it is gone for
        good (Ray restarts it when its process dies, but not after a ``ray.kill``). A late answer
        from an actor already replaced means nothing."""
        if isinstance(fut.exception(), rex.ActorDiedError):
            with self._lock:
                if not self.closed and actor is self.flags:
                    self.flags_lost = True
                    self.bell.ring()

    def _replace_flags(self, now: float) -> None:
        """Make the flag actor again under the same name (a running task looks it up by name once
        its handle fails) and raise the flags of the runs asked to yield. It does not wait for the
        actor; if Ray still holds the name, it tries again a second later."""
        try:
            self.flags_name, self.flags = replace_flag_actor(self.flags)
        except Exception as e:  # noqa: BLE001 - the dead actor's name is not free yet, or Ray is in trouble
            self.flags_retry_at = now + _CAPACITY_EVERY
            log.warning("ray_flag_actor_unavailable", error=repr(e))
            return
        self.flags_lost = False
        log.warning("ray_flag_actor_replaced", name=self.flags_name, asked=len(self.yield_at))
        self._raise_flags()

    def _raise_flags(self) -> None:
        for run in self.yield_at:
            self._ask(run, True)

    def _take_back_window(self) -> None:
        """A hot job waits: the runs queued in Ray beyond its CPUs would take the CPU a yield frees."""
        for i, (run, ref) in enumerate(self.inflight.items()):
            if i >= self.capacity and run not in self.taking_back and run not in self.killing:
                self.taking_back.add(run)
                try:
                    ray.cancel(ref, force=False)
                except Exception as e:  # noqa: BLE001 - it finished meanwhile: its outcome tells
                    log.debug("ray_cancel_failed", run=run, error=repr(e))

    def cancel_yield(self, job_id: int) -> None:
        if self.yield_at.pop(job_id, None) is not None:
            self._ask(job_id, False)

    # -- the loop ------------------------------------------------------------------------------
    def collect(self, now: float, ready: list[tuple[int, int]]) -> list[Event]:
        done = self.done
        forget = []
        while done:
            run, fut = done.popleft()
            if self.inflight.pop(run, None) is None:
                continue
            if run in self.in_actor:
                forget.append((self.token, run))
            self._forget_run(run)
            self.events.append(self._outcome(run, fut, self.killing.pop(run, "")))
        if forget:
            self.flags.forget.remote(forget)
        self._unpark()
        events, self.events = self.events, []
        return events

    def _forget_run(self, run: int) -> None:
        self.started_at.pop(run, None)
        self.yield_at.pop(run, None)
        self.in_actor.discard(run)

    def _outcome(self, run: int, fut: Any, killed_for: str) -> Event:
        back = run in self.taking_back
        self.taking_back.discard(run)
        try:
            status, run_us, payload, bufs = fut.result()
        except rex.TaskCancelledError:
            if back and not killed_for:
                return Returned(run)  # called back for a hot job: to the front of its lane, no attempt spent
            detail = f"its Ray task was cancelled ({killed_for})" if killed_for else "its Ray task was cancelled from outside"
            return Lost(run, WorkerLost(detail), killed_for)
        except rex.RayError as e:
            if not killed_for:
                self.restarts += 1
            return Lost(run, WorkerLost(_describe(e)), killed_for)
        except Exception as e:  # noqa: BLE001 - the reply itself would not load: the run is lost
            return Lost(run, WorkerLost(f"its reply could not be read: {type(e).__name__}: {e}"), killed_for)
        self.length.observe(run_us)
        return Result(run, status, run_us, payload, [memoryview(b) for b in bufs])

    def tick(self, now: float) -> None:
        if self.flags_lost and now >= self.flags_retry_at and ray.is_initialized():
            self._replace_flags(now)
        if now >= self.capacity_at:
            self._refresh(now)
            self._unpark()
            self._raise_flags()  # again, once a second: an actor Ray restarted has lost them, and one gone for good is found so
        for run, at in list(self.yield_at.items()):
            if at and now >= at:
                del self.yield_at[run]
                self._kill_preempted(run, now)

    def _kill_preempted(self, run: int, now: float) -> None:
        """A ``preempt="kill"`` run that did not yield in time: keep its last checkpoint, then kill it."""
        state: bytes
        try:
            state = ray.get(self.flags.take.remote((self.token, run)), timeout=_TAKE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - no checkpoint: it resumes from its last known one
            log.warning("ray_checkpoint_unavailable", run=run, error=repr(e))
            state = b""
            if isinstance(e, rex.ActorDiedError):
                self.flags_lost = True
        if state:
            self.events.append(Result(run, frames.CHECKPOINT, 0, state, []))
        self.kill(run, "preempt", now)

    def next_deadline(self) -> float:
        at = [t for t in self.yield_at.values() if t]
        return min(self.capacity_at, *at) if at else self.capacity_at

    def prepare_sleep(self) -> bool:
        return not self.done and not self.events

    def woke(self) -> None:
        pass

    # -- the pool --------------------------------------------------------------------------------
    def resize(self, workers: int, now: float) -> None:
        self._unpark()

    def close(self, deadline: float) -> None:
        """Cancel what still runs and wait (until ``deadline``) for Ray to confirm it; stop Ray if
        this was the last pool using the Ray a pool started."""
        refs = list(self.inflight.values())
        if ray.is_initialized():
            for ref in refs:
                with contextlib.suppress(Exception):  # finished meanwhile
                    ray.cancel(ref, force=True)
            if refs:
                with contextlib.suppress(Exception):
                    # (a floor: the cancels are forced, so Ray confirms them in milliseconds)
                    ray.wait(refs, num_returns=len(refs), timeout=max(2.0, deadline - time.monotonic()))
            with contextlib.suppress(Exception):
                self.flags.drop.remote(self.token)
        with self._lock:
            self.closed = True
        self.inflight.clear()
        self.parked.clear()
        if self.shares:
            self.shares = False
            leave()

    def stats(self) -> dict[str, object]:
        """One row per CPU the pool may use (busy: a run is on it), as the local pool has per worker."""
        busy = min(len(self.inflight), self.capacity)
        slots = [{"index": i, "pid": None, "state": "ready", "queued": int(i < busy), "done": None} for i in range(self.capacity)]
        return {"workers": slots, "backend": "ray", "in_flight": len(self.inflight), "window": self._window(), "parked": len(self.parked), "restarts": self.restarts, "degraded": self.degraded}

    def workers_status(self, now: float, job_of: Any) -> list[dict[str, Any]]:
        """One row per CPU the pool may use, with the run on it (Ray, not procsched, knows the processes)."""
        runs = list(self.inflight)
        out = []
        for i in range(max(self.capacity, len(runs))):
            run = runs[i] if i < len(runs) else None
            current = job_of(run) if run is not None else None
            out.append({
                "index": i, "pid": None, "state": "ray" if i < self.capacity else "queued in ray", "rss": 0,
                "job": current[0] if current else None, "name": current[1] if current else None,
                "uptime_s": round(now - self.started_at.get(run, now), 1) if run is not None else None, "jobs_done": None,
            })  # fmt: skip
        return out


def _describe(e: BaseException) -> str:
    """A Ray error in one line: its class and the first line of its message."""
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0]}" if first else type(e).__name__
