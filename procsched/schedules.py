"""Recurring jobs: the supervisor's registry of cron and interval schedules.

``schedule.py`` says *when* a schedule fires and what a misfire owes; this
module keeps the schedules a pool runs and turns each fire time into an
ordinary job with the schedule's options. It belongs to the supervisor's
loop (one owner) and calls back into it to make, admit and cancel jobs.

Overlap, when a fire time comes while the schedule's previous run has not
finished: ``skip`` the new run, ``queue`` it behind the previous one,
``replace`` the previous one (it is killed), or ``allow`` both to run.

With a journal, every change is a record (``ScheduleSet`` holds the whole
schedule, ``ScheduleFired`` how far it has fired), so after a restart the
misfire policy decides what the downtime owes.
"""

from __future__ import annotations

import itertools

import msgspec
from collections.abc import Callable
from typing import Any

from .jobs import Job
from .journal import records as r
from .log import get_logger
from .schedule import CronSchedule, IntervalSchedule, Schedule, due

log = get_logger("procsched.schedules")

OVERLAP_POLICIES = ("skip", "queue", "replace", "allow")


class Entry:
    """One schedule as the loop runs it."""

    __slots__ = ("spec", "schedule", "handle", "active", "runs", "last_job", "next_at")

    def __init__(self, spec: r.ScheduleSet, handle: int) -> None:
        self.spec = msgspec.structs.replace(spec)  # its own copy: the journal's state changes by records only
        self.schedule: Schedule = (
            CronSchedule(spec.expr, spec.tz or None) if spec.kind == "cron" else IntervalSchedule(spec.every, spec.anchor)
        )
        self.handle = handle  # the timer's reference: a stale timer of a replaced schedule finds another
        self.active: list[int] = []  # its jobs not yet finished
        self.runs = 0
        self.last_job = 0
        self.next_at = 0.0

    def describe(self, live: Callable[[int], bool]) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name, "schedule": self.schedule.describe(), "misfire": s.misfire, "overlap": s.overlap,
            "paused": s.paused, "last": s.last or None, "next": None if s.paused else self.next_at,
            "runs": self.runs, "running": [j for j in self.active if live(j)], "last_job": self.last_job or None,
        }  # fmt: skip


class Schedules:
    """The loop's schedules; ``make_job``, ``admit``, ``cancel``, ``live`` and ``timer`` are the loop's."""

    def __init__(
        self,
        make_job: Callable[[r.ScheduleSet], Job],
        admit: Callable[[Job], None],
        cancel: Callable[[int], object],
        live: Callable[[int], bool],
        timer: Callable[[float, int], None],
        record: Callable[[r.Record], None] | None,
    ) -> None:
        self._make_job, self._admit, self._cancel, self._live, self._timer = make_job, admit, cancel, live, timer
        self._record = record
        self.by_name: dict[str, Entry] = {}
        self._by_handle: dict[int, Entry] = {}
        self._handles = itertools.count(1)
        self.stopped = False  # the pool is shutting down: nothing fires (a journal keeps the schedules)

    # -- changes ----------------------------------------------------------------
    def add(self, spec: r.ScheduleSet, wall: float, replace: bool = False, record: bool = True) -> None:
        if spec.name in self.by_name and not replace:
            raise ValueError(f"a schedule named {spec.name!r} exists already")
        old = self.by_name.pop(spec.name, None)
        if old is not None:
            del self._by_handle[old.handle]
        entry = Entry(spec, next(self._handles))
        self.by_name[spec.name] = entry
        self._by_handle[entry.handle] = entry
        if self._record is not None and record:
            self._record(spec)
        self._arm(entry, wall)

    def remove(self, name: str) -> bool:
        entry = self.by_name.pop(name, None)
        if entry is None:
            return False
        del self._by_handle[entry.handle]
        if self._record is not None:
            self._record(r.Unscheduled(name))
        return True

    def pause(self, name: str, paused: bool, wall: float) -> bool:
        entry = self.by_name.get(name)
        if entry is None:
            return False
        if entry.spec.paused != paused:
            entry.spec.paused = paused
            if not paused:  # the time it was paused is not owed
                entry.spec.last = wall
            if self._record is not None:
                self._record(r.SchedulePaused(name, paused, entry.spec.last))
            self._arm(entry, wall)
        return True

    def trigger(self, name: str) -> bool:
        entry = self.by_name.get(name)
        if entry is None or self.stopped:
            return False
        self._fire(entry)
        return True

    # -- time ---------------------------------------------------------------------
    def _arm(self, entry: Entry, wall: float) -> None:
        """Set the timer for the next fire time after what is decided (at once, if times are owed)."""
        if entry.spec.paused:
            return
        del self._by_handle[entry.handle]  # a timer set before (a pause, then a resume) finds nothing
        entry.handle = next(self._handles)
        self._by_handle[entry.handle] = entry
        entry.next_at = entry.schedule.next_after(entry.spec.last)
        self._timer(max(0.0, entry.next_at - wall), entry.handle)

    def due(self, handle: int, wall: float) -> None:
        """A schedule's timer went off: fire what the misfire policy says is owed."""
        entry = self._by_handle.get(handle)
        if entry is None or entry.spec.paused or self.stopped:
            return
        times, following = due(entry.schedule, entry.spec.last, wall, entry.spec.misfire)
        if times and times[-1] < wall - 1.0:
            log.info("schedule_misfire", schedule=entry.spec.name, owed=len(times), policy=entry.spec.misfire, oldest=times[0])
        for _ in times:
            self._fire(entry)
        entry.spec.last = max(entry.spec.last, wall)
        if self._record is not None:
            self._record(r.ScheduleFired(entry.spec.name, entry.spec.last))
        entry.next_at = following
        self._timer(following - wall, entry.handle)

    def _fire(self, entry: Entry) -> None:
        entry.active = [j for j in entry.active if self._live(j)]
        spec = entry.spec
        job = self._make_job(spec)
        if entry.active:
            if spec.overlap == "skip":
                log.info("schedule_overlap_skip", schedule=spec.name, running=entry.active[-1])
                job.release_args()
                return
            if spec.overlap == "replace":
                for old in entry.active:
                    self._cancel(old)
            elif spec.overlap == "queue":
                job.deps, job.dep_policy = (entry.active[-1],), "run"
        entry.active.append(job.id)
        entry.runs += 1
        entry.last_job = job.id
        self._admit(job)

    def snapshot(self) -> list[dict[str, Any]]:
        return [e.describe(self._live) for e in self.by_name.values()]
