"""Crash recovery through the journal: real processes, real SIGKILLs, real files.

Given a journaled pool in a child process (``journal_child``), when that
process is killed with SIGKILL at some point of its work and the journal is
opened again (by a rerun of the same program, or by a pool in this process),
then nothing the dead pool accepted is lost: queued jobs come back, jobs that
were running run again with their attempt counted (at least once), finished
jobs do not run again and their stored results are served, a pending retry
keeps its attempt number and its backoff, a preempted job resumes from its
checkpoint, and under ``fsync="always"`` a submit that returned is on disk.
A last test compacts a journal over and over while jobs pour in.

The child tells the test where it stands through files (one line per
execution of a job, pids, the state a preempted job saved); the test waits
for those files, or for what a read-only ``Journal`` shows, with deadlines,
then kills the child's Python process itself and waits for its workers to
be gone before it looks at anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from conftest import alive, children, wait_for

import procsched
from procsched import codec
from procsched.journal import Journal, JournalState
from procsched.journal.state import Entry

TESTS = Path(__file__).resolve().parent
REPO = str(TESTS.parent)
RESULT = 20.0  # how long the test waits for a future or a child
CHILD = "import sys, journal_child; journal_child.main(sys.argv[1:])"


# -- running and killing the child ----------------------------------------------


def _spawn(where: Path, *args: object) -> subprocess.Popen[bytes]:
    """Run ``journal_child`` with ``args``; its output goes to files in ``where``
    (never to pipes, which its workers would hold open)."""
    where.mkdir(parents=True, exist_ok=True)
    path = [str(TESTS), REPO, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    with open(where / "stdout", "ab") as out, open(where / "stderr", "ab") as err:
        return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=env, stdout=out, stderr=err, cwd=where)


def _output(where: Path) -> str:
    return f"stdout: {(where / 'stdout').read_text()!r}\nstderr: {(where / 'stderr').read_text()}"


def _pids(path: Path, field: int) -> set[int]:
    """The pids in column ``field`` of a file of job lines."""
    out = set()
    for line in _lines(path):
        parts = line.split()
        if len(parts) > field:
            out.add(int(parts[field]))
    return out


def _kill(proc: subprocess.Popen[bytes], where: Path, workers: Callable[[], Iterable[int]] = tuple) -> None:
    """SIGKILL the child's Python process; return once it and its workers are gone.

    Its workers are its children just before the kill, plus ``workers()`` (pids
    that jobs reported), read after it: a worker that outlived it for a moment
    must not write a line or run a job the test then miscounts.
    """
    pids = set(children(proc.pid))
    if proc.poll() is not None:
        pytest.fail(f"the child exited ({proc.returncode}) before the test killed it\n{_output(where)}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=RESULT) == -signal.SIGKILL
    pids |= set(workers())
    try:
        wait_for(lambda: not any(alive(p) for p in pids), RESULT, f"the killed child's workers {sorted(pids)} to die with it")
    finally:
        for p in filter(alive, pids):
            os.kill(p, signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _spin_until(cond: Callable[[], object], proc: subprocess.Popen[bytes], where: Path, what: str) -> None:
    """Like ``wait_for``, polling every 0.5 ms (a kill point must not overshoot much),
    and failing at once if the child exits."""
    end = time.monotonic() + RESULT
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) while the test waited for {what}\n{_output(where)}")
        if time.monotonic() > end:
            pytest.fail(f"timed out after {RESULT} s waiting for {what}\n{_output(where)}")
        time.sleep(0.0005)


# -- reading files and journals -------------------------------------------------


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _runs(side: Path) -> Counter[str]:
    """How many times each call ran, by key (``k<i>``), from its lines ``<i> <pid>``."""
    return Counter(f"k{line.split()[0]}" for line in _lines(side))


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _state(journal: Path) -> JournalState:
    """The journal's state as a reopening would rebuild it (read-only: no lock, no repair)."""
    return Journal(procsched.JournalConfig(path=str(journal)), readonly=True).state


def _peek(journal: Path) -> JournalState | None:
    """``_state`` of a journal a live pool may be writing (or not yet have created)."""
    try:
        return _state(journal)
    except (OSError, procsched.JournalError):  # not there yet, or a segment compacted away under us
        return None


def _by_key(state: JournalState) -> dict[object, Entry]:
    return {e.key: e for e in state.jobs.values()}


def _entry_in(journal: Path, key: str, state: str, checkpoint: bool = False) -> Entry:
    """Wait until the journal shows job ``key`` in ``state`` (and with a checkpoint); its entry."""

    def look() -> Entry | None:
        st = _peek(journal)
        e = None if st is None else _by_key(st).get(key)
        if e is None or e.state != state or (checkpoint and not e.checkpoint):
            return None
        return e

    entry = wait_for(look, RESULT, f"job {key!r} to be {state}{' with a checkpoint' if checkpoint else ''} in the journal")
    assert isinstance(entry, Entry)
    return entry


def _stored(entry: Entry) -> object:
    """The value of a journaled result."""
    return codec.load_value(entry.result, [memoryview(b) for b in entry.result_buffers])


# -- 1. SIGKILL at many points of a keyed map --------------------------------------

N = 200
MAX_WORKERS = 2  # journal_child.run_map's pool
# A job re-runs only if it had begun when the kill came and its result was not
# yet in the journal: one per worker running it, plus results read back in the
# turn the kill cut short. Anything near the kill point would mean finished
# work ran again.
MAX_RERUNS = 3 * MAX_WORKERS


def _value(i: int) -> str:
    return f"v{i * i + 7}"


@pytest.mark.timeout(45)
@pytest.mark.parametrize("kill_at", [0, N // 10, N // 2, N * 9 // 10], ids=lambda k: f"after-{k}-runs")
def test_sigkill_during_keyed_map_then_rerun_loses_nothing_and_repeats_little(kill_at: int, tmp_path: Path) -> None:
    """Kill a keyed map after ``kill_at`` calls ran, rerun it: every result once, few calls twice."""
    journal, side, out = tmp_path / "journal", tmp_path / "side", tmp_path / "out.json"
    keys = [f"k{i}" for i in range(N)]
    proc = _spawn(tmp_path, "map", journal, side, out, N)
    try:
        if kill_at == 0:  # the pool is open and map() has posted every call
            _spin_until(lambda: os.path.exists(f"{out}.ready"), proc, tmp_path, "map() to return")
        else:
            _spin_until(lambda: _count_lines(side) >= kill_at, proc, tmp_path, f"{kill_at} calls to run")
        _kill(proc, tmp_path, lambda: _pids(side, 1))
    finally:
        _stop(proc)
    assert not out.exists()
    ran_before = _runs(side)
    before = _state(journal)
    states = Counter(e.state for e in before.jobs.values())
    assert set(states) <= {"queued", "running", "succeeded"}, states
    done_before = {str(e.key) for e in before.jobs.values() if e.state == "succeeded"}
    running_before = {str(e.key) for e in before.jobs.values() if e.state == "running"}
    unfinished_before = [e.job for e in before.unfinished()]
    assert done_before <= set(ran_before), "a journaled result of a call that never ran"

    rerun = _spawn(tmp_path, "map", journal, side, out, N)
    try:
        assert rerun.wait(timeout=RESULT) == 0, _output(tmp_path)
    finally:
        _stop(rerun)
    report = json.loads(out.read_text())
    # the rerun brought back exactly what the journal had not finished
    assert report["recovered"] == unfinished_before
    # every call has its result, once, and the right one (stored or computed)
    assert report["results"] == [[f"k{i}", _value(i)] for i in range(N)]

    ran = _runs(side)
    assert set(ran) == set(keys), f"calls that never ran: {sorted(set(keys) - set(ran))[:10]}"
    again = Counter({k: n - 1 for k, n in ran.items() if n > 1})
    assert not done_before & set(again), f"calls whose results were journaled ran again: {sorted(done_before & set(again))}"
    assert set(again) <= set(ran_before) - done_before, "only a call that had begun before the kill may run twice"
    assert all(n == 1 for n in again.values()), again
    assert sum(again.values()) <= MAX_RERUNS, f"{sum(again.values())} calls ran again (killed after {sum(ran_before.values())} runs): {again}"

    after = _state(journal)
    entries = _by_key(after)
    assert len(after.jobs) == N and set(entries) == set(keys), "one job per key, no more"
    assert after.unfinished() == []
    for i, key in enumerate(keys):
        e = entries[key]
        assert e.state == "succeeded" and _stored(e) == _value(i), (key, e.state)
        # an attempt cut short by the kill is counted
        assert e.attempt == (2 if key in running_before else 1), (key, e.attempt, key in running_before)


# -- 2. a job running at the kill runs again, its attempt counted --------------------


@pytest.mark.timeout(30)
def test_job_running_at_sigkill_runs_again_as_attempt_2(tmp_path: Path) -> None:
    """At-least-once: the attempt the kill cut short is counted, whatever the retry policy."""
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    gate.mkdir()
    proc = _spawn(tmp_path, "block", journal, gate)
    try:
        wait_for(lambda: (gate / "pid").exists(), RESULT, "the job to start")
        _entry_in(journal, "blocker", "running")
        _kill(proc, tmp_path, lambda: _pids(gate / "runs", 1))
    finally:
        _stop(proc)
    e = _by_key(_state(journal))["blocker"]
    assert (e.state, e.attempt) == ("running", 1)
    assert [line.split()[0] for line in _lines(gate / "runs")] == ["1"]

    (gate / "go").touch()  # the second run may finish
    with procsched.Pool(1, journal=journal) as pool:
        assert list(pool.recovered) == [e.job]
        # no retries were asked for: the crash of the supervisor is not the job's fault
        assert pool.recovered[e.job].result(timeout=RESULT) == ("done", 2)
    assert [line.split()[0] for line in _lines(gate / "runs")] == ["1", "2"]
    e = _by_key(_state(journal))["blocker"]
    assert (e.state, e.attempt, _stored(e)) == ("succeeded", 2, ("done", 2))


# -- 3. a pending retry keeps its attempt and its backoff ---------------------------

BACKOFF = 2.0  # long enough that the test kills the child well inside it


@pytest.mark.timeout(30)
def test_pending_retry_survives_sigkill_and_runs_after_its_backoff(tmp_path: Path) -> None:
    """A job waiting out its backoff is killed with the pool; reopened, it waits out the rest."""
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    gate.mkdir()
    proc = _spawn(tmp_path, "retry", journal, gate, BACKOFF)
    try:
        _entry_in(journal, "flaky", "pending")
        _kill(proc, tmp_path, lambda: _pids(gate / "runs", 2))
    finally:
        _stop(proc)
    runs = [line.split() for line in _lines(gate / "runs")]
    assert [r[0] for r in runs] == ["1"], "the retry must not have run before the kill"
    first_start = float(runs[0][1])
    e = _by_key(_state(journal))["flaky"]
    assert (e.state, e.attempt) == ("pending", 2)
    assert first_start + BACKOFF <= e.retry_at < first_start + BACKOFF + 5.0
    assert e.retry_at > time.time(), "the test was too slow: the backoff ended before the restart"

    with procsched.Pool(1, journal=journal) as pool:
        assert list(pool.recovered) == [e.job]
        assert pool.recovered[e.job].result(timeout=RESULT) == 2
    runs = [line.split() for line in _lines(gate / "runs")]
    assert [r[0] for r in runs] == ["1", "2"]
    # it waited out the rest of its backoff (the wall clock is what the journal keeps)
    assert float(runs[1][1]) >= e.retry_at - 0.05
    e = _by_key(_state(journal))["flaky"]
    assert (e.state, e.attempt, _stored(e)) == ("succeeded", 2, 2)


# -- 4. fsync="always": a submit that returned is in the journal ---------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("killer", ["test", "self"], ids=["killed-on-ack", "kills-itself-as-submit-returns"])
def test_fsync_always_acknowledged_submit_survives_sigkill(killer: str, tmp_path: Path) -> None:
    """Once submit() returned under fsync="always", the job is in the journal (and runs on restart).

    SIGKILL keeps what reached the kernel, so this checks that submit() waits
    for the record to be written, not that fsync reached the disk.
    """
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    gate.mkdir()
    proc = _spawn(tmp_path, "always", journal, gate, killer)
    try:
        if killer == "test":
            _spin_until(lambda: b"acked" in (tmp_path / "stdout").read_bytes(), proc, tmp_path, "the submit to be acknowledged")
            _kill(proc, tmp_path, lambda: _pids(gate / "runs", 1))
        else:
            assert proc.wait(timeout=RESULT) == -signal.SIGKILL, _output(tmp_path)
            # its workers had no way to know: wait for any that began the job
            wait_for(lambda: not any(alive(p) for p in _pids(gate / "runs", 1)), RESULT, "the killed child's workers to die")
    finally:
        _stop(proc)
    entries = _by_key(_state(journal))
    assert "acked" in entries, "an acknowledged submit is not in the journal"
    e = entries["acked"]
    assert e.state in ("queued", "running"), e.state

    (gate / "go").touch()
    with procsched.Pool(1, journal=procsched.JournalConfig(path=str(journal), fsync="always")) as pool:
        assert list(pool.recovered) == [e.job]
        attempt = e.attempt + (1 if e.state == "running" else 0)
        assert pool.recovered[e.job].result(timeout=RESULT) == ("done", attempt)
    assert _by_key(_state(journal))["acked"].state == "succeeded"


# -- 5. a preempted job resumes from its checkpoint after a restart ------------------


@pytest.mark.timeout(30)
def test_preempted_job_resumes_from_its_checkpoint_after_sigkill(tmp_path: Path) -> None:
    """A cold job yields to a hot one and the pool is killed while it waits: it resumes from its checkpoint."""
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    gate.mkdir()
    proc = _spawn(tmp_path, "preempt", journal, gate)
    try:
        wait_for(lambda: (gate / "preempted").exists() and (gate / "hot_pid").exists(), RESULT, "the cold job to yield to the hot one")
        _entry_in(journal, "hot", "running")
        _entry_in(journal, "cold", "queued", checkpoint=True)  # it waits, with the state it saved
        _kill(proc, tmp_path, lambda: [int((gate / "hot_pid").read_text())])
    finally:
        _stop(proc)
    saved = tuple(json.loads((gate / "preempted").read_text()))
    assert saved[0] == "step"
    entries = _by_key(_state(journal))
    cold, hot = entries["cold"], entries["hot"]
    assert (cold.state, cold.attempt) == ("queued", 1)
    assert (hot.state, hot.attempt) == ("running", 1)
    assert _lines(gate / "cold_runs") == ["first 1"]

    (gate / "go").touch()
    with procsched.Pool(1, journal=journal) as pool:
        assert sorted(pool.recovered) == sorted([cold.job, hot.job])
        assert pool.recovered[hot.job].result(timeout=RESULT) == ("hot", 2)
        # resumed from the state it saved, and a preemption spends no attempt
        assert pool.recovered[cold.job].result(timeout=RESULT) == (saved, 1)
    assert _lines(gate / "cold_runs") == ["first 1", "resumed 1"]
    entries = _by_key(_state(journal))
    assert entries["cold"].state == entries["hot"].state == "succeeded"


# -- 6. compaction under load ------------------------------------------------------

JOBS = 3000
KEEP = 50
PAD = "p" * 200  # in every job's arguments: the journal sees at least JOBS * len(PAD) bytes


def _segments(journal: Path) -> dict[int, int]:
    """Segment number -> size in bytes."""
    return {int(p.name[: -len(".seg")]): p.stat().st_size for p in journal.glob("*.seg")}


@pytest.mark.timeout(60)
def test_compaction_under_load_keeps_every_result_and_only_the_retained(tmp_path: Path) -> None:
    """Compact again and again while thousands of keyed jobs run: no job is lost from the journal,
    every future resolves, and what is left on disk is the retained results, small."""
    from journal_child import double

    journal = tmp_path / "journal"
    config = procsched.JournalConfig(path=str(journal), compact_min_bytes=64 * 1024, keep_results=KEEP)
    futures: list[procsched.JobFuture] = []
    errors: list[BaseException] = []
    compactions = checks = 0
    lost: list[int] = []  # jobs a compacted journal had lost while they still ran
    submitted = threading.Event()
    with procsched.Pool(2, journal=config) as pool:

        compacted = threading.Semaphore(0)

        def submit_all() -> None:  # in six parts, each after a compaction: they interleave
            try:
                for i in range(JOBS):
                    if i % (JOBS // 6) == 0 and i:
                        assert compacted.acquire(timeout=RESULT), "no compaction ran"
                    futures.append(pool.options(key=f"k{i}").submit(double, i, PAD))
            except BaseException as e:
                errors.append(e)
            finally:
                submitted.set()

        def compact_all() -> None:  # until every job has run: submitted, dispatched, finished
            nonlocal compactions, checks
            try:
                while not (submitted.is_set() and all(f.done() for f in futures)):
                    before = futures[:]  # posted before the compaction: in the journal once it is done
                    pool.compact_journal()
                    compactions += 1
                    compacted.release()
                    st = _peek(journal)
                    if st is None:  # a compaction of its own removed a segment under the read
                        continue
                    checks += 1
                    # only a finished job may be missing (retention dropped it)
                    lost.extend(f.job_id for f in before if f.job_id not in st.jobs and not f.done())
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=submit_all), threading.Thread(target=compact_all)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=RESULT)
        assert not any(t.is_alive() for t in threads), "the submitter or the compactor hung"
        assert errors == []
        assert [f.result(timeout=RESULT) for f in futures] == [2 * i for i in range(JOBS)]
        assert compactions >= 5, f"only {compactions} compactions ran during the load"
        assert checks >= 3 and lost == [], (checks, lost[:10])

        # Retention runs a few times a second, on a loop turn: turn the loop
        # (compact_journal does) until the journal holds only what it keeps.
        def trimmed() -> bool:
            pool.compact_journal()
            st = _peek(journal)
            return st is not None and len(st.jobs) == KEEP

        wait_for(trimmed, RESULT, f"the journal to keep only {KEEP} results")
        pool.compact_journal()  # the compaction in that last turn ran before retention dropped the rest

    state = _state(journal)
    assert state.unfinished() == []
    assert len(state.jobs) == KEEP
    kept = sorted(int(str(e.key)[1:]) for e in state.jobs.values())
    for e in state.jobs.values():
        assert e.state == "succeeded" and _stored(e) == 2 * int(str(e.key)[1:]), (e.key, e.state)
    # the newest results are the ones kept: jobs finish in about the order they were queued
    # (a worker's prefetched jobs may finish a few dozen places late, so the bound is loose)
    assert kept[0] >= JOBS - 10 * KEEP, kept
    segments = _segments(journal)
    on_disk = sum(segments.values())
    assert max(segments) > compactions, "each compaction starts a new segment"
    assert len(segments) == 1, f"compaction left older segments behind: {sorted(segments)}"
    assert on_disk < JOBS * len(PAD) / 20, f"{on_disk} bytes on disk after compaction"
    assert on_disk < config.compact_min_bytes
