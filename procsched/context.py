"""The in-job API: what a running job may ask of procsched.

Inside a worker, :func:`current_job` returns the :class:`JobContext` of the
job being run: its id and attempt, the checkpoint it resumes from, and the
cooperative-preemption handshake (:meth:`JobContext.should_yield`,
:meth:`JobContext.checkpoint`). Outside a job it raises ``RuntimeError``.

The yield request is a word in the worker's shared channel that the
supervisor sets; reading it costs one memory load, so a job may poll it in
a tight loop. A worker runs one job at a time, so the current job is a
per-process fact, held here the way ``multiprocessing.current_process()``
holds its own.

Stdlib only: workers import this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import Preempted

TYPE_CHECKING = False  # typing costs a worker ~8 ms at boot; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Any

_LIVE_INTERVAL = 0.05  # at most one streamed checkpoint per this many seconds


class JobContext:
    """The running job, as seen from inside it."""

    __slots__ = ("job_id", "attempt", "resume_from", "_yield_word", "_send", "_last_sent")

    def __init__(
        self,
        job_id: int,
        attempt: int,
        resume_from: Any,
        yield_word: Callable[[], int],
        send_checkpoint: Callable[[int, Any], None] | None,
    ) -> None:
        self.job_id = job_id
        #: 1 for the first run, 2 for the first retry, ...
        self.attempt = attempt
        #: the state given to the last ``checkpoint()`` before a preemption, or ``None``
        self.resume_from = resume_from
        self._yield_word = yield_word
        self._send = send_checkpoint
        self._last_sent = 0.0

    def should_yield(self) -> bool:
        """True when a hot job is waiting for this worker: checkpoint and stop soon."""
        return self._yield_word() == self.job_id

    def checkpoint(self, state: Any = None) -> None:
        """Record progress; raises :class:`Preempted` if the job must yield now.

        ``state`` comes back as ``resume_from`` when the job runs again. Pass an
        immutable value (or one you no longer mutate): it may be pickled later.
        """
        if self._yield_word() == self.job_id:
            raise Preempted(state)
        if self._send is not None:
            now = time.monotonic()
            if now - self._last_sent >= _LIVE_INTERVAL:
                self._last_sent = now
                self._send(self.job_id, state)

    def __repr__(self) -> str:
        return f"<JobContext job={self.job_id} attempt={self.attempt}>"


_current: JobContext | None = None


def current_job() -> JobContext:
    """The job this code runs in; ``RuntimeError`` outside a procsched worker."""
    if _current is None:
        raise RuntimeError("procsched.current_job() called outside a procsched job")
    return _current


def cancel_requested() -> bool:
    """Whether the running job is asked to yield; ``False`` outside a job."""
    return _current is not None and _current.should_yield()


def checkpoint(state: Any = None) -> None:
    """``current_job().checkpoint(state)``; does nothing outside a job."""
    if _current is not None:
        _current.checkpoint(state)


def _enter(ctx: JobContext | None) -> None:
    global _current
    _current = ctx
