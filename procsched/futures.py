"""JobFuture: a ``concurrent.futures.Future`` whose value is decoded by its reader.

The supervisor resolves a future with the bytes the worker produced, never
unpickling them itself (that keeps its loop short, and in service mode keeps
client data out of the supervisor). The first ``result()`` or
``exception()`` call decodes them in the caller's thread and caches the
object. Waiters (``wait``, ``as_completed``, callbacks) work unchanged: a
failed job is resolved through ``set_exception`` with a placeholder, so
``FIRST_EXCEPTION`` sees it as a failure.

A future's condition variable (and with it the stdlib's lists of waiters
and callbacks) is made only when someone needs it: a thread that waits,
cancels or adds a callback. Most futures of a large batch are
resolved before anyone looks at them, so the supervisor settles them under
a plain lock instead (``_lazy``: one for every future, since each section it
guards is a few reads and writes that call nothing, and a lock per future
was one more object per future for the cyclic GC to walk), and ``result()``
on a finished future takes no lock at all. The stdlib's own waiters (``wait``,
``as_completed``) read ``_condition`` and so create it, which keeps their
protocol intact: every state change happens either under ``_lazy`` while no
condition exists, or under the condition once it does, never both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any, NamedTuple

from . import codec
from .errors import PoolError
from .ipc import frames


class BrokenPool(PoolError, BrokenExecutor):
    """The pool can run no job: a worker's ``initializer`` raised (its traceback is the cause).

    As with ``ProcessPoolExecutor``'s ``BrokenProcessPool`` (also a
    ``concurrent.futures.BrokenExecutor``), every job not finished fails with it,
    and so does every later ``submit()``. Defined here, not in ``errors``:
    workers import that module, and this base would cost their boot.
    """


class Encoded(NamedTuple):
    """A job's pickled result, with its out-of-band buffers (a tuple: the loop makes one per
    job, and ``new(Encoded, (payload, buffers))`` makes it without a Python-level call)."""

    payload: bytes
    buffers: Sequence[memoryview]


new = tuple.__new__


class EncodedError(Exception):
    """Placeholder for a job's exception until someone reads it."""

    def __init__(self, payload: bytes) -> None:
        super().__init__("job failed (not yet decoded)")
        self.payload = payload


def describe(error: BaseException) -> str:
    """``Type: message`` of an exception, without unpickling an encoded one."""
    if isinstance(error, EncodedError):
        names, msg, _, _ = frames.decode_error(error.payload)
        return f"{names[0].rsplit('.', 1)[-1] if names else 'Exception'}: {msg}"[:500]
    return f"{type(error).__name__}: {error}"[:500]


#: every future's ``_lazy`` (see the module doc); reentrant for a signal handler that reads
#: another future's result while the main thread is inside one of its sections
_LAZY = threading.RLock()
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class JobFuture(Future):  # type: ignore[type-arg]
    """The future of one procsched job. ``job_id`` names it in logs and stats."""

    job_id: int = 0
    #: called with ``job_id`` when the result is first read (a journal that drops fetched results)
    _on_fetch: Any = None
    #: the result's bytes, kept once decoded (a continuation submitted later passes them on)
    _encoded: Encoded | None = None
    #: called with the future once it is settled or cancelled (the service pushes it to its client)
    _on_settle: Any = None
    #: guards the condition's creation and the settling without it (one lock for all futures)
    _lazy = _LAZY
    #: ``lend(future, timeout)``: run the pool's loop on this thread while waiting, if it
    #: sleeps (``lending.py``); None: wait as any future does
    _lend: Any = None

    def __init__(self, job_id: int = 0, lend: Any = None) -> None:  # Future.__init__ without its condition (see the module doc)
        self.job_id = job_id
        self._lend = lend
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        # _waiters and _done_callbacks come with the condition: the stdlib touches them only
        # under it, and two lists fewer per job is two objects fewer for the cyclic GC to walk

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with self._lazy:
                cond = self._cond
                if cond is None:
                    self._waiters: list[Any] = []
                    self._done_callbacks: list[Any] = []
                    cond = self._cond = threading.Condition()
        return cond

    # -- the supervisor's side: lock-light while nobody watches ----------------
    def set_running_or_notify_cancel(self) -> bool:
        running = self._set_running()
        if not running and self._on_settle is not None:
            self._on_settle(self)
        return running

    def _set_running(self) -> bool:
        if self._cond is None:
            with self._lazy:
                if self._cond is None:
                    if self._state == PENDING:
                        self._state = RUNNING
                        return True
                    if self._state == CANCELLED:
                        self._state = CANCELLED_AND_NOTIFIED
                        return False
        return super().set_running_or_notify_cancel()

    def set_result(self, result: Any) -> None:
        if not self._settle(result, None):
            super().set_result(result)
        if self._on_settle is not None:
            self._on_settle(self)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._settle(None, exception):
            super().set_exception(exception)
        if self._on_settle is not None:
            self._on_settle(self)

    def _settle(self, result: Any, exception: BaseException | None) -> bool:
        """Finish without a condition while none exists; ``False``: take the stdlib's path."""
        if self._cond is None:
            with self._lazy:
                if self._cond is None and self._state not in _DONE:
                    self._result, self._exception = result, exception
                    self._state = FINISHED
                    return True
        return False

    def cancel_running(self) -> None:
        """Cancel a future whose job had started (``pool.cancel(kill=True)``); the stdlib's
        ``cancel()`` refuses a running future, so this does what it would have done."""
        with self._condition:
            if self._state in _DONE:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        if self._on_settle is not None:
            self._on_settle(self)

    def notify_cancelled(self) -> None:
        """A cancelled job leaves the pool: wake ``wait()``/``as_completed()`` for it."""
        if self._state == CANCELLED:
            self.set_running_or_notify_cancel()

    # -- reads: one attribute, atomic under the GIL -----------------------------
    def done(self) -> bool:
        return self._state in _DONE

    def running(self) -> bool:
        return self._state == RUNNING

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    # -- the caller's side ------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            value = self._result  # settled: no lock, no wait
        else:
            if self._lend is not None and self._state not in _DONE:
                timeout = self._lent_wait(timeout)
            try:
                value = super().result(timeout)
            except EncodedError:
                value = EncodedError
            if value is EncodedError:  # raised outside the except block: no chained context
                raise self._decode_error()
        if type(value) is Encoded:
            value = self._decode_value(value)
        return value

    def _lent_wait(self, timeout: float | None) -> float | None:
        """Wait by running the pool's loop, if it can be borrowed; the time left to wait."""
        if timeout is None:
            self._lend(self, None)
            return None
        end = time.monotonic() + timeout
        self._lend(self, timeout)
        return max(0.0, end - time.monotonic())

    def _decode_value(self, encoded: Encoded) -> Any:
        # Unpickled outside any lock (it may import the class's module); the
        # first decoding to land is the one every reader gets. ``_lazy``, not
        # the condition: making a condition costs more than most results take
        # to decode, and only the swap below needs guarding.
        value = codec.load_value(encoded.payload, encoded.buffers)
        with self._lazy:
            first = self._result is encoded
            if first:
                self._encoded = encoded
                self._result = value
            else:
                value = self._result
        if first and self._on_fetch is not None:
            self._on_fetch(self.job_id)
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._lend is not None and self._state not in _DONE:
            timeout = self._lent_wait(timeout)
        exc = super().exception(timeout)
        if type(exc) is EncodedError:
            return self._decode_error()
        return exc

    def encoded_result(self) -> Encoded | None:
        """The pickled result of a successfully finished future, without decoding it."""
        if self._state != FINISHED or self._exception is not None:
            return None
        value = self._result
        return value if type(value) is Encoded else self._encoded

    def _decode_error(self) -> BaseException:
        exc = self._exception
        if type(exc) is EncodedError:
            # Unpickled outside the lock (it may import the class's module);
            # the first decoding to land is the one every reader gets.
            decoded = codec.load_error(exc.payload)
            with self._condition:
                if self._exception is exc:
                    self._exception = decoded
                exc = self._exception
        assert exc is not None
        return exc

    def __repr__(self) -> str:
        return super().__repr__().replace("<JobFuture ", f"<JobFuture job={self.job_id} ", 1)
