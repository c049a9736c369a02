"""Lending the loop: a caller's thread runs the supervisor's turns while the loop's thread sleeps.

The loop is a role, not a thread: whoever holds ``baton`` runs it, one
holder at a time, and all of the loop's state is touched only under it. The
supervisor's thread holds it except while it sleeps in ``poll``.

Why: every wake of a sleeping thread costs (about 20 µs each on a small VM),
and a job's round trip through the loop's thread takes four of them:
caller → loop, loop → worker, worker → loop, loop → caller. A caller that
would only wait anyway runs the turn itself, and the round trip takes two,
as a pipe's ping-pong does:

* ``submit()`` that finds the loop asleep with a worker idle takes the baton
  and runs one turn (:meth:`Lending.lend_turn`): its job is admitted and
  placed on the worker at once. The loop's thread sleeps on; it is rung only
  if the turn left it something to do sooner than it planned to wake (a
  timer, a kill to escalate, the pool's end).
* ``result()`` (or ``exception()``) of a job not done yet, when the loop
  sleeps, keeps the baton (:meth:`Lending.lend`): it runs turns and sleeps in
  a poll of its own on the *lent* doorbell, which workers ring instead of the
  loop's while it is lent (each channel's ``W_OUT_BELL`` word says which)
  and which posts ring too (``sleeper``). Its turns settle every future that
  comes due, its own among them. Once its future is done it hands the loop
  back: the rings armed for the loop's thread again, and that thread rung
  only if it must wake sooner than it planned.

Everything else is unchanged: a thread that cannot take the baton (the loop
is awake, or another caller has it) waits on its future as before, and
callbacks run on whichever thread settles the future.

Two hazards, and what covers them:

* The loop's thread, woken while a caller holds the baton, waits for it;
  what its poll saw is stale by then (a dead worker's pidfd may have been
  closed and its number reused), so it polls again (``lends`` changed).
* A Ctrl-C must not land inside a turn run by the main thread (a job popped
  from the queue and not yet placed would be lost). While the main thread
  runs a turn, SIGINT's Python handler is swapped for one that only records
  the signal; the original is called, raising ``KeyboardInterrupt``, between
  turns (:class:`_Guard`). Only SIGINT is held back: it is the one people press.

A turn that raises is a supervisor crash, as on the loop's thread: the
borrower records it and wakes the loop's thread, which fails every job.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import signal as _signal
    from collections import deque

    from .backends import Backend
    from .futures import JobFuture
    from .ipc.doorbell import Doorbell
else:
    import _signal  # the C module under signal.py: no enum per call

_SIGINT = 2
_INF = float("inf")
_BACKSTOP_MS = 1000  # as the loop's own sleep (supervisor.py)


class Lending:
    # the supervisor's, declared for the type checker
    baton: threading.Lock
    holder: int
    lendable: bool
    lends: int
    loop_wake: float
    lent_failure: BaseException | None
    sleeping: bool
    sleeper: Doorbell
    bell: Doorbell
    lent_bell: Doorbell
    idle: bool
    intake: deque[Any]
    closing: bool
    now: float
    backend: Backend

    if TYPE_CHECKING:

        def _turn(self, now: float, ready: list[tuple[int, int]]) -> None: ...
        def _next_wake(self) -> float: ...
        def _ring(self) -> None: ...

    def on_loop(self) -> bool:
        """Whether the calling thread is running the loop now (a done-callback, say)."""
        return self.holder == threading.get_ident()

    def lend_turn(self) -> None:
        """Jobs were posted while the loop slept (``post`` said so): place them from here."""
        if not self.baton.acquire(False):  # awake after all, or lent to someone else
            self._ring()
            return
        guard: _Guard | _NoGuard = _NO_GUARD
        try:
            guard = _Guard.make()
            self.holder = threading.get_ident()
            if self._borrowed_turn([]):
                self.idle = self.backend.idle_workers() > 0
        finally:
            if self.lent_failure is not None or self.closing or self._next_wake() < self.loop_wake:
                self.bell.ring()  # the loop's thread has something to do sooner than it planned
            self.holder = 0
            self.baton.release()
            guard.release()

    def lend(self, fut: JobFuture, timeout: float | None) -> None:
        """Run the loop on this thread until ``fut`` is done or ``timeout`` has passed, if the
        loop sleeps; return at once if it does not (the caller then waits on ``fut``)."""
        if not (self.sleeping and self.lendable) or not self.baton.acquire(False):
            return
        guard: _Guard | _NoGuard = _NO_GUARD
        backend = self.backend
        poller = backend.lend_poller  # type: ignore[attr-defined]
        end = _INF if timeout is None else time.monotonic() + timeout
        try:
            guard = _Guard.make()
            self.holder = threading.get_ident()
            self.lends += 1
            self.sleeping = False
            self.sleeper = self.lent_bell
            backend.lend(True)  # type: ignore[attr-defined]
            ready: list[tuple[int, int]] = []
            while self._borrowed_turn(ready) and not fut.done() and self.lendable and not self.closing:
                wake = min(self._next_wake(), end)
                self.sleeping = True
                if self.intake or not backend.prepare_sleep():
                    ms = 0
                else:
                    left = wake - time.monotonic()
                    if left <= 0:
                        self.sleeping = False
                        backend.woke()
                        if end <= wake:
                            break  # the caller's timeout
                        ready = []
                        continue
                    ms = _BACKSTOP_MS if wake == _INF else min(_BACKSTOP_MS, int(left * 1000) + 1)
                guard.open()  # a Ctrl-C while asleep is the caller's, as it would be
                ready = poller.poll(ms)
                guard.close()
                self.sleeping = False
                if ms:
                    self.lent_bell.drain()
                backend.woke()
        finally:
            guard.close()
            try:
                self._hand_back()
            finally:
                self.holder = 0
                self.baton.release()
                guard.release()

    def _hand_back(self) -> None:
        """The loop goes back to its thread, asleep: the rings armed for it and, if it must
        act sooner than it planned, its doorbell rung."""
        backend = self.backend
        backend.lend(False)  # type: ignore[attr-defined]
        self.sleeper = self.bell
        while True:
            self.sleeping = True
            if self.lent_failure is not None or (not self.intake and backend.prepare_sleep()):
                break
            self.sleeping = False  # something came while we looked: take it first
            backend.woke()
            self._borrowed_turn([])
        self.idle = backend.idle_workers() > 0
        if self.lent_failure is not None or self.closing or self._next_wake() < self.loop_wake:
            self.bell.ring()

    def _borrowed_turn(self, ready: list[tuple[int, int]]) -> bool:
        """A turn on a borrowing thread; False if the loop has failed (now or before)."""
        if self.lent_failure is not None:
            return False
        now = self.now = time.monotonic()
        try:
            self._turn(now, ready)
        except Exception as e:  # a bug: the loop's thread fails the pool (supervisor._main)
            self.lent_failure = e
            return False
        except BaseException as e:  # SystemExit from a signal handler, say: the pool fails, and it goes on
            self.lent_failure = e
            raise
        return True


class _Guard:
    """Holds SIGINT's Python handler back while the main thread runs a turn (see the module doc).

    ``close()`` swaps in a handler that records the signal, ``open()`` puts the
    original back and calls it if the signal came meanwhile (raising
    ``KeyboardInterrupt``, by default). ``make()`` gives a no-op guard off the
    main thread (Python runs signal handlers on the main thread alone) or when
    SIGINT has no Python handler.
    """

    __slots__ = ("handler", "hit", "closed")

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.hit = False
        self.closed = False
        self.close()

    @staticmethod
    def make() -> _Guard | _NoGuard:
        if threading.current_thread() is not threading.main_thread():
            return _NO_GUARD
        handler = _signal.getsignal(_SIGINT)
        return _Guard(handler) if callable(handler) else _NO_GUARD

    def _record(self, signum: int, frame: Any) -> None:
        self.hit = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _signal.signal(_SIGINT, self._record)

    def open(self) -> None:
        if self.closed:
            self.closed = False
            _signal.signal(_SIGINT, self.handler)
            if self.hit:
                self.hit = False
                self.handler(_SIGINT, None)

    release = open


class _NoGuard:
    __slots__ = ()

    def close(self) -> None:
        pass

    def open(self) -> None:
        pass

    release = open


_NO_GUARD = _NoGuard()
