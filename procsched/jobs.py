"""Jobs as the supervisor holds them, and how a finished one settles its futures.

A :class:`Job` is made by ``submit()`` in the caller's thread (or rebuilt
from the journal) and, once posted, belongs to the supervisor's loop.
"""

from __future__ import annotations

import pickle
from typing import Any

from .futures import Encoded, JobFuture
from .ipc import oob
from .model import QUEUED, JobOptions, Key



class Job:
    """The supervisor's record of one job (what ``submit`` made, plus its life so far)."""

    __slots__ = ("id", "future", "label", "fn", "flags", "args", "oob", "opts", "attempt", "state", "resume", "queued_at", "run", "dispatched", "key", "followers", "not_before", "cancelling", "withdrawing",
                 "deps", "dep_futures", "dep_policy", "waiting", "dependents", "history")  # fmt: skip

    def __init__(self, id: int, future: JobFuture, label: str, fn: bytes, flags: int, args: bytes, oob: bytes, opts: JobOptions, key: Key | None = None) -> None:
        self.id = id
        self.future = future
        self.label = label
        self.fn = fn
        self.flags = flags
        self.args = args
        self.oob = oob
        self.opts = opts
        self.attempt = 1
        self.state = QUEUED
        self.resume = b""
        self.queued_at = 0.0
        self.run = 0
        self.dispatched = False
        self.key = key
        #: futures of later submits with this job's key (they settle with it)
        self.followers: list[JobFuture] | None = None
        #: wall-clock time before which it must not start (0.0: at once)
        self.not_before = 0.0
        #: pool.cancel(kill=True) is stopping it: however its worker ends, it ends cancelled
        self.cancelling = False
        #: pool.cancel() asked its worker to give it back unrun: the answer, once the run ends
        self.withdrawing: Later | None = None
        #: prerequisites (job ids), their futures when the caller gave futures, and what a
        #: failed one means ("cancel" this job, or "run" it anyway)
        self.deps: tuple[int, ...] = ()
        self.dep_futures: tuple[JobFuture, ...] = ()
        self.dep_policy = "cancel"
        self.waiting = 0  # prerequisites not yet finished
        self.dependents: list[int] | None = None  # jobs waiting for this one
        #: (attempt, kind, message, wall time) of each failed attempt, once one has failed
        self.history: list[tuple[int, str, str, float]] | None = None

    def release_args(self) -> None:
        """Unlink the job's argument segment: it has ended, or it never reached the loop."""
        if self.oob:
            oob.unlink(oob.segment_name(self.oob))


class Later:
    """A request's answer the loop gives later (``pool.cancel`` of a job its worker may have begun):
    each ``then(fn)`` is called with the value, on the loop's thread."""

    __slots__ = ("callbacks",)

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def then(self, fn: Any) -> None:
        self.callbacks.append(fn)

    def give(self, value: Any) -> None:
        for fn in self.callbacks:
            fn(value)


class Stats:
    """Counters of job outcomes since the pool started."""

    __slots__ = ("submitted", "succeeded", "failed", "cancelled", "retried", "crashed", "timed_out", "preempted")

    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.cancelled = 0
        self.retried = self.crashed = self.timed_out = self.preempted = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def resolve(fut: JobFuture, result: Any, error: BaseException | None, followers: list[JobFuture] | None) -> None:
    """Settle a job's future, and the futures that follow it, with its outcome."""
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)
    for f in followers or ():
        if f.set_running_or_notify_cancel():
            if error is None:
                f.set_result(own_copy(result))
            else:
                f.set_exception(error)


def then_arguments(parts: bytes, result: Encoded) -> bytes:
    """A continuation's arguments once its prerequisite succeeded: ``codec.run_then``'s
    ``(parts, payload, buffers)``, pickled from bytes the supervisor never loads."""
    return pickle.dumps(((parts, result.payload, [bytes(b) for b in result.buffers]), {}), 5)


def own_copy(value: Any) -> Any:
    """An encoded result another future may decode without sharing its buffers' memory."""
    if type(value) is Encoded and value.buffers:
        return Encoded(value.payload, [memoryview(bytearray(b)) for b in value.buffers])
    return value
