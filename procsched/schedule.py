"""Recurring schedules: when a job fires, and which missed fire times are owed.

Owns ``CronSchedule`` (croniter, in a time zone) and ``IntervalSchedule``
behind one protocol (``next_after``, ``describe``), and ``due``, the misfire
decision. Never touches the clock, threads, I/O or the job table: times are
parameters, UTC epoch seconds (float); only the supervisor loop reads a clock.

Cron has 5 fields (minute hour day month weekday) or 6, the sixth a trailing
*seconds* field (croniter's order, not Quartz's): ``"*/15 * * * * 30"`` fires
at :30 past each quarter hour. croniter walks naive local wall-clock times
(tz-aware, it mishandles DST); each wall time becomes an instant by zoneinfo:

1. A wall time in a spring-forward gap fires at its ``fold=0`` instant, i.e.
   pushed forward by the gap; the run is not lost. ``"30 2 * * *"`` fires on
   2024-03-31 in Europe/Berlin at 03:30 CEST (01:30Z), on 2024-03-10 in
   America/New_York at 03:30 EDT (07:30Z).
2. A wall time that occurs twice (fall-back) fires once, at its first
   occurrence (``fold=0``): ``"30 2 * * *"`` on 2024-10-27 in Berlin fires at
   02:30 CEST (00:30Z) and not at 02:30 CET; ``"0 * * * *"`` fires once per
   wall-clock hour that night, the repeated hour once.
3. Fire times strictly increase; an instant reached twice fires once. On the
   Berlin spring-forward day ``"0 * * * *"`` maps 02:00 onto 03:00 CEST, the
   instant of the real 03:00, and fires 01:00 CET, 03:00 CEST, 04:00 CEST.

Precisely, the fire times are the set of instants the matching wall times
map to, in order, so ``next_after(t)`` depends on ``t`` alone. For whole-hour
gaps that equals "skip an instant not after the previous one"; in a 30-minute
gap (Australia/Lord_Howe, 02:00 -> 02:30) it also keeps a real 02:40 that
comes before the shifted 02:20 (fired at 02:50).

``due``: the owed times are the fire times in ``(last, now]``; ``last`` is
where the previous decision left off (the last fire, the creation time, or
the previous call's ``now``). Policies (``misfire``):

- ``skip``: the newest owed time, only if at most ``grace`` seconds (default
  1) before ``now``; else nothing. Waking 2 ms late fires the current time;
  waking after a 6-hour stall fires none of the missed ones.
- ``run_once``: the newest owed time, however late (one catch-up run).
- ``catch_up``: every owed time, oldest first; at most ``max_catch_up``, the
  newest ones if more are owed.

So every policy fires an on-time fire time. ``due`` also returns the next fire
time after ``max(last, now)``: the timer to set. ``skip`` and ``run_once``
cost O(log stall) ``next_after`` calls, however many times were missed.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MISFIRE_POLICIES = ("skip", "run_once", "catch_up")
DEFAULT_GRACE = 1.0

_EPOCH = datetime(1970, 1, 1)
_PROBE = datetime(2000, 1, 1)  # validation start: any satisfiable 5/6-field cron fires within 8 years
_DAY_AND_HOUR = 25 * 3600  # looking this far back finds the offset before any recent transition


@runtime_checkable
class Schedule(Protocol):
    def next_after(self, t: float) -> float: ...  # the first fire time strictly after t

    def describe(self) -> str: ...  # one line for logs and the CLI


class CronSchedule:
    """A cron expression in a time zone (IANA name; ``None`` is UTC). Not for concurrent use."""

    def __init__(self, expr: str, tz: str | None = None) -> None:
        fields = expr.split()
        if len(fields) not in (5, 6) and not (len(fields) == 1 and fields[0].startswith("@")):
            raise ValueError(
                f"bad cron expression {expr!r}: {len(fields)} fields, expected 5"
                " (minute hour day month weekday) or 6 (the same, then seconds)"
            )
        self.expr, self.tz, self._zone = expr, tz, _zone(tz)
        from croniter import CroniterBadDateError, croniter  # here: a pool without cron does not load it (~30 ms)

        try:
            self._iter = croniter(expr, _PROBE)
            self._iter.get_next(datetime)
        except CroniterBadDateError:
            raise ValueError(f"bad cron expression {expr!r}: it never fires (no such date)") from None
        except (ValueError, TypeError) as exc:  # croniter's errors are ValueErrors (one a TypeError)
            raise ValueError(f"bad cron expression {expr!r}: {exc}") from None

    def describe(self) -> str:
        return f"cron {self.expr!r} ({self.tz or 'UTC'})"

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, tz={self.tz!r})"

    def next_after(self, t: float) -> float:
        base = math.floor(t) - 1  # a whole second before t; candidates at or before t are filtered
        w1, at1 = self._first_after(self._start_wall(base), t)
        gap = self._gap(w1)
        if not gap:
            return at1  # an existing wall time: every later wall time maps later
        # w1 was pushed forward over a gap; real wall times just after the gap
        # map to the instants the gap skipped, and one may come before at1.
        end_of_gap = _naive(self._transition(at1 - gap, at1) + self._offset(math.ceil(at1)))
        start = max(end_of_gap, _naive(base + self._offset(base))) - timedelta(seconds=1)
        return min(at1, self._first_after(start, t)[1])

    def _first_after(self, start: datetime, t: float) -> tuple[datetime, float]:
        """The first matching wall time after ``start`` whose instant is after ``t``."""
        self._iter.set_current(start, force=True)
        while True:
            wall: datetime = self._iter.get_next(datetime)
            at = wall.replace(tzinfo=self._zone).timestamp()  # fold=0: rules 1 and 2
            if at > t:
                return wall, at

    def _start_wall(self, base: int) -> datetime:
        """Wall clock at ``base``, moved back over a spring-forward gap if ``base`` is less than a
        gap after it: wall times in the gap map forward, after ``base``, though their walls are behind."""
        offset = self._offset(base)
        jump = offset - self._offset(base - _DAY_AND_HOUR)
        if jump > 0:
            offset = min(offset, self._offset(base - jump))
        return _naive(base + offset)

    def _gap(self, wall: datetime) -> int:
        """Seconds of the spring-forward gap ``wall`` falls in; 0 if it exists."""
        before, after = (_seconds(wall.replace(tzinfo=self._zone, fold=f).utcoffset()) for f in (0, 1))
        return max(0, after - before)

    def _offset(self, ts: int) -> int:
        return _seconds(datetime.fromtimestamp(ts, self._zone).utcoffset())

    def _transition(self, lo: float, hi: float) -> int:
        """The whole second, in ``(lo, hi]``, at which the offset at ``lo`` changes."""
        low, high, offset = math.floor(lo), math.ceil(hi), self._offset(math.floor(lo))
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self._offset(mid) == offset else (low, mid)
        return high


class IntervalSchedule:
    """Fires at ``anchor + k * every`` for every integer ``k``: the anchor sets the phase."""

    def __init__(self, every: float, anchor: float) -> None:
        if not (math.isfinite(every) and every > 0):
            raise ValueError(f"interval every={every!r}: must be a positive, finite number of seconds")
        if not math.isfinite(anchor):
            raise ValueError(f"interval anchor={anchor!r}: must be a finite epoch time")
        self.every, self.anchor = float(every), float(anchor)

    def describe(self) -> str:
        return f"every {self.every:g} s (anchored at {self.anchor:.3f})"

    def __repr__(self) -> str:
        return f"IntervalSchedule(every={self.every!r}, anchor={self.anchor!r})"

    def next_after(self, t: float) -> float:
        k = math.floor((t - self.anchor) / self.every) + 1
        while self.anchor + k * self.every <= t:  # float rounding: at most a step either way
            k += 1
        while self.anchor + (k - 1) * self.every > t:
            k -= 1
        return self.anchor + k * self.every


def parse_cron(expr: str, tz: str | None) -> CronSchedule:
    """A ``CronSchedule``; ``ValueError`` naming what is wrong (expression or time zone)."""
    return CronSchedule(expr, tz)


def due(
    schedule: Schedule, last: float, now: float, misfire: str, max_catch_up: int = 100, *, grace: float = DEFAULT_GRACE
) -> tuple[list[float], float]:
    """The fire times to run at ``now`` (oldest first), and the next fire time after it.

    Owed are the fire times in ``(last, now]``; ``misfire`` picks among them
    (see the module docstring). If ``now <= last`` (a clock that stepped
    back) nothing is owed and the next fire time is after ``last``.
    """
    if misfire not in MISFIRE_POLICIES:
        raise ValueError(f"misfire={misfire!r}: must be one of {', '.join(map(repr, MISFIRE_POLICIES))}")
    if isinstance(max_catch_up, bool) or not isinstance(max_catch_up, int) or max_catch_up < 1:
        raise ValueError(f"max_catch_up={max_catch_up!r}: must be an int >= 1")
    if not grace >= 0:
        raise ValueError(f"grace={grace!r}: must be >= 0 seconds")
    following = schedule.next_after(max(last, now))
    if now <= last:
        return [], following
    if misfire == "catch_up":
        return _newest(schedule, last, now, max_catch_up), following
    latest = _latest(schedule, last, now)
    if latest is None or (misfire == "skip" and now - latest > grace):
        return [], following
    return [latest], following


def _latest(schedule: Schedule, after: float, now: float) -> float | None:
    """The last fire time in ``(after, now]``, in O(log(now - after)) calls."""
    if schedule.next_after(after) > now:
        return None
    lo, hi = after, now  # invariant: next_after(lo) <= now < next_after(hi)
    step = 1.0
    while now - step > lo:  # probe back from now, doubling, so a long stall stays cheap
        if schedule.next_after(now - step) <= now:
            lo = now - step
            break
        hi, step = now - step, step * 2
    while True:
        fire = schedule.next_after(lo)
        if schedule.next_after(fire) > now:
            return fire
        lo = fire
        mid = (lo + hi) / 2
        if not lo < mid < hi:  # (lo, hi] is one float wide: it holds one fire
            return schedule.next_after(lo)
        lo, hi = (mid, hi) if schedule.next_after(mid) <= now else (lo, mid)


def _newest(schedule: Schedule, after: float, now: float, limit: int) -> list[float]:
    """The newest ``limit`` fire times in ``(after, now]``, oldest first."""
    owed: list[float] = []
    fire = schedule.next_after(after)
    while fire <= now and len(owed) <= limit:
        owed.append(fire)
        fire = schedule.next_after(fire)
    if len(owed) <= limit:
        return owed
    # More are owed than we may run: windows back from now, doubling from the
    # span the first ones took, until one holds ``limit`` fire times.
    span = owed[-1] - owed[0]
    while True:
        start = max(after, now - span)
        newest: deque[float] = deque(maxlen=limit)
        fire = schedule.next_after(start)
        while fire <= now:
            newest.append(fire)
            fire = schedule.next_after(fire)
        if len(newest) == limit or start == after:
            return list(newest)
        span *= 2


def _zone(tz: str | None) -> tzinfo:
    if tz is None:
        return timezone.utc
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):  # OSError: a directory, e.g. "Europe"
        raise ValueError(f"unknown timezone {tz!r} (expected an IANA name such as 'Europe/Berlin')") from None


def _seconds(offset: timedelta | None) -> int:
    assert offset is not None  # a ZoneInfo or UTC always has one
    return int(offset.total_seconds())


def _naive(ts: float) -> datetime:
    """Epoch seconds as a naive datetime, exactly (no local-time conversion)."""
    return _EPOCH + timedelta(seconds=ts)
