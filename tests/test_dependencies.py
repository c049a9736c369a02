"""Jobs that run after other jobs: chains, diamonds, fan-in, continuations, failures and restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import await_file
from jobfns import gated, lines

import procsched
from procsched import JournalConfig
from procsched.journal import Journal

RESULT = 20.0


def add(a: int, b: int = 0) -> int:
    return a + b


def stamp(log: str, name: str) -> str:
    with open(log, "a") as f:
        f.write(f"{name}\n")
    return name


def boom(message: str) -> None:
    raise ValueError(message)


@pytest.mark.timeout(60)
def test_a_chain_runs_in_order_and_then_passes_results(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with procsched.Pool(2) as pool:
        first = pool.submit(stamp, log, "a")
        second = pool.options(depends_on=[first]).submit(stamp, log, "b")
        third = pool.options(depends_on=second).submit(stamp, log, "c")
        assert third.result(timeout=RESULT) == "c"
        total = pool.submit(add, 1)
        for i in range(20):  # a continuation chain: each step gets the previous result
            total = pool.then(total, add, i)
        assert total.result(timeout=RESULT) == 1 + sum(range(20))
    assert lines(tmp_path / "log") == ["a", "b", "c"]


@pytest.mark.timeout(60)
def test_a_diamond_with_a_failure_cancels_or_runs_per_policy(tmp_path: Path) -> None:
    with procsched.Pool(2) as pool:
        top = pool.submit(add, 1)
        left = pool.then(top, add, 10)
        right = pool.options(depends_on=[top]).submit(boom, "right fails")
        bottom = pool.options(depends_on=[left, right]).submit(add, 3)  # cancel: the default
        anyway = pool.options(depends_on=[left, right], on_failure="run").submit(add, 4)
        after_bottom = pool.then(bottom, add, 1)
        after_anyway = pool.then(anyway, add, 1)
        assert left.result(timeout=RESULT) == 11
        with pytest.raises(ValueError, match="right fails"):
            right.result(timeout=RESULT)
        assert anyway.result(timeout=RESULT) == 4 and after_anyway.result(timeout=RESULT) == 5
        assert bottom.cancelled() and after_bottom.cancelled(), "a cancel cascades down the graph"
        assert pool.stats()["cancelled"] == 2


@pytest.mark.timeout(60)
def test_fan_in_waits_for_all(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(2, max_prefetch=0) as pool:  # (no add waits behind the held job on its worker)
        held = pool.submit(gated, str(gate), 100)
        parts = [pool.submit(add, i) for i in range(50)] + [held]
        total = pool.options(depends_on=parts).submit(add, 7)
        await_file(gate / "started", RESULT)
        for p in parts[:-1]:
            p.result(timeout=RESULT)
        assert not total.done(), "one prerequisite still runs"
        (gate / "go").touch()
        assert total.result(timeout=RESULT) == 7


@pytest.mark.timeout(30)
def test_prerequisites_must_exist_and_be_futures_or_ids() -> None:
    with procsched.Pool(1) as pool:
        done = pool.submit(add, 1)
        done.result(timeout=RESULT)
        assert pool.options(depends_on=done.job_id).submit(add, 2).result(timeout=RESULT) == 2
        with pytest.raises(ValueError, match="no job 10000"):
            pool.options(depends_on=[10_000])
        with pytest.raises(TypeError, match="depends_on"):
            pool.options(depends_on=["a"])
        with pytest.raises(ValueError, match="on_failure"):
            pool.options(on_failure="ignore")
        with pytest.raises(TypeError, match="then"):
            pool.then(42, add)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_one_worker_runs_independent_equal_jobs_in_submission_order(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with procsched.Pool(1) as pool:
        first = pool.submit(stamp, log, "x")
        jobs = [pool.submit(stamp, log, str(i)) for i in range(30)]
        waits = pool.options(depends_on=[first]).submit(stamp, log, "after-x")
        for f in [*jobs, waits]:
            f.result(timeout=RESULT)
    got = lines(tmp_path / "log")
    assert got[:31] == ["x", *map(str, range(30))]


@pytest.mark.timeout(60)
def test_cancelling_a_prerequisite_cascades(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(1) as pool:
        blocker = pool.submit(gated, str(gate), "b")
        await_file(gate / "started", RESULT)
        queued = pool.submit(add, 1)
        child = pool.then(queued, add, 1)
        grandchild = pool.options(depends_on=[child]).submit(add, 2)
        runs_anyway = pool.options(depends_on=[child], on_failure="run").submit(add, 3)
        assert pool.cancel(queued)
        (gate / "go").touch()
        assert blocker.result(timeout=RESULT) == "b"
        assert runs_anyway.result(timeout=RESULT) == 3
        assert queued.cancelled() and child.cancelled() and grandchild.cancelled()


@pytest.mark.timeout(60)
def test_a_dependency_chain_resumes_after_a_restart(tmp_path: Path) -> None:
    """The journal keeps who waits for whom: after terminate() the next pool finishes the chain."""
    path, gate = tmp_path / "j", tmp_path / "gate"
    gate.mkdir()
    pool = procsched.Pool(1, journal=str(path))
    head = pool.submit(gated, str(gate), 5)
    step = pool.then(head, add, 1)
    last = pool.then(step, add, 10)
    await_file(gate / "started", RESULT)
    pool.terminate()
    states = {e.job: e for e in Journal(JournalConfig(path=str(path)), readonly=True).state.jobs.values()}
    assert states[step.job_id].deps == [head.job_id] and states[last.job_id].deps == [step.job_id]
    (gate / "go").touch()
    with procsched.Pool(1, journal=str(path)) as again:
        assert again.recovered[last.job_id].result(timeout=RESULT) == 16
        assert again.recovered[head.job_id].result(timeout=RESULT) == 5


@pytest.mark.timeout(60)
def test_shutdown_cancelling_futures_with_waiting_dependents(tmp_path: Path) -> None:
    """Cancelling a queued prerequisite cancels its dependents too; the running job still finishes."""
    gate = tmp_path / "gate"
    gate.mkdir()
    pool = procsched.Pool(1)
    running = pool.submit(gated, str(gate), "ran")
    await_file(gate / "started", RESULT)
    queued = pool.submit(add, 1)
    dependent = pool.options(depends_on=[queued]).submit(add, 2)
    pool.shutdown(wait=False, cancel_futures=True)
    (gate / "go").touch()
    assert running.result(timeout=RESULT) == "ran"
    pool.shutdown(wait=True)
    assert queued.cancelled() and dependent.cancelled()
