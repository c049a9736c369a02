"""Jobs that wait, jobs submitted in bulk, jobs cancelled or reprioritized before or while they run.

Real processes and short real delays for the wiring; what must hold is
"not before its time" and "in this order", never how fast.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import await_file, wait_for
from jobfns import gated, lines

import procsched
from procsched import JournalConfig
from procsched.journal import Journal

RESULT = 20.0
JOB_WAIT = 30.0


def square(x: int) -> int:
    return x * x


def stamp(log: str, name: str) -> float:
    """Append ``name`` to the log; the wall time it ran at."""
    now = time.time()
    with open(log, "a") as f:
        f.write(f"{name}\n")
    return now


def sleeper(gate: str) -> None:
    Path(gate, "started").touch()
    time.sleep(JOB_WAIT)


def fail_then(counter: str) -> int:
    n = int(Path(counter).read_text()) + 1 if Path(counter).exists() else 1
    Path(counter).write_text(str(n))
    raise RuntimeError(f"attempt {n}")


# -- delayed jobs -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_delayed_job_starts_no_sooner_than_asked(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with procsched.Pool(1) as pool:
        pool.submit(square, 1).result(timeout=RESULT)  # the worker is up
        asked = time.time()
        later = pool.options(delay=0.3).submit(stamp, log, "later")
        now = pool.submit(stamp, log, "now")
        at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=0.2)
        by_time = pool.options(run_at=at).submit(stamp, log, "at")
        assert later.result(timeout=RESULT) >= asked + 0.3
        assert by_time.result(timeout=RESULT) >= at.timestamp()
        assert now.result(timeout=RESULT) < later.result()
    assert lines(tmp_path / "log") == ["now", "at", "later"]


@pytest.mark.timeout(10)
def test_bad_times_are_refused_naming_the_option() -> None:
    with procsched.Pool(1) as pool:
        with pytest.raises(ValueError, match="timezone-aware"):
            pool.options(run_at=datetime.datetime.now())
        with pytest.raises(ValueError, match="'delay'"):
            pool.options(delay=-1)
        with pytest.raises(TypeError, match="exclude"):
            pool.options(delay=1, run_at=datetime.datetime.now(datetime.timezone.utc))
        with pytest.raises(TypeError, match="'run_at'"):
            pool.options(run_at="tomorrow")


@pytest.mark.timeout(60)
def test_a_delayed_job_waits_across_a_restart(tmp_path: Path) -> None:
    """The journal keeps a delayed job's time: the next pool starts it then, not before."""
    path, log = tmp_path / "j", str(tmp_path / "log")
    pool = procsched.Pool(1, journal=str(path))
    due = time.time() + 1.0
    pool.options(delay=1.0).submit(stamp, log, "delayed")
    pool.terminate()  # stops this process's work; the journal still holds the job
    (entry,) = Journal(JournalConfig(path=str(path)), readonly=True).state.jobs.values()
    assert entry.state == "pending" and abs(entry.retry_at - due) < 0.5
    with procsched.Pool(1, journal=str(path)) as again:
        (fut,) = again.recovered.values()
        assert fut.result(timeout=RESULT) >= entry.retry_at


# -- submit_many ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_submit_many_keeps_order_and_is_all_or_nothing() -> None:
    with procsched.Pool(2) as pool:
        futures = pool.submit_many([(square, (i,)) for i in range(50)] + [(square, (), {"x": 7}), (os.getpid,)])
        assert [f.result(timeout=RESULT) for f in futures[:51]] == [i * i for i in range(50)] + [49]
        before = pool.stats()["submitted"]
        with pytest.raises(procsched.SerializationError):
            pool.submit_many([(square, (1,)), (square, (threading.Lock(),))])
        with pytest.raises(TypeError, match="call 1"):
            pool.submit_many([(square, (1,)), [square, (2,)]])  # type: ignore[list-item]
        pool.submit(square, 0).result(timeout=RESULT)
        assert pool.stats()["submitted"] == before + 1, "a refused batch submits nothing"


# -- cancel and reprioritize ------------------------------------------------------


@pytest.mark.timeout(60)
def test_cancel_in_every_state(tmp_path: Path) -> None:
    gate, counter = tmp_path / "gate", str(tmp_path / "n")
    gate.mkdir()
    with procsched.Pool(1, journal=str(tmp_path / "j")) as pool:
        running = pool.submit(sleeper, str(gate))
        await_file(gate / "started", RESULT)
        queued = pool.submit(square, 2)
        delayed = pool.options(delay=30).submit(square, 3)
        assert pool.cancel(queued) and queued.cancelled()
        assert pool.cancel(delayed.job_id) and delayed.cancelled()
        assert not pool.cancel(running), "a running job needs kill=True"
        assert pool.cancel(running, kill=True)
        with pytest.raises(cf.CancelledError):
            running.result(timeout=RESULT)
        assert running.cancelled()
        retrying = pool.options(retries=procsched.RetryPolicy.make(3, backoff=30)).submit(fail_then, counter)
        # its first attempt failed: now it waits 30 s for the next
        wait_for(lambda: pool.stats()["retried"] >= 1, RESULT, "the first attempt to fail")
        assert pool.cancel(retrying) and retrying.cancelled()
        assert not pool.cancel(running), "an ended job cannot be cancelled again"
        assert pool.submit(square, 5).result(timeout=RESULT) == 25, "the killed worker was replaced"
        assert pool.stats()["cancelled"] == 4
    states = {e.job: e.state for e in Journal(JournalConfig(path=str(tmp_path / "j")), readonly=True).state.jobs.values()}
    for fut in (running, queued, delayed, retrying):
        assert states[fut.job_id] == "cancelled", (fut, states)


@pytest.mark.timeout(60)
def test_cancel_a_job_waiting_in_a_workers_prefetch(tmp_path: Path) -> None:
    """A job placed on a worker but not begun is taken back, not run, and its worker is not killed."""
    gate, log = tmp_path / "gate", str(tmp_path / "log")
    gate.mkdir()
    with procsched.Pool(1, prefetch_s=10.0) as pool:
        list(pool.map(square, range(20)))  # a job duration is known: the worker prefetches
        blocker = pool.submit(gated, str(gate), "done")
        behind = [pool.submit(stamp, log, f"b{i}") for i in range(3)]
        await_file(gate / "started", RESULT)
        assert pool.cancel(behind[1])
        (gate / "go").touch()
        assert blocker.result(timeout=RESULT) == "done"
        assert behind[0].result(timeout=RESULT) and behind[2].result(timeout=RESULT)
        assert behind[1].cancelled()
        assert pool.stats()["restarts"] == 0
    assert sorted(lines(tmp_path / "log")) == ["b0", "b2"]


@pytest.mark.timeout(60)
def test_reprioritize_a_queued_job(tmp_path: Path) -> None:
    gate, log = tmp_path / "gate", str(tmp_path / "log")
    gate.mkdir()
    path = tmp_path / "j"
    with procsched.Pool(1, journal=str(path), aging_rate=0.0) as pool:
        blocker = pool.submit(gated, str(gate), "done")
        await_file(gate / "started", RESULT)
        first = pool.submit(stamp, log, "first")
        second = pool.submit(stamp, log, "second")
        assert pool.reprioritize(second, 10)
        assert not pool.reprioritize(blocker, 10), "it has started"
        with pytest.raises(TypeError, match="priority"):
            pool.reprioritize(first, 1.5)  # type: ignore[arg-type]
        (gate / "go").touch()
        for f in (blocker, first, second):
            f.result(timeout=RESULT)
    assert lines(tmp_path / "log") == ["second", "first"]
    state = Journal(JournalConfig(path=str(path)), readonly=True).state
    assert state.options[state.jobs[second.job_id].opts].priority == 10


# -- dead letters and introspection ----------------------------------------------


def crash() -> None:
    os._exit(3)


@pytest.mark.timeout(60)
def test_dead_letters_keep_their_history_and_can_run_again(tmp_path: Path) -> None:
    path, gate = tmp_path / "j", tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(1, journal=str(path)) as pool:
        doomed = pool.options(retries=1, name="crashy").submit(crash)
        with pytest.raises(procsched.WorkerCrashed):
            doomed.result(timeout=RESULT)
        failed = pool.submit(fail_then, str(tmp_path / "n"))  # an exception is not a dead letter
        with pytest.raises(RuntimeError):
            failed.result(timeout=RESULT)
        (letter,) = pool.dead_letters()
        assert letter["job"] == doomed.job_id and letter["state"] == "crashed" and letter["attempts"] == 2
        assert [h[:2] for h in letter["history"]] == [[1, "crash"], [2, "crash"]]
    with procsched.Pool(1, journal=str(path)) as pool:  # they survive a restart
        (letter,) = pool.dead_letters()
        assert letter["job"] == doomed.job_id and len(letter["history"]) == 2
        with pytest.raises(KeyError):
            pool.resubmit(failed)
        again = pool.resubmit(doomed, name="gated-now")
        assert pool.dead_letters() == [], "a resubmitted letter leaves the list"
        with pytest.raises(procsched.WorkerCrashed):
            again.result(timeout=RESULT)
        assert [d["name"] for d in pool.dead_letters()] == ["gated-now"]
        assert pool.purge() == 1 and pool.dead_letters() == []
    with procsched.Pool(1, journal=str(path)) as pool:
        assert pool.dead_letters() == [], "a purge is journaled"


@pytest.mark.timeout(60)
def test_jobs_and_stats_show_what_the_pool_holds(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(1) as pool:
        running = pool.options(tags=["etl"], name="blocker").submit(gated, str(gate), 1)
        await_file(gate / "started", RESULT)
        queued = [pool.options(tags=["etl"]).submit(square, i) for i in range(3)]
        hot = pool.options(hot=True, preempt="cooperative").submit(square, 9)
        waiting = pool.options(depends_on=[queued[0]]).submit(square, 2)
        listed = {j["job"]: j for j in pool.jobs()}
        assert listed[running.job_id]["state"] == "running" and listed[waiting.job_id]["state"] == "waiting"
        assert {j["job"] for j in pool.jobs(tag="etl")} == {running.job_id, *(f.job_id for f in queued)}
        assert [j["job"] for j in pool.jobs(name="blocker")] == [running.job_id]
        stats = pool.stats()
        assert stats["queued_hot"] == 1 and stats["queued_cold"] == 3 and stats["by_state"]["waiting"] == 1
        (gate / "go").touch()
        for f in [running, *queued, hot, waiting]:
            f.result(timeout=RESULT)
        stats = pool.stats()
        assert stats["run_s"]["p50"] >= 0 and stats["wait_s"]["p99"] >= stats["wait_s"]["p50"]
        assert stats["throughput_per_s"] > 0 and stats["by_state"] == {}


@pytest.mark.timeout(60)
def test_jobs_lists_the_finished_jobs_a_journal_keeps(tmp_path: Path) -> None:
    with procsched.Pool(1, journal=str(tmp_path / "j")) as pool:
        done = [pool.options(tags=["nightly"], name="sq").submit(square, i) for i in range(3)]
        failed = pool.submit(fail_then, str(tmp_path / "n"))
        for f in done:
            f.result(timeout=RESULT)
        with pytest.raises(RuntimeError):
            failed.result(timeout=RESULT)
        assert sorted(j["job"] for j in pool.jobs(state="succeeded", tag="nightly")) == [f.job_id for f in done]
        assert [j["job"] for j in pool.jobs(state="failed")] == [failed.job_id]
        assert {j["job"] for j in pool.jobs(name="sq")} == {f.job_id for f in done}


def spin_forever(gate: str) -> None:
    Path(gate, "cold-started").touch()
    while True:
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_cancel_a_preempted_job_waiting_in_the_queue_again(tmp_path: Path) -> None:
    """A cold job killed for a hot one goes back to the queue; cancelling it there needs no kill."""
    gate = tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(1, preempt_grace=0.05) as pool:
        cold = pool.options(preempt="kill").submit(spin_forever, str(gate))
        await_file(gate / "cold-started", RESULT)
        hot = pool.options(hot=True).submit(gated, str(gate), "hot")
        await_file(gate / "started", RESULT)  # the hot job runs: the cold one was killed and requeued
        wait_for(lambda: pool.stats()["preempted"] >= 1, RESULT, "the preemption")
        assert pool.cancel(cold) and cold.cancelled()
        (gate / "go").touch()
        assert hot.result(timeout=RESULT) == "hot"
