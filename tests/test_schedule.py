"""Schedules, tested directly with explicit times: no clock, no sleeping.

Cron in UTC; cron across the DST transitions of Europe/Berlin and
America/New_York (the rules in ``procsched.schedule``'s docstring, each
pinned to an instant); the misfire policies after a simulated stall;
intervals; and the errors, each naming what is wrong.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from procsched.schedule import (
    CronSchedule,
    IntervalSchedule,
    Schedule,
    due,
    parse_cron,
)

def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc).timestamp()


def local(tz: str, y: int, mo: int, d: int, h: int = 0, mi: int = 0, fold: int = 0) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(tz), fold=fold).timestamp()


def midnight(tz: str, day: date) -> float:
    return local(tz, day.year, day.month, day.day)


def fires(schedule: Schedule, start: float, end: float) -> list[float]:
    """Every fire time in ``(start, end]``, by chaining ``next_after``."""
    out = []
    t = schedule.next_after(start)
    while t <= end:
        out.append(t)
        t = schedule.next_after(t)
    return out


def walls(tz: str, times: list[float]) -> list[str]:
    return [datetime.fromtimestamp(t, ZoneInfo(tz)).strftime("%d %H:%M %Z") for t in times]


# -- cron in UTC --------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/15 * * * *", utc(2024, 1, 1), utc(2024, 1, 1, 0, 15)),
        ("*/15 * * * *", utc(2024, 1, 1, 0, 7, 30), utc(2024, 1, 1, 0, 15)),
        ("*/15 * * * *", utc(2024, 1, 1, 0, 15) - 0.001, utc(2024, 1, 1, 0, 15)),
        ("*/15 * * * *", utc(2024, 1, 1, 23, 50), utc(2024, 1, 2)),
        ("0 2 * * *", utc(2024, 1, 1), utc(2024, 1, 1, 2)),
        ("0 2 * * *", utc(2024, 1, 1, 2), utc(2024, 1, 2, 2)),  # strictly after
        ("0 2 * * *", utc(2024, 2, 28, 3), utc(2024, 2, 29, 2)),
        # 6 fields: the trailing one is seconds
        ("*/15 * * * * 30", utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 30)),
        ("*/15 * * * * 30", utc(2024, 1, 1, 0, 0, 30), utc(2024, 1, 1, 0, 15, 30)),
        ("0 0 * * * */10", utc(2024, 1, 1, 0, 0, 10) + 0.5, utc(2024, 1, 1, 0, 0, 20)),
        ("0 0 * * * */10", utc(2024, 1, 1, 0, 0, 50), utc(2024, 1, 2)),
    ],
)
def test_cron_next_after_in_utc(expr: str, after: float, expected: float) -> None:
    schedule = parse_cron(expr, None)
    assert schedule.next_after(after) == expected
    assert parse_cron(expr, "UTC").next_after(after) == expected


@pytest.mark.timeout(10)
def test_cron_is_a_schedule_and_describes_itself() -> None:
    schedule = CronSchedule("0 2 * * *", "Europe/Berlin")
    assert isinstance(schedule, Schedule)
    assert isinstance(IntervalSchedule(60, 0), Schedule)
    assert "0 2 * * *" in schedule.describe() and "Europe/Berlin" in schedule.describe()
    assert "UTC" in CronSchedule("0 2 * * *").describe()
    assert "60 s" in IntervalSchedule(60, 0).describe()


# -- cron across DST ------------------------------------------------------------

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"
# (zone, transition day, daily expression, the instant it fires that day)
DAILY = [
    # spring forward, 02:00 -> 03:00: a gap time fires pushed forward by the gap
    (BERLIN, date(2024, 3, 31), "0 2 * * *", utc(2024, 3, 31, 1, 0)),  # 03:00 CEST
    (BERLIN, date(2024, 3, 31), "30 2 * * *", utc(2024, 3, 31, 1, 30)),  # 03:30 CEST
    (NEW_YORK, date(2024, 3, 10), "0 2 * * *", utc(2024, 3, 10, 7, 0)),  # 03:00 EDT
    (NEW_YORK, date(2024, 3, 10), "30 2 * * *", utc(2024, 3, 10, 7, 30)),  # 03:30 EDT
    # fall back, 03:00 -> 02:00 in Berlin: a repeated time fires at its first occurrence
    (BERLIN, date(2024, 10, 27), "0 2 * * *", utc(2024, 10, 27, 0, 0)),  # 02:00 CEST
    (BERLIN, date(2024, 10, 27), "30 2 * * *", utc(2024, 10, 27, 0, 30)),  # 02:30 CEST
    # fall back, 02:00 -> 01:00 in New York: 02:xx happens once, 01:xx twice
    (NEW_YORK, date(2024, 11, 3), "0 2 * * *", utc(2024, 11, 3, 7, 0)),  # 02:00 EST
    (NEW_YORK, date(2024, 11, 3), "30 2 * * *", utc(2024, 11, 3, 7, 30)),  # 02:30 EST
    (NEW_YORK, date(2024, 11, 3), "30 1 * * *", utc(2024, 11, 3, 5, 30)),  # 01:30 EDT, not EST
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("tz", "day", "expr", "instant"), DAILY)
def test_daily_cron_fires_once_a_day_across_a_transition(tz: str, day: date, expr: str, instant: float) -> None:
    schedule = CronSchedule(expr, tz)
    before, after = day - timedelta(days=1), day + timedelta(days=2)
    got = fires(schedule, midnight(tz, before), midnight(tz, after))
    dates = [datetime.fromtimestamp(t, ZoneInfo(tz)).date() for t in got]
    assert dates == [before, day, day + timedelta(days=1)], walls(tz, got)
    assert got[1] == instant, walls(tz, got)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("tz", "day"), [(BERLIN, date(2024, 10, 27)), (NEW_YORK, date(2024, 11, 3))])
def test_hourly_cron_on_fall_back_night_fires_once_per_wall_hour(tz: str, day: date) -> None:
    start = midnight(tz, day) - 1
    end = midnight(tz, day + timedelta(days=1)) - 1  # 25 hours later
    got = fires(CronSchedule("0 * * * *", tz), start, end)
    zone = ZoneInfo(tz)
    assert [datetime.fromtimestamp(t, zone).hour for t in got] == list(range(24)), walls(tz, got)
    assert all(datetime.fromtimestamp(t, zone).fold == 0 for t in got)  # the first occurrence
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert sorted(gaps) == [3600.0] * 22 + [7200.0]  # the repeated hour's second run is the one left out


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("tz", "day"), [(BERLIN, date(2024, 3, 31)), (NEW_YORK, date(2024, 3, 10))])
def test_hourly_cron_on_spring_forward_night_loses_nothing(tz: str, day: date) -> None:
    start = midnight(tz, day) - 1
    end = midnight(tz, day + timedelta(days=1)) - 1  # 23 hours later
    got = fires(CronSchedule("0 * * * *", tz), start, end)
    # Every hour that exists fires once: 02:00 (gap) lands on 03:00, which fires once.
    assert got == [start + 1 + 3600 * h for h in range(23)], walls(tz, got)
    assert [datetime.fromtimestamp(t, ZoneInfo(tz)).hour for t in got] == [0, 1, *range(3, 24)]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("tz", "day", "count"),
    [
        (BERLIN, date(2024, 3, 31), 46),  # 23 h: 02:00 and 02:30 land on 03:00 and 03:30
        (NEW_YORK, date(2024, 3, 10), 46),
        (BERLIN, date(2024, 10, 27), 48),  # 25 h, but the repeated 02:00 and 02:30 fire once
        (NEW_YORK, date(2024, 11, 3), 48),
    ],
)
def test_half_hourly_cron_never_repeats_or_goes_back(tz: str, day: date, count: int) -> None:
    schedule = CronSchedule("*/30 * * * *", tz)
    start = midnight(tz, day) - 1
    end = midnight(tz, day + timedelta(days=1)) - 1
    got = fires(schedule, start, end)
    assert len(got) == count, walls(tz, got)
    assert all(a < b for a, b in zip(got, got[1:])), walls(tz, got)
    assert {datetime.fromtimestamp(t, ZoneInfo(tz)).minute for t in got} == {0, 30}
    # next_after is a function of t alone: from any instant it gives the next of these
    for k in range(0, int(end - start), 97):
        t = start + k + 0.25
        assert schedule.next_after(t) == min(f for f in got + [schedule.next_after(end)] if f > t)


@pytest.mark.timeout(10)
def test_cron_started_inside_the_gap_window_still_fires_the_shifted_time() -> None:
    # At 03:10 CEST on the spring-forward day, 02:45 (gap) still lies ahead: at 03:45 CEST.
    schedule = CronSchedule("45 2 * * *", BERLIN)
    assert schedule.next_after(local(BERLIN, 2024, 3, 31, 3, 10)) == local(BERLIN, 2024, 3, 31, 3, 45)
    assert schedule.next_after(local(BERLIN, 2024, 3, 31, 3, 45)) == local(BERLIN, 2024, 4, 1, 2, 45)


@pytest.mark.timeout(10)
def test_cron_with_a_half_hour_gap_keeps_real_times_ahead_of_shifted_ones() -> None:
    # Lord Howe springs 02:00 -> 02:30. 02:40 exists and fires at its own time;
    # 02:20 does not, and fires shifted by the gap, at 02:50.
    tz = "Australia/Lord_Howe"
    got = fires(CronSchedule("20,40 2 * * *", tz), local(tz, 2024, 10, 6), local(tz, 2024, 10, 6, 12))
    assert walls(tz, got) == ["06 02:40 +11", "06 02:50 +11"]


# -- misfire ------------------------------------------------------------------

HOURLY = CronSchedule("0 * * * *")
LAST = utc(2024, 1, 1)  # the hourly schedule last fired at midnight
STALLED = utc(2024, 1, 1, 6, 30)  # ... and the loop wakes 6.5 hours later
MISSED = [utc(2024, 1, 1, h) for h in range(1, 7)]
NEXT = utc(2024, 1, 1, 7)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("misfire", "fired"),
    [("skip", []), ("run_once", MISSED[-1:]), ("catch_up", MISSED)],
)
def test_misfire_after_a_six_hour_stall(misfire: str, fired: list[float]) -> None:
    assert due(HOURLY, LAST, STALLED, misfire) == (fired, NEXT)


@pytest.mark.timeout(10)
def test_catch_up_is_bounded_to_the_newest() -> None:
    assert due(HOURLY, LAST, STALLED, "catch_up", max_catch_up=4) == (MISSED[-4:], NEXT)
    assert due(HOURLY, LAST, STALLED, "catch_up", max_catch_up=1) == (MISSED[-1:], NEXT)
    year_later = utc(2025, 1, 1, 0, 30)
    assert due(HOURLY, LAST, year_later, "catch_up", max_catch_up=3) == (
        [utc(2024, 12, 31, 22), utc(2024, 12, 31, 23), utc(2025, 1, 1)],
        utc(2025, 1, 1, 1),
    )


@pytest.mark.timeout(10)
@pytest.mark.parametrize("misfire", ["skip", "run_once", "catch_up"])
def test_a_fire_time_a_few_ms_late_fires_under_every_policy(misfire: str) -> None:
    assert due(HOURLY, utc(2024, 1, 1, 6), NEXT + 0.002, misfire) == ([NEXT], utc(2024, 1, 1, 8))


@pytest.mark.timeout(10)
def test_skip_fires_only_an_on_time_latest_and_drops_the_rest() -> None:
    on_time = utc(2024, 1, 1, 6) + 0.002  # stalled 6 hours, but woke just as 06:00 came due
    assert due(HOURLY, LAST, on_time, "skip") == ([MISSED[-1]], NEXT)
    assert due(HOURLY, LAST, MISSED[-1] + 1.0, "skip") == ([MISSED[-1]], NEXT)  # grace is inclusive
    assert due(HOURLY, LAST, MISSED[-1] + 1.001, "skip") == ([], NEXT)
    assert due(HOURLY, LAST, MISSED[-1] + 30, "skip", grace=60) == ([MISSED[-1]], NEXT)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("misfire", ["skip", "run_once", "catch_up"])
def test_nothing_owed(misfire: str) -> None:
    assert due(HOURLY, LAST, LAST + 1800, misfire) == ([], utc(2024, 1, 1, 1))
    assert due(HOURLY, LAST, LAST, misfire) == ([], utc(2024, 1, 1, 1))
    # a clock that stepped back does not fire midnight again
    assert due(HOURLY, LAST, LAST - 7200, misfire) == ([], utc(2024, 1, 1, 1))


@pytest.mark.timeout(10)
def test_run_once_after_a_long_stall_of_a_per_second_schedule_is_cheap() -> None:
    every_second = CronSchedule("* * * * * *", NEW_YORK)
    week = 7 * 86400
    assert due(every_second, LAST, LAST + week + 0.5, "run_once") == ([LAST + week], LAST + week + 1)
    fired, _ = due(every_second, LAST, LAST + week + 0.5, "catch_up")
    assert fired == [LAST + week - 99 + k for k in range(100)]


# -- intervals ------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_interval_next_after() -> None:
    schedule = IntervalSchedule(10, anchor=1000.5)
    assert schedule.next_after(1000.5) == 1010.5  # strictly after
    assert schedule.next_after(1005) == 1010.5
    assert schedule.next_after(1010.4999) == 1010.5
    assert schedule.next_after(1010.5) == 1020.5
    assert schedule.next_after(981) == 990.5  # the anchor sets the phase, not a start
    tenth = IntervalSchedule(0.1, anchor=0)
    got = fires(tenth, 0.0, 100.0)
    assert all(a < b for a, b in zip(got, got[1:]))
    assert [round(t * 10) for t in got] == list(range(1, 1001))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("misfire", "now", "fired"),
    [
        ("skip", 930.0, []),
        ("skip", 900.5, [900.0]),
        ("run_once", 930.0, [900.0]),
        ("catch_up", 930.0, [660.0, 720.0, 780.0, 840.0, 900.0]),
    ],
)
def test_interval_due(misfire: str, now: float, fired: list[float]) -> None:
    assert due(IntervalSchedule(60, anchor=0), 600, now, misfire) == (fired, 960.0)


# -- errors ---------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("expr", "tz", "message"),
    [
        ("* * * *", None, r"bad cron expression '\* \* \* \*': 4 fields, expected 5"),
        ("0 0 * * * * 2030", None, "7 fields"),
        ("61 * * * *", None, "bad cron expression '61 .*out of range"),
        ("0 0 30 2 *", None, "bad cron expression '0 0 30 2 \\*': it never fires"),
        ("0 2 * * *", "Mars/Olympus_Mons", "unknown timezone 'Mars/Olympus_Mons'"),
        ("0 2 * * *", "", "unknown timezone ''"),
        ("0 2 * * *", "Europe", "unknown timezone 'Europe'"),
    ],
)
def test_parse_cron_names_what_is_wrong(expr: str, tz: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cron(expr, tz)


@pytest.mark.timeout(10)
def test_due_names_a_bad_misfire_policy() -> None:
    with pytest.raises(ValueError, match="misfire='coalesce': must be one of 'skip', 'run_once', 'catch_up'"):
        due(HOURLY, LAST, STALLED, "coalesce")
    with pytest.raises(ValueError, match="max_catch_up=0"):
        due(HOURLY, LAST, STALLED, "catch_up", max_catch_up=0)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("every", [0, -5, float("nan"), float("inf")])
def test_interval_must_be_positive(every: float) -> None:
    with pytest.raises(ValueError, match=f"every={every!r}: must be a positive"):
        IntervalSchedule(every, anchor=0)
