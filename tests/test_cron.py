"""Schedules in a running pool: firing, pause/resume/trigger/remove, overlap with real slow jobs, restarts.

When a schedule fires and what a misfire owes are tested exactly, with
explicit times, in test_schedule.py; here short real intervals test the
wiring, asserting what must happen, never how fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import wait_for
from jobfns import lines

import procsched
from procsched import JournalConfig
from procsched.journal import Journal

RESULT = 20.0


def tick(log: str, tag: str) -> str:
    with open(log, "a") as f:
        f.write(f"{tag}\n")
    return tag


def slow(log: str, seconds: float) -> None:
    """Write ``start <pid>``, sleep, write ``end <pid>``."""
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"end {os.getpid()}\n")


@pytest.mark.timeout(60)
def test_a_schedule_fires_pauses_resumes_triggers_and_goes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with procsched.Pool(2) as pool:
        assert pool.every(0.05, tick, str(log), "t", name="ticker") == "ticker"
        wait_for(lambda: len(lines(log)) >= 3, RESULT, "three firings")
        (listed,) = pool.schedules()
        assert listed["name"] == "ticker" and listed["runs"] >= 3 and not listed["paused"]
        assert pool.pause("ticker")
        wait_for(lambda: not pool.jobs(name="tick"), RESULT, "a firing already queued to land")
        paused_at = len(lines(log))
        time.sleep(0.3)
        assert len(lines(log)) == paused_at, "a paused schedule does not fire"
        assert pool.trigger("ticker")
        wait_for(lambda: len(lines(log)) == paused_at + 1, RESULT, "the triggered run")
        assert pool.resume("ticker")
        wait_for(lambda: len(lines(log)) >= paused_at + 3, RESULT, "firings after resume")
        assert pool.unschedule("ticker") and not pool.unschedule("ticker")
        assert pool.schedules() == []
        assert not pool.pause("nothing") and not pool.trigger("nothing")


@pytest.mark.timeout(30)
def test_bad_schedules_are_refused_naming_what_is_wrong() -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(ValueError, match="61"):
            pool.cron("61 * * * *", tick, "x", "y", name="bad")
        with pytest.raises(ValueError, match="timezone"):
            pool.cron("0 2 * * *", tick, "x", "y", name="bad", tz="Mars/Olympus")
        with pytest.raises(ValueError, match="misfire"):
            pool.cron("0 2 * * *", tick, "x", "y", name="bad", misfire="later")
        with pytest.raises(ValueError, match="overlap"):
            pool.every(1, tick, "x", "y", name="bad", overlap="both")
        with pytest.raises(ValueError, match="interval"):
            pool.every(0, tick, "x", "y", name="bad")
        with pytest.raises(TypeError, match="name"):
            pool.every(1, tick, "x", "y", name="")
        pool.cron("0 2 * * *", tick, "x", "y", name="nightly", tz="Europe/Berlin")
        with pytest.raises(ValueError, match="exists already"):
            pool.cron("0 3 * * *", tick, "x", "y", name="nightly")
        pool.cron("0 3 * * *", tick, "x", "y", name="nightly", replace=True)
        (listed,) = pool.schedules()
        assert "0 3 * * *" in listed["schedule"] and "Europe/Berlin" not in listed["schedule"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlap", ["skip", "allow", "queue", "replace"])
def test_overlap_policies_with_slow_runs(tmp_path: Path, overlap: str) -> None:
    """Runs longer than the schedule's period: what happens to the fire times that come while one runs.

    (replace kills a run and so its worker: its period leaves a new worker time to boot.)
    """
    log = tmp_path / "log"
    period, run = {"replace": (0.6, 1.5), "queue": (0.25, 0.4)}.get(overlap, (0.1, 0.4))
    with procsched.Pool(2) as pool:
        pool.every(period, slow, str(log), run, name="s", overlap=overlap)
        wait_for(lambda: sum(line.startswith("start") for line in lines(log)) >= 3, RESULT, "three starts")
        pool.unschedule("s")
        if overlap == "replace":  # each new run killed the one before it, so none of those ended
            wait_for(lambda: len(pool.schedules()) == 0, RESULT, "the removal")
    got = lines(log)
    starts, ends = [i for i, s in enumerate(got) if s.startswith("start")], [i for i, s in enumerate(got) if s.startswith("end")]
    depth, most = 0, 0  # how many runs were going at once
    for line in got:
        depth += 1 if line.startswith("start") else -1
        most = max(most, depth)
    if overlap in ("skip", "queue"):
        assert most == 1, got  # never two at once
        assert all(got[i].startswith("start") == (k % 2 == 0) for k, i in enumerate(sorted(starts + ends))), got
    elif overlap == "allow":
        assert most >= 2, got  # both workers busy with runs of one schedule
    else:
        killed = {line.split()[1] for line in got if line.startswith("start")} - {line.split()[1] for line in got if line.startswith("end")}
        assert killed, f"a replaced run is killed before its end: {got}"


@pytest.mark.timeout(60)
def test_a_schedule_comes_back_after_a_restart_and_catches_up(tmp_path: Path) -> None:
    path, log = tmp_path / "j", tmp_path / "log"
    pool = procsched.Pool(1, journal=str(path))
    pool.every(0.2, tick, str(log), "t", name="ticker", misfire="run_once")
    wait_for(lambda: len(lines(log)) >= 1, RESULT, "a first run")
    pool.terminate()
    state = Journal(JournalConfig(path=str(path)), readonly=True).state
    assert list(state.schedules) == ["ticker"] and state.schedules["ticker"].last > 0
    stopped = len(lines(log))
    time.sleep(0.7)  # downtime: about three fire times are missed
    with procsched.Pool(1, journal=str(path)) as again:
        (listed,) = again.schedules()
        assert listed["name"] == "ticker" and listed["misfire"] == "run_once"
        wait_for(lambda: len(lines(log)) >= stopped + 1, RESULT, "the catch-up run")
        again.unschedule("ticker")
    assert "ticker" not in Journal(JournalConfig(path=str(path)), readonly=True).state.schedules


@pytest.mark.timeout(60)
def test_catch_up_after_downtime_runs_every_missed_time(tmp_path: Path) -> None:
    """misfire="catch_up": a pool reopened after a stop runs each fire time it missed (and skip runs none).

    (With overlap="skip", the catch-up runs that come while the one before still runs would be skipped.)
    """
    path, log, skipped = tmp_path / "j", tmp_path / "log", tmp_path / "skipped"
    pool = procsched.Pool(1, journal=str(path))
    pool.every(0.25, tick, str(log), "c", name="owed", misfire="catch_up", overlap="allow")
    pool.every(0.25, tick, str(skipped), "s", name="skipped", misfire="skip")
    wait_for(lambda: lines(log) and lines(skipped), RESULT, "first runs")
    pool.terminate()
    state = Journal(JournalConfig(path=str(path)), readonly=True).state
    down_from = max(state.schedules["owed"].last, state.schedules["skipped"].last)
    before, skipped_before = len(lines(log)), len(lines(skipped))
    time.sleep(1.6)  # about six fire times missed
    with procsched.Pool(1, journal=str(path)) as again:
        missed = int((time.time() - down_from) / 0.25) - 1  # whole periods passed while down, at least
        wait_for(lambda: len(lines(log)) >= before + missed, RESULT, f"{missed} catch-up runs")
        caught_up = len(lines(log)) - before
        ran_skipped = len(lines(skipped)) - skipped_before
        again.unschedule("owed")
        again.unschedule("skipped")
    assert caught_up >= missed >= 4
    assert ran_skipped <= caught_up - missed + 2, "skip owes nothing for the downtime"
