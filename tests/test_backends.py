"""The core behaviour, once per backend: the local worker pool and a local Ray.

Each test takes ``backend`` (a module-scoped fixture with two params) and
builds its pools with it, so the same assertions hold for both: crashes
and retries, timeouts, cooperative and forced preemption with checkpoints,
retries with backoff, dependencies and continuations, a schedule firing,
``cancel(kill=True)``, and a journal that lets a rerun skip finished work.

The Ray half is the ``ray`` mark (``-m "not ray"`` skips it); it starts one
Ray for the module (``ray.init(num_cpus=2)``, 5-10 s) with authentication
tokens and usage reports off and its session files in a temporary
directory, and stops it at the end. Ray's own processes are this process's
children while it runs, so the leak check keeps them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import await_file, children, wait_for, wait_no_leaks

import procsched
from procsched import backends

WAIT = 30.0  # a Ray worker killed by a timeout takes up to 2 s to come back on 2 cores
_ray_processes: set[int] = set()


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request: pytest.FixtureRequest) -> Iterator[backends.Spec]:
    if request.param == "local":
        yield backends.Local()
        return
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="psray")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token file written under ~/.ray
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        before = set(children())
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
        _ray_processes.update(set(children()) - before)
        try:
            yield backends.Ray()
        finally:
            ray.shutdown()
            _ray_processes.clear()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks(backend: backends.Spec) -> Iterator[None]:
    """The conftest check, keeping the processes of the module's Ray."""
    yield
    wait_no_leaks(keep=_ray_processes)


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


# -- job functions -------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def crash_once(marker: str, code: int) -> int:
    """Dies the first time (no marker yet), succeeds the next."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(code)
    return procsched.current_job().attempt


def flaky(log: str, fail_times: int) -> int:
    attempt = procsched.current_job().attempt
    _append(log, f"{attempt} {time.monotonic()}")
    if attempt <= fail_times:
        raise ConnectionError(f"attempt {attempt} fails")
    return attempt


def stubborn_sleeper(started: str) -> None:
    """Ignores SIGTERM and sleeps: only a kill stops it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(started).touch()
    time.sleep(120)


def cold_counter(progress: str, finish: str) -> tuple[Any, int, int]:
    """Checkpoints every step; returns (resumed from, attempt, last step)."""
    ctx = procsched.current_job()
    first = ctx.resume_from
    i = 0 if first is None else int(first)
    end = time.monotonic() + WAIT
    while not os.path.exists(finish):
        ctx.checkpoint(i)
        _append(progress, f"{'resumed' if first is not None else 'first'} {i}")
        i += 1
        time.sleep(0.002)
        if time.monotonic() > end:
            raise TimeoutError("never finished")
    return (first, ctx.attempt, i)


def cold_stubborn(started: str) -> tuple[Any, int, int]:
    """Streams one checkpoint, then never looks at a yield request again."""
    ctx = procsched.current_job()
    if ctx.resume_from is not None:
        return (ctx.resume_from, ctx.attempt, os.getpid())
    ctx.checkpoint("state-A")  # with preempt="kill" this is streamed to the supervisor
    _append(started, str(os.getpid()))
    time.sleep(120)
    return ("never preempted", ctx.attempt, os.getpid())


def now_ns(_: Any = None) -> int:
    return time.monotonic_ns()


def tick(log: str) -> None:
    _append(log, str(time.monotonic()))


def gated(gate: str, value: Any) -> Any:
    await_file(gate, WAIT)
    return value


def counted(log: str, x: int) -> int:
    _append(log, str(x))
    return x * 10


# -- the suite ------------------------------------------------------------------------


def test_results_errors_and_large_buffers_both_ways(backend: backends.Spec) -> None:
    np = pytest.importorskip("numpy")
    with procsched.Pool(2, backend=backend) as pool:
        assert list(pool.map(square, range(50))) == [x * x for x in range(50)]
        with pytest.raises(ZeroDivisionError) as info:
            pool.submit(divmod, 1, 0).result(timeout=WAIT)
        assert isinstance(info.value.__cause__, procsched.RemoteTraceback)
        big = np.arange(2_000_000, dtype=np.float64)  # 16 MB each way, out of band
        assert pool.submit(np.sum, big).result(timeout=WAIT) == big.sum()
        back = pool.submit(np.arange, 2_000_000, dtype=np.float64).result(timeout=WAIT)
        assert back.shape == (2_000_000,) and back[-1] == 1_999_999


@pytest.mark.timeout(90)
def test_a_crash_costs_one_job_and_is_retried_per_policy(backend: backends.Spec, tmp_path: Path) -> None:
    with procsched.Pool(2, backend=backend) as pool:
        with pytest.raises(procsched.WorkerCrashed) as info:
            pool.submit(os._exit, 7).result(timeout=WAIT)
        assert "os._exit" in str(info.value) or "_exit" in str(info.value)
        attempt = pool.options(retries=1).submit(crash_once, str(tmp_path / "m"), 3).result(timeout=WAIT)
        assert attempt == 2, "the crash spent the first attempt; the retry succeeded"
        assert pool.submit(square, 12).result(timeout=WAIT) == 144, "the pool goes on"
        stats = pool.stats()
    assert stats["crashed"] == 1 and stats["retried"] == 1


@pytest.mark.timeout(90)
def test_timeout_kills_a_job_that_ignores_sigterm(backend: backends.Spec, tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    with procsched.Pool(1, backend=backend, kill_grace=0.2) as pool:
        t0 = time.monotonic()
        fut = pool.options(timeout=1.0).submit(stubborn_sleeper, started)
        with pytest.raises(procsched.JobTimeout):
            fut.result(timeout=WAIT)
        assert os.path.exists(started), "the job ran before it timed out"
        assert 1.0 <= time.monotonic() - t0 < 1.0 + WAIT / 2
        assert pool.submit(square, 5).result(timeout=WAIT) == 25, "its executor was replaced"
        assert pool.stats()["timed_out"] == 1


@pytest.mark.timeout(90)
def test_a_cold_job_yields_to_a_hot_one_and_resumes_from_its_checkpoint(backend: backends.Spec, tmp_path: Path) -> None:
    progress, finish = str(tmp_path / "progress"), str(tmp_path / "finish")
    with procsched.Pool(1, backend=backend) as pool:
        cold = pool.submit(cold_counter, progress, finish)
        wait_for(lambda: len(_lines(progress)) >= 5, WAIT, "the cold job to make progress")
        hot_at = pool.options(hot=True).submit(now_ns).result(timeout=WAIT)
        wait_for(lambda: any(x.startswith("resumed") for x in _lines(progress)), WAIT, "the cold job to resume")
        Path(finish).touch()
        resumed_from, attempt, last = cold.result(timeout=WAIT)
        stats = pool.stats()
    assert hot_at > 0
    first_run = [int(x.split()[1]) for x in _lines(progress) if x.startswith("first")]
    assert resumed_from is not None and resumed_from <= first_run[-1] + 1, "it resumed from a checkpoint it made"
    assert attempt == 1, "a preemption does not spend an attempt"
    assert last >= resumed_from
    assert stats["preempted"] == 1 and stats["succeeded"] == 2


@pytest.mark.timeout(90)
def test_a_cold_job_that_does_not_yield_is_killed_and_resumes_from_its_streamed_checkpoint(backend: backends.Spec, tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    with procsched.Pool(1, backend=backend, preempt_grace=0.3) as pool:
        cold = pool.options(preempt="kill").submit(cold_stubborn, started)
        wait_for(lambda: _lines(started), WAIT, "the cold job to start")
        first_pid = int(_lines(started)[0])
        assert pool.options(hot=True).submit(now_ns).result(timeout=WAIT) > 0
        resume_from, attempt, pid = cold.result(timeout=WAIT)
        stats = pool.stats()
    assert resume_from == "state-A", "the rerun resumes from the last streamed checkpoint"
    assert attempt == 1 and pid != first_pid
    assert stats["preempted"] == 1 and stats["crashed"] == 0 and stats["failed"] == 0


def test_retries_back_off_and_then_succeed(backend: backends.Spec, tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    policy = procsched.RetryPolicy(retries=2, backoff=0.2, factor=2.0, jitter=0.0)
    with procsched.Pool(2, backend=backend) as pool:
        assert pool.options(retries=policy).submit(flaky, log, 2).result(timeout=WAIT) == 3
        with pytest.raises(ConnectionError):
            pool.options(retries=1).submit(flaky, str(tmp_path / "other"), 5).result(timeout=WAIT)
    times = [float(x.split()[1]) for x in _lines(log)]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4, "each retry waits its backoff"


def test_dependencies_and_continuations(backend: backends.Spec, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with procsched.Pool(2, backend=backend) as pool:
        a = pool.submit(gated, gate, 6)
        b = pool.options(depends_on=[a]).submit(now_ns)
        c = pool.then(a, square)
        bad = pool.submit(divmod, 1, 0)
        after_bad = pool.options(depends_on=[bad]).submit(square, 2)
        assert not b.done() and not c.done(), "they wait for their prerequisite"
        opened = time.monotonic_ns()
        Path(gate).touch()
        assert c.result(timeout=WAIT) == 36
        assert b.result(timeout=WAIT) > opened, "b began only once its prerequisite was let finish"
        wait_for(after_bad.done, WAIT, "the dependent of a failed job to settle")
        assert after_bad.cancelled()


def test_a_schedule_fires_on_the_backend(backend: backends.Spec, tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with procsched.Pool(2, backend=backend) as pool:
        pool.every(0.2, tick, log, name="ticker")
        wait_for(lambda: len(_lines(log)) >= 3, WAIT, "three firings")
        assert pool.unschedule("ticker")


@pytest.mark.timeout(90)
def test_cancel_with_kill_stops_a_running_job(backend: backends.Spec, tmp_path: Path) -> None:
    started = str(tmp_path / "started")
    with procsched.Pool(1, backend=backend) as pool:
        fut = pool.submit(stubborn_sleeper, started)
        wait_for(lambda: os.path.exists(started), WAIT, "the job to start")
        assert not pool.cancel(fut), "a running job is not cancelled without kill"
        assert pool.cancel(fut, kill=True)
        wait_for(fut.done, WAIT, "the killed job to settle")
        assert fut.cancelled()
        assert pool.submit(square, 3).result(timeout=WAIT) == 9


def test_a_rerun_on_the_same_journal_skips_finished_work(backend: backends.Spec, tmp_path: Path) -> None:
    log, journal = str(tmp_path / "ran"), str(tmp_path / "journal")
    with procsched.Pool(2, backend=backend, journal=journal) as pool:
        assert list(pool.map(counted, [log] * 5, range(5), key=lambda _, x: f"row-{x}")) == [0, 10, 20, 30, 40]
    with procsched.Pool(2, backend=backend, journal=journal) as pool:
        assert list(pool.map(counted, [log] * 8, range(8), key=lambda _, x: f"row-{x}")) == [x * 10 for x in range(8)]
    assert sorted(int(x) for x in _lines(log)) == list(range(8)), "rows 0-4 ran once, in the first run only"


def span(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def test_max_workers_caps_the_jobs_running_at_once(backend: backends.Spec) -> None:
    with procsched.Pool(1, backend=backend) as pool:
        spans = [f.result(timeout=WAIT) for f in [pool.submit(span, 0.3) for _ in range(4)]]
    spans.sort()
    assert all(later[0] >= earlier[1] - 0.01 for earlier, later in zip(spans, spans[1:])), f"jobs overlapped: {spans}"


@pytest.mark.timeout(90)
def test_a_hot_job_takes_the_first_cpu_a_yield_frees(backend: backends.Spec, tmp_path: Path) -> None:
    """More cold jobs than CPUs (a Ray pool queues one more in Ray): the hot one must not wait
    behind a cold job that has not begun."""
    finish = str(tmp_path / "finish")
    with procsched.Pool(2, backend=backend) as pool:
        progress = [str(tmp_path / f"p{i}") for i in range(3)]
        colds = [pool.options(priority=3 - i).submit(cold_counter, progress[i], finish) for i in range(3)]
        wait_for(lambda: _lines(progress[0]) and _lines(progress[1]), WAIT, "two cold jobs to run")
        hot_at = pool.options(hot=True).submit(now_ns).result(timeout=WAIT)
        assert not any(f.done() for f in colds), "the hot job ran while every cold job still runs"
        Path(finish).touch()
        for f in colds:
            f.result(timeout=WAIT)
        stats = pool.stats()
    assert hot_at > 0
    assert stats["preempted"] == 1, "one yield made room for the hot job"


def test_reconfigure_changes_the_cap_and_refuses_nonsense(backend: backends.Spec) -> None:
    with procsched.Pool(2, backend=backend) as pool:
        assert pool.reconfigure({"max_workers": 1}) == ["max_workers"]
        assert pool.max_workers == 1
        with pytest.raises(ValueError, match="max_workers"):
            pool.reconfigure({"max_workers": -1})
        if isinstance(backend, backends.Ray):
            assert pool.reconfigure({"max_workers": 0}) == ["max_workers"]
            assert pool.max_workers == 2, "no cap: the cluster's CPUs"
        else:
            with pytest.raises(ValueError, match="max_workers"):
                pool.reconfigure({"max_workers": 0})
        assert pool.submit(square, 4).result(timeout=WAIT) == 16


def test_the_ray_window_follows_the_job_length(backend: backends.Spec, tmp_path: Path) -> None:
    """Tiny jobs widen the runs queued in Ray to four per CPU (Ray's per-task round trip would
    idle its CPUs otherwise); a long job narrows it back to one, so the heap keeps the order."""
    if not isinstance(backend, backends.Ray):
        pytest.skip("the local pool's prefetch follows job length the same way (test_executor)")
    gate = str(tmp_path / "gate")
    with procsched.Pool(backend=backend) as pool:
        assert pool.stats()["window"] == 1, "no job measured yet: one run beyond the CPUs"

        def widened() -> bool:  # (a fresh Ray worker's first run also loads the job's code: slow)
            assert [f.result(timeout=WAIT) for f in [pool.submit(square, i) for i in range(10)]] == [i * i for i in range(10)]
            return bool(pool.stats()["window"] == 8)

        wait_for(widened, WAIT, "tiny jobs to widen the window to 4 per CPU")
        held = [pool.submit(gated, gate, i) for i in range(14)]
        wait_for(lambda: pool.stats()["in_flight"] == 10, WAIT, "2 runs on the CPUs and 8 queued in Ray")
        wait_for(lambda: pool.stats()["queued"] == 4, WAIT, "the other 4 to wait in procsched's heap")
        Path(gate).touch()
        assert [f.result(timeout=WAIT) for f in held] == list(range(14))
        pool.submit(span, 0.05).result(timeout=WAIT)
        assert pool.stats()["window"] == 1
    with procsched.Pool(backend=backend, max_prefetch=0) as pool:
        for _ in range(40):
            pool.submit(square, 1).result(timeout=WAIT)
        assert pool.stats()["window"] == 1, "max_prefetch=0: no more than one run waits in Ray"


@pytest.mark.timeout(90)
def test_a_ray_pool_makes_its_flag_actor_afresh_after_a_ray_kill(backend: backends.Spec, tmp_path: Path) -> None:
    """Ray restarts the flag actor when its process dies, but not after ``ray.kill``: the pool
    finds it gone at its next yield request, makes it again under the same name, and the
    running job (whose poller held the dead actor) still sees the request."""
    if not isinstance(backend, backends.Ray):
        pytest.skip("the local pool's yield flag is a shared-memory word")
    import ray

    from procsched.backends import rayconnect

    progress, finish = str(tmp_path / "progress"), str(tmp_path / "finish")
    with procsched.Pool(1, backend=backend) as pool:
        cold = pool.submit(cold_counter, progress, finish)
        wait_for(lambda: len(_lines(progress)) >= 5, WAIT, "the cold job to make progress")
        name = rayconnect._actor["name"]
        ray.kill(rayconnect._actor["handle"])
        assert pool.options(hot=True).submit(now_ns).result(timeout=WAIT) > 0
        wait_for(lambda: any(x.startswith("resumed") for x in _lines(progress)), WAIT, "the cold job to resume")
        Path(finish).touch()
        resumed_from, attempt, _ = cold.result(timeout=WAIT)
        assert rayconnect._actor["name"] == name
        assert pool.stats()["preempted"] == 1
    assert resumed_from is not None and attempt == 1


def look_late(started: str, gate: str, progress: str, finish: str) -> tuple[Any, int, int]:
    """Like ``cold_counter``, but it first looks at its yield flag once ``gate`` opens."""
    if procsched.current_job().resume_from is None:
        Path(started).touch()
        await_file(gate, WAIT)
    return cold_counter(progress, finish)


@pytest.mark.timeout(90)
def test_a_yield_asked_before_the_flag_actor_was_killed_is_asked_again(backend: backends.Spec, tmp_path: Path) -> None:
    """The flag was raised in the actor, then the actor ended: no ask of the pool's failed, yet
    the job, which looks only now, must still see it (the pool raises its flags again each
    second, finds the actor gone, and makes it again)."""
    if not isinstance(backend, backends.Ray):
        pytest.skip("the local pool's yield flag is a shared-memory word")
    import ray

    from procsched.backends import rayconnect

    started, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    progress, finish = str(tmp_path / "progress"), str(tmp_path / "finish")
    with procsched.Pool(1, backend=backend) as pool:
        cold = pool.submit(look_late, started, gate, progress, finish)
        await_file(started, WAIT)
        hot = pool.options(hot=True).submit(now_ns)
        actor = rayconnect._actor["handle"]
        wait_for(lambda: ray.get(actor.__ray_call__.remote(lambda flags: bool(flags.asked))), WAIT, "the flag to be raised")
        ray.kill(actor)
        Path(gate).touch()
        assert hot.result(timeout=WAIT) > 0
        Path(finish).touch()
        resumed_from, attempt, _ = cold.result(timeout=WAIT)
        assert pool.stats()["preempted"] == 1
    assert resumed_from is not None and attempt == 1
