"""The Ray backend: the same supervisor, its jobs run as Ray tasks.

Everything that makes procsched procsched stays in the supervisor (the
journal, the heap and aging, hot and cold, delays and cron, dependencies,
retries, timeouts, dead letters, the service); Ray only executes. Each run
is one task of :func:`_execute`, with Ray's own retries off, so procsched's
policy alone decides what a failure costs. How each part of the backend
contract (``backends.Backend``) maps onto Ray:

* **capacity**: only as many runs are handed to Ray as the cluster has CPUs
  (or the pool's ``max_workers``, if lower), plus ``window`` more, so that
  procsched's priority order is what runs, not Ray's queue. The count of
  CPUs is read once a second (a GCS round trip; Ray's own "available"
  figure lags by a third of a second, so we count our runs ourselves).
  A run with a timeout is *parked* here until a CPU is free, so its clock
  starts when it can start;
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
  and waited for, by its first Ray pool) holds the yield flags.
  ``request_yield`` sets one; inside the task, the first
  ``should_yield()``/``checkpoint()`` starts a thread that polls the actor
  every 50 ms and feeds the job's local flag, so a check costs nothing.
  A ``preempt="kill"`` job's streamed checkpoints go to the same actor, and
  the backend fetches the last one before it kills the task.

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
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import ray
from ray import exceptions as rex

from .. import codec, worker
from ..errors import SerializationError, WorkerLost
from ..ipc import frames, oob
from ..log import get_logger
from . import Event, Lost, Result, Returned, Started

if TYPE_CHECKING:
    from ..ipc.doorbell import Doorbell
    from ..model import PoolConfig
    from . import Ray

log = get_logger("procsched.ray")

_CAPACITY_EVERY = 1.0  # seconds between reads of the cluster's CPU count
_POLL_S = 0.05  # how often a task that checks for a yield asks the flag actor


# -- the actor that carries yield requests and streamed checkpoints -------------------------------
class _Flags:
    """Runs asked to yield, and the last checkpoint each ``preempt="kill"`` run streamed.

    One per driver process, shared by its pools: a run is named by (pool, run id).
    """

    def __init__(self) -> None:
        self.asked: set[tuple[str, int]] = set()
        self.states: dict[tuple[str, int], bytes] = {}

    def ask(self, key: tuple[str, int], on: bool) -> None:
        if on:
            self.asked.add(key)
        else:
            self.asked.discard(key)

    def is_asked(self, key: tuple[str, int]) -> bool:
        return key in self.asked

    def put(self, key: tuple[str, int], state: bytes) -> None:
        self.states[key] = state

    def take(self, key: tuple[str, int]) -> bytes:
        return self.states.pop(key, b"")

    def forget(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self.asked.discard(key)
            self.states.pop(key, None)

    def drop(self, pool: str) -> None:
        """A pool closed: everything it left."""
        self.asked = {k for k in self.asked if k[0] != pool}
        self.states = {k: v for k, v in self.states.items() if k[0] != pool}


# -- inside the Ray worker ------------------------------------------------------------------------------
_actors: dict[str, Any] = {}


def _flags(name: str) -> Any:
    """The flag actor, by name (a handle per task would cost every task its pickling)."""
    actor = _actors.get(name)
    if actor is None:
        actor = _actors[name] = ray.get_actor(name)
    return actor


def _flag_actor() -> tuple[str, Any]:
    """This driver's flag actor (made by its first Ray pool, alive before any job runs, so no
    streamed checkpoint can reach it after the supervisor has asked for the last one)."""
    name = f"procsched-flags-{os.getpid()}"
    actor: Any = ray.remote(_Flags).options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=64).remote()
    ray.get(actor.__ray_ready__.remote(), timeout=120)
    return name, actor


class _YieldWatch:
    """The job's yield flag, fed by a thread that polls the actor once the job first looks."""

    def __init__(self, flags: str, key: tuple[str, int]) -> None:
        self.flags = flags
        self.key = key
        self.run = key[1]
        self.value = 0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self) -> int:
        if self.thread is None:
            self.thread = threading.Thread(target=self._poll, name="procsched-yield", daemon=True)
            self.thread.start()
        return self.value

    def _poll(self) -> None:
        while not self.stop.is_set():
            try:
                if ray.get(_flags(self.flags).is_asked.remote(self.key)):
                    self.value = self.run
                    return
            except (rex.RayError, ValueError):  # (ValueError: no such actor)
                return  # the pool is gone: nobody will ask
            self.stop.wait(_POLL_S)

    def close(self) -> None:
        self.stop.set()


_functions = worker.Functions()
_paths_seen: tuple[str, ...] = ()


def _use_paths(paths: tuple[str, ...]) -> None:
    """Let the job's modules import here as they do in the supervisor (the local worker gets its
    ``sys.path``), keeping what this node lacks out."""
    global _paths_seen
    if paths != _paths_seen:
        _paths_seen = paths
        for p in paths:
            if p and p not in sys.path and os.path.isdir(p):
                sys.path.append(p)


def _execute(d: tuple[Any, ...], buffers: list[Any], flags: tuple[str, str], paths: tuple[str, ...]) -> tuple[int, int, bytes, list[Any]]:
    """Run one job in a Ray worker, as a local worker would: (status, µs, payload, buffers).
    ``flags``: the flag actor's name and the pool's token."""
    job = frames.Dispatch(*d)
    _use_paths(paths)
    name, pool = flags
    watch = _YieldWatch(name, (pool, job.job_id))
    live = None
    if job.flags & frames.F_CHECKPOINT_LIVE:

        def live(run: int, state: Any) -> None:
            try:
                _flags(name).put.remote((pool, run), codec.dump_state(state))
            except (SerializationError, ValueError):
                pass  # an unpicklable checkpoint is kept only in the job itself

    try:
        return worker.execute(job, _functions, lambda _: buffers, watch, live)
    finally:
        watch.close()


# -- the supervisor's side ---------------------------------------------------------------------------------
class RayBackend:
    """``backends.Backend`` over a Ray cluster; driven by the supervisor's loop thread alone,
    except :meth:`_done`, which Ray calls on its own thread."""

    def __init__(self, spec: Ray, config: PoolConfig, bell: Doorbell) -> None:
        self.config = config
        self.spec = spec
        self.bell = bell
        self.restarts = 0
        self.owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True, **spec.init}
            if spec.address is not None:
                kwargs["address"] = spec.address
            with _own_signals():
                ray.init(**kwargs)
            self.owns_ray = spec.address is None  # a Ray of our own dies with the pool
        self.poller = select.poll()
        self.poller.register(bell.read_fd, select.POLLIN)
        options: dict[str, Any] = {"max_retries": 0, "retry_exceptions": False, "num_cpus": 1}
        if spec.spread:
            options["scheduling_strategy"] = "SPREAD"
        self.task: Any = ray.remote(_execute).options(**options)
        self.token = f"{id(self):x}"
        self.flags_name, self.flags = _flag_actor()
        self.paths = tuple(p for p in sys.path if p)
        #: run id -> (ObjectRef, started at) of the runs Ray was given
        self.inflight: dict[int, Any] = {}
        #: runs with a timeout waiting for a free CPU (they count as placed)
        self.parked: deque[frames.Dispatch] = deque()
        self.done: deque[tuple[int, Any]] = deque()  # (run, future): appended by Ray's thread
        self.events: list[Event] = []
        self.killing: dict[int, str] = {}  # run -> why we cancelled it
        self.yield_at: dict[int, float] = {}  # run -> when a preempt="kill" run is killed (0: never)
        self.flagged: set[int] = set()  # runs whose state the actor may hold
        self.started_at: dict[int, float] = {}
        self.cluster_cpus = 0
        self.capacity_at = 0.0
        self.closing = False
        self._refresh(time.monotonic())

    # -- capacity -----------------------------------------------------------------------
    def _refresh(self, now: float) -> None:
        self.capacity_at = now + _CAPACITY_EVERY
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))  # type: ignore[no-untyped-call]
        except Exception as e:  # noqa: BLE001 - a GCS hiccup: keep the last figure
            log.warning("ray_capacity_unknown", error=repr(e))
            return
        if cpus != self.cluster_cpus:
            log.info("ray_capacity", cpus=cpus, was=self.cluster_cpus)
            self.cluster_cpus = cpus

    @property
    def capacity(self) -> int:
        cap = self.config.max_workers
        return min(cap, self.cluster_cpus) if cap > 0 else self.cluster_cpus

    @property
    def degraded(self) -> bool:
        return self.cluster_cpus == 0

    def spawn_all(self, now: float) -> None:
        self._refresh(now)

    def headroom(self, booting: bool = False) -> int:
        return max(0, self.capacity + self.spec.window - len(self.inflight) - len(self.parked))

    def idle_workers(self) -> int:
        return max(0, self.capacity - len(self.inflight) - len(self.parked))

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
        buffers = [pickle.PickleBuffer(v) for v in oob.read(d.oob, unlink_now=False)] if d.oob else []
        now = time.monotonic()  # before the hand-over: a timeout's clock counts it, as the caller's does
        ref = self.task.remote(tuple(d), buffers, (self.flags_name, self.token), self.paths)
        self.inflight[d.job_id] = ref
        self.started_at[d.job_id] = now
        if track:
            self.events.append(Started(d.job_id, now))
        run = d.job_id
        ref.future().add_done_callback(lambda fut: self._done(run, fut))

    def _done(self, run: int, fut: Any) -> None:
        """On Ray's thread: queue the finished run and wake the loop."""
        self.done.append((run, fut))
        self.bell.ring()

    def _unpark(self) -> None:
        while self.parked and len(self.inflight) < self.capacity:
            self._submit(self.parked.popleft(), True)

    def running(self) -> dict[int, int]:
        return dict.fromkeys(self.inflight, -1)

    def worker_of(self, job_id: int) -> int:
        return -1  # Ray places it: no index of ours

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
        if job_id not in self.inflight or job_id in self.killing:
            return False
        self.flags.ask.remote((self.token, job_id), True)
        self.flagged.add(job_id)
        self.yield_at[job_id] = now + kill_after if kill_after is not None else 0.0
        log.info("preempt_requested", run=job_id, kill_after=kill_after)
        return True

    def cancel_yield(self, job_id: int) -> None:
        if self.yield_at.pop(job_id, None) is not None:
            self.flags.ask.remote((self.token, job_id), False)

    # -- the loop ------------------------------------------------------------------------------
    def collect(self, now: float, ready: list[tuple[int, int]]) -> list[Event]:
        done = self.done
        forget = []
        while done:
            run, fut = done.popleft()
            if self.inflight.pop(run, None) is None:
                continue
            self.started_at.pop(run, None)
            self.yield_at.pop(run, None)
            if run in self.flagged:
                self.flagged.discard(run)
                forget.append(run)
            self.events.append(self._outcome(run, fut, self.killing.pop(run, "")))
        if forget:
            self.flags.forget.remote([(self.token, run) for run in forget])
        self._unpark()
        events, self.events = self.events, []
        return events

    def _outcome(self, run: int, fut: Any, killed_for: str) -> Event:
        try:
            status, run_us, payload, bufs = fut.result()
        except rex.TaskCancelledError:
            detail = f"its Ray task was cancelled ({killed_for})" if killed_for else "its Ray task was cancelled from outside"
            return Lost(run, WorkerLost(detail), killed_for)
        except rex.RayError as e:
            if not killed_for:
                self.restarts += 1
            return Lost(run, WorkerLost(_describe(e)), killed_for)
        except Exception as e:  # noqa: BLE001 - the reply itself would not load: the run is lost
            return Lost(run, WorkerLost(f"its reply could not be read: {type(e).__name__}: {e}"), killed_for)
        return Result(run, status, run_us, payload, [memoryview(b) for b in bufs])

    def tick(self, now: float) -> None:
        if now >= self.capacity_at:
            self._refresh(now)
            self._unpark()
        for run, at in list(self.yield_at.items()):
            if at and now >= at:
                del self.yield_at[run]
                self._kill_preempted(run, now)

    def _kill_preempted(self, run: int, now: float) -> None:
        """A ``preempt="kill"`` run that did not yield in time: keep its last checkpoint, then kill it."""
        state: bytes
        try:
            state = ray.get(self.flags.take.remote((self.token, run)), timeout=5.0)
        except Exception as e:  # noqa: BLE001 - no checkpoint: it resumes from its last known one
            log.warning("ray_checkpoint_unavailable", run=run, error=repr(e))
            state = b""
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
        """Cancel what still runs, drop the actor, and stop Ray if the pool started it."""
        self.closing = True
        for ref in self.inflight.values():
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001, S110 - finished meanwhile
                pass
        self.inflight.clear()
        self.parked.clear()
        try:
            self.flags.drop.remote(self.token)
        except Exception:  # noqa: BLE001, S110 - Ray is already gone
            pass
        if self.owns_ray:
            ray.shutdown()

    def stats(self) -> dict[str, object]:
        """One row per CPU the pool may use (busy: a run is on it), as the local pool has per worker."""
        busy = len(self.inflight)
        slots = [{"index": i, "pid": None, "state": "ready", "queued": int(i < busy), "done": None} for i in range(self.capacity)]
        return {"workers": slots, "backend": "ray", "in_flight": busy, "parked": len(self.parked), "restarts": self.restarts, "degraded": self.degraded}

    def workers_status(self, now: float, job_of: Any) -> list[dict[str, Any]]:
        """One row per CPU the pool may use, with the run on it (Ray, not procsched, knows the processes)."""
        runs = list(self.inflight)
        out = []
        for i in range(max(self.capacity, len(runs))):
            run = runs[i] if i < len(runs) else None
            current = job_of(run) if run is not None else None
            out.append({
                "index": i, "pid": None, "state": "ray", "rss": 0,
                "job": current[0] if current else None, "name": current[1] if current else None,
                "uptime_s": round(now - self.started_at.get(run, now), 1) if run is not None else None, "jobs_done": None,
            })  # fmt: skip
        return out


@contextlib.contextmanager
def _own_signals() -> Iterator[None]:
    """Keep the process's SIGTERM and SIGINT handlers: ``ray.init`` installs its own, which would
    end the process on SIGTERM before ``procsched serve`` can drain (or a caller's handler runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


def _describe(e: BaseException) -> str:
    """A Ray error in one line: its class and the first line of its message."""
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0]}" if first else type(e).__name__
