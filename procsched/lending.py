"""How other threads reach the supervisor's loop: they post to it, wake it, or borrow it.

``Lending`` is a part of :class:`~procsched.supervisor.Supervisor` kept in a
module of its own (a mixin: the same object). ``post()`` hands the loop a
job or a request and rings whoever runs the loop if it sleeps (``sleeper``);
``lend_turn()`` and ``lend()`` let a caller run the loop itself.

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
* A signal must not be handled inside a turn run by the main thread: a
  Ctrl-C's ``KeyboardInterrupt`` (or an alarm's exception, or ``sys.exit``
  from a SIGTERM handler) in the middle of a turn would leave a job popped
  from the queue and never placed. While the main thread runs a turn, every
  standard signal with a Python handler gets one that only records it; the
  signal is raised again, and handled as usual, between turns (:class:`_Guard`).
  The guard is made before the baton is taken, so that no handler can run
  between taking the baton and the ``try`` that gives it back.

A turn that raises is a supervisor crash, as on the loop's thread: the
borrower records it and wakes the loop's thread, which fails every job.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, cast

from .errors import PoolError
from .jobs import Job

if TYPE_CHECKING:
    import signal as _signal
    from collections import deque

    from .backends import Backend, Lendable
    from .futures import JobFuture
    from .ipc.doorbell import Doorbell
else:
    import _signal  # the C module under signal.py: no enum per call

_INF = float("inf")
# Longest sleep without a timer. Wakeups are event-driven; this only bounds
# what a wakeup lost to an exception inside post() (Ctrl-C) or a weaker
# memory order than the ring protocol assumes could cost.
BACKSTOP_MS = 1000


def sleep_ms(wake: float) -> int:
    """``poll``'s timeout (an int32 of ms) to wake at ``wake`` (monotonic; inf: no timer)."""
    if wake == _INF:
        return BACKSTOP_MS
    return min(BACKSTOP_MS, max(0, int((wake - time.monotonic()) * 1000) + 1))


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
    ended: bool
    crashed: BaseException | None
    broken: BaseException | None
    _ended_lock: threading.RLock
    now: float
    backend: Backend

    if TYPE_CHECKING:

        def _turn(self, now: float, ready: list[tuple[int, int]]) -> None: ...
        def _next_wake(self) -> float: ...

    def post(self, message: Any, borrow: bool = False) -> bool:
        """Hand a Job, a list of Jobs, or a control tuple to the loop.

        Jobs come only while the pool is open, so the loop is running. A
        control message may come after the loop has ended and closed its
        doorbell; it is dropped then (under ``_ended_lock``, so the ring can
        never hit a closed fd whose number was reused).

        With ``borrow``, jobs posted while the loop sleeps and a worker is idle
        wake nobody: the answer is True, and the caller runs the turn that
        places them itself (``lend_turn``), once it holds no lock of its own.
        """
        if type(message) is tuple:
            with self._ended_lock:
                if not self.ended:
                    self.intake.append(message)
                    # Always ring: if an exception (Ctrl-C) struck a poster between
                    # the two lines below, this still wakes the loop.
                    self.sleeping = False
                    self.sleeper.ring()
                    return False
            if message[0] == "jobs":  # jobs after all (fsync="always"): their futures fail
                self.intake.append(message)
                self._refuse_intake()
            return False
        self.intake.append(message)
        if self.ended:
            self._refuse_intake()
        elif self.sleeping:
            if borrow and self.idle and self.lendable:
                return True
            self._ring()
        return False

    def _ring(self) -> None:
        """Wake whoever runs the loop, if it sleeps.

        One ring per sleep: posts that race this one see False and skip the
        syscall (a rare double ring is harmless). Under the lock, as a loop
        that crashed while asleep closes the doorbell under it.
        """
        if self.sleeping:
            self.sleeping = False
            with self._ended_lock:
                if not self.ended:
                    self.sleeper.ring()

    def _refuse_intake(self) -> None:
        """Fail jobs posted after the loop ended (possible only when it crashed).

        Called by the loop as it ends and by ``post`` when it finds the loop
        ended: under the GIL one of the two always sees a racing job.
        """
        while self.intake:
            try:
                msg = self.intake.popleft()
            except IndexError:
                return
            if type(msg) is tuple and msg[0] == "jobs":
                msg[2].set()  # the submitter sees its futures fail
                msg = msg[1]
            for job in msg if type(msg) is list else (msg,) if type(msg) is Job else ():
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(self.broken or PoolError(f"the pool's supervisor crashed: {self.crashed!r}"))
                job.release_args()

    def on_loop(self) -> bool:
        """Whether the calling thread is running the loop now (a done-callback, say)."""
        return self.holder == threading.get_ident()

    def lend_turn(self) -> None:
        """Jobs were posted while the loop slept (``post`` said so): place them from here."""
        backend = cast("Lendable", self.backend)
        guard = _Guard.make()  # before the baton: a signal between taking it and the try would strand it
        try:
            if not self.baton.acquire(False):  # awake after all, or lent to someone else
                self._ring()
                return
            ring = True
            try:
                self.holder = threading.get_ident()
                self.lends += 1  # what the loop's thread polled before this turn is stale
                # A placement may report at once (a start whose timeout must be timed, a job
                # given back): one more turn applies it; past that the loop's thread does.
                if self._borrowed_turn([]) and (not backend.events or self._borrowed_turn([])):
                    self.idle = backend.idle_workers() > 0
                    ring = self.closing or bool(backend.events) or self._next_wake() < self.loop_wake
            finally:
                if ring:  # the loop's thread has something to do sooner than it planned
                    self.bell.ring()
                self.holder = 0
                self.baton.release()
        finally:
            guard.release()

    def lend(self, fut: JobFuture, timeout: float | None) -> None:
        """Run the loop on this thread until ``fut`` is done or ``timeout`` has passed, if the
        loop sleeps; return at once if it does not (the caller then waits on ``fut``)."""
        if not (self.sleeping and self.lendable):
            return
        end = _INF if timeout is None else time.monotonic() + timeout
        guard = _Guard.make()
        try:
            if not self.baton.acquire(False):
                return
            try:
                self.holder = threading.get_ident()
                self._lent(fut, end, guard)
            finally:
                guard.close()  # (open if a signal's handler raised while we slept)
                try:
                    self._hand_back()
                finally:
                    self.holder = 0
                    self.baton.release()
        finally:
            guard.release()

    def _lent(self, fut: JobFuture, end: float, guard: _Guard | _NoGuard) -> None:
        """The borrowed loop: turns, and sleeps on the lent doorbell, until ``fut`` is done."""
        backend = cast("Lendable", self.backend)
        poller = backend.lend_poller
        self.lends += 1
        self.sleeping = False
        self.sleeper = self.lent_bell
        backend.lend(True)
        ready: list[tuple[int, int]] = []
        while self._borrowed_turn(ready) and not fut.done() and self.lendable and not self.closing:
            ready = []
            spin = backend.spin_for()
            if spin and backend.watch(min(time.monotonic() + spin, end), self.intake) is not None:
                continue  # an outcome (or a post) came while we watched: no one rang, no one slept
            wake = min(self._next_wake(), end)
            self.sleeping = True
            if self.intake or not backend.prepare_sleep():
                ms = 0  # something came while we looked; a poll still sees deaths
            else:
                left = wake - time.monotonic()
                if left <= 0:
                    self.sleeping = False
                    backend.woke()
                    if end <= wake:
                        return  # the caller's timeout
                    continue  # a timer: the next turn fires it
                ms = sleep_ms(wake)
            guard.open()  # a signal while we sleep is the caller's, as it would be
            ready = poller.poll(ms)
            guard.close()
            self.sleeping = False
            if ms:
                self.lent_bell.drain()
            backend.woke()

    def _hand_back(self) -> None:
        """The loop goes back to its thread, asleep: the rings armed for it and, if it must act
        sooner than it planned (or take over what keeps coming), its doorbell rung."""
        backend = cast("Lendable", self.backend)
        ring = True
        try:
            backend.lend(False)
            self.sleeper = self.bell
            for _ in range(2):  # what came while we looked, once; more is the loop thread's
                self.sleeping = True
                if self.lent_failure is not None or (not self.intake and backend.prepare_sleep()):
                    break
                self.sleeping = False
                backend.woke()
                self._borrowed_turn([])
            else:
                return
            if self.lent_failure is None:
                self.idle = backend.idle_workers() > 0
                ring = self.closing or self._next_wake() < self.loop_wake
        finally:
            if ring:
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


# Signals whose Python handlers a guard holds back: the standard ones that can be caught.
_CATCHABLE = tuple(s for s in range(1, 32) if s not in (9, 19))  # (SIGKILL, SIGSTOP)


class _Guard:
    """Holds Python's signal handlers back while the main thread runs a turn (see the module doc).

    ``close()`` gives every signal that has a Python handler one that only
    records it; ``open()`` puts the originals back (unless something installed
    another meanwhile) and raises each recorded signal again, so that Python
    runs its handler as it would have (a Ctrl-C raising ``KeyboardInterrupt``),
    only after the turn. ``make()`` gives a no-op guard off the main thread
    (Python runs signal handlers on the main thread alone) or when no signal
    has a Python handler.
    """

    __slots__ = ("held", "hits", "closed", "recorder")

    def __init__(self, held: list[tuple[int, Any]]) -> None:
        self.held = held
        self.hits: list[int] = []
        self.closed = False
        self.recorder = self._record
        self.close()

    @staticmethod
    def make() -> _Guard | _NoGuard:
        if threading.current_thread() is not threading.main_thread():
            return _NO_GUARD
        get = _signal.getsignal
        held = [(sig, handler) for sig in _CATCHABLE if callable(handler := get(sig))]
        return _Guard(held) if held else _NO_GUARD

    def _record(self, signum: int, frame: Any) -> None:
        if signum not in self.hits:
            self.hits.append(signum)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for sig, _ in self.held:
                _signal.signal(sig, self.recorder)

    def open(self) -> None:
        if self.closed:
            self.closed = False
            for sig, handler in self.held:
                if _signal.getsignal(sig) is self.recorder:
                    _signal.signal(sig, handler)
            hits, self.hits = self.hits, []
            for sig in hits:
                _signal.raise_signal(sig)  # handled as Python handles any signal, right after this

    release = open


class _NoGuard:
    __slots__ = ()

    def close(self) -> None:
        pass

    def open(self) -> None:
        pass

    release = open


_NO_GUARD = _NoGuard()
