"""What runs on Ray's side of the Ray backend: the task, and the actor that carries flags.

Each run is one call of :func:`execute` in a Ray worker: it runs the job
exactly as a local worker does (``worker.execute``), with ``current_job()``
wired to the two things a Ray worker cannot get from shared memory:

* the yield request: :class:`YieldWatch`, the job's flag, which the first
  ``should_yield()``/``checkpoint()`` turns into a thread polling the
  :class:`Flags` actor every 50 ms (a check itself costs nothing), and which
  follows the flag both ways, so a yield called off before the job acted
  on it is called off here too;
* streamed checkpoints (``preempt="kill"``): sent to the actor, from which
  the supervisor takes the last one before it kills the task.

One :class:`Flags` actor serves every Ray pool of a driver process (a run is
named by its pool's token and run id); ``ray.py`` makes it and waits until
it is up before any job runs, so no streamed checkpoint can reach it after
the supervisor has taken the last one.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from typing import Any

import ray
from ray import exceptions as rex

from .. import codec, worker
from ..errors import SerializationError
from ..ipc import frames

POLL_S = 0.05  # how often a task that checks for a yield asks the flag actor

Key = tuple[str, int]  # (pool token, run id)


class Flags:
    """Runs asked to yield, and the last checkpoint each ``preempt="kill"`` run streamed."""

    def __init__(self) -> None:
        self.asked: set[Key] = set()
        self.states: dict[Key, bytes] = {}

    def ask(self, key: Key, on: bool) -> None:
        if on:
            self.asked.add(key)
        else:
            self.asked.discard(key)

    def is_asked(self, key: Key) -> bool:
        return key in self.asked

    def put(self, key: Key, state: bytes) -> None:
        self.states[key] = state

    def take(self, key: Key) -> bytes:
        return self.states.pop(key, b"")

    def forget(self, keys: list[Key]) -> None:
        for key in keys:
            self.asked.discard(key)
            self.states.pop(key, None)

    def drop(self, pool: str) -> None:
        """A pool closed: everything it left."""
        self.asked = {k for k in self.asked if k[0] != pool}
        self.states = {k: v for k, v in self.states.items() if k[0] != pool}


_actors: dict[str, Any] = {}


def flags_actor(name: str) -> Any:
    """The flag actor, by name (a handle per task would cost every task its pickling)."""
    actor = _actors.get(name)
    if actor is None:
        actor = _actors[name] = ray.get_actor(name)
    return actor


class YieldWatch:
    """The job's yield flag (``JobContext``'s yield word), fed by a polling thread once looked at."""

    def __init__(self, flags: str, key: Key) -> None:
        self.flags = flags
        self.key = key
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
                asked = ray.get(flags_actor(self.flags).is_asked.remote(self.key))
                self.value = self.key[1] if asked else 0  # both ways: a yield may be called off
            except (rex.RayError, ValueError):  # the actor is restarting, or gone with its pool
                _actors.pop(self.flags, None)  # look it up afresh next time
            self.stop.wait(POLL_S)

    def close(self) -> None:
        self.stop.set()


_paths_seen: tuple[str, ...] = ()


def _use_paths(paths: tuple[str, ...]) -> None:
    """Let the job's modules import here as they do in the supervisor (a local worker gets its
    ``sys.path``), leaving out the directories this node does not have."""
    global _paths_seen
    if paths != _paths_seen:
        _paths_seen = paths
        for p in paths:
            if p and p not in sys.path and os.path.isdir(p):
                sys.path.append(p)


_pools: dict[bytes, tuple[str, str, tuple[str, ...]]] = {}


def execute(frame: bytes, pool_blob: bytes, *buffers: Any) -> tuple[int, int, bytes, list[Any]]:
    """Run one job in a Ray worker, as a local worker would: (status, µs, payload, buffers).

    ``frame``: the job's ``RUN`` frame; ``pool_blob``: the pool's flag actor name, token and
    ``sys.path``, pickled once per pool (two byte strings are the cheapest arguments to pass).
    """
    job = frames.decode_run(frame)[0]
    known = _pools.get(pool_blob)
    if known is None:
        if len(_pools) > 64:
            _pools.clear()
        known = _pools[pool_blob] = pickle.loads(pool_blob)
    name, pool, paths = known
    _use_paths(paths)
    watch = YieldWatch(name, (pool, job.job_id))
    live = None
    if job.flags & frames.F_CHECKPOINT_LIVE:

        def live(run: int, state: Any) -> None:
            try:
                flags_actor(name).put.remote((pool, run), codec.dump_state(state))
            except (SerializationError, ValueError, rex.RayError):
                pass  # an unpicklable checkpoint (or one with nowhere to go) stays in the job

    try:
        return worker.execute(job, lambda _: buffers, watch, live)
    finally:
        watch.close()
