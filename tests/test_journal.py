"""The journal: what a pool writes down survives crashes, damage and reopening.

Given a journal written by a real pool, when its tail is torn at any byte,
a bit flips in it, a second process tries to open it, the pool that wrote
it is gone, or the command line looks at it, then every whole record before
the damage is read back exactly, damage before the tail is refused (or
skipped on request) with the file and byte offset named, a journal in use is
never touched by another opener, and the state replayed from disk equals the
state the live supervisor held.

Journals are real directories under ``tmp_path``, damaged the way a crash or
a bad disk damages them: by truncating or flipping bytes in a copy. Frames
are found by walking the segment's ``length | crc32 | body`` layout, so every
offset a test names is the one the reader must report. Job functions live at
module level (workers import them by name); a job proves it ran by appending
to a file the test reads, and jobs that must stay running wait on a gate file,
so every wait is on a condition with a deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_for
from jobfns import gated

import procsched
from procsched import JournalConfig
from procsched.journal import Journal
from procsched.journal import records as r
from procsched.journal.state import JournalState
from procsched.journal.store import list_segments

RESULT = 20.0  # how long the test waits for a future
JOB_WAIT = 30.0  # how long a job waits for the test before giving up
REPO = str(Path(procsched.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- jobs -------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def always_fails(message: str) -> None:
    raise ValueError(message)


def fail_once(counter: str) -> int:
    """Raise on the first attempt, succeed on the next one."""
    if _bump(counter) == 1:
        raise ValueError("first attempt fails")
    return procsched.current_job().attempt


def crash_exit() -> None:
    os._exit(3)


def sleep_long() -> None:
    time.sleep(JOB_WAIT)


def logged(log: str, value: Any) -> Any:
    """Return ``value``, leaving a line in ``log``: proof that this job ran."""
    with open(log, "a") as f:
        f.write(f"{value!r}\n")
    return value


def big_bytes(log: str, n: int) -> bytes:
    with open(log, "a") as f:
        f.write("big\n")
    return bytes(range(256)) * (n // 256)


def big_array(log: str, n: int) -> Any:
    import numpy as np

    with open(log, "a") as f:
        f.write("array\n")
    return np.arange(n, dtype=np.int64)


def _bump(path: str) -> int:
    n = int(Path(path).read_text()) + 1 if os.path.exists(path) else 1
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(str(n))
    os.replace(tmp, path)
    return n


def _runs(log: str | Path) -> int:
    """How many times a ``logged`` job wrote to ``log``."""
    try:
        return len(Path(log).read_text().splitlines())
    except FileNotFoundError:
        return 0


# -- journal files ------------------------------------------------------------------


def _read(path: str | Path) -> Journal:
    return Journal(JournalConfig(path=str(path)), readonly=True)


def _segment(directory: str | Path) -> str:
    """The journal's only segment (the tests that damage bytes write one)."""
    segments = list_segments(str(directory))
    assert len(segments) == 1, segments
    return segments[0][1]


def _frames(path: str) -> list[tuple[int, int]]:
    """(start, end) of every frame of a segment, walking its length fields."""
    data = Path(path).read_bytes()
    r.parse_header(data)
    out = []
    off = r.HEADER_SIZE
    while off < len(data):
        length, _ = r.FRAME.unpack_from(data, off)
        end = off + r.FRAME.size + length
        assert end <= len(data), "an undamaged segment has whole frames only"
        out.append((off, end))
        off = end
    return out


def _record(path: str, frame: tuple[int, int]) -> Any:
    data = Path(path).read_bytes()
    return r.decoder.decode(data[frame[0] + r.FRAME.size : frame[1]])


def _files(directory: str | Path) -> dict[str, bytes]:
    """Every file under a directory, by relative path, with its bytes."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            p = os.path.join(root, name)
            out[os.path.relpath(p, directory)] = Path(p).read_bytes()
    return out


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def _live(pool: procsched.Pool) -> JournalState:
    """The journal state a pool's supervisor holds (its final one, after shutdown)."""
    rec = pool._sup.rec
    assert rec is not None
    return rec.journal.state


def _settled(read: Any) -> Any:
    """``read()`` of a running pool's journal state, or None if the loop changed it meanwhile."""
    try:
        return read()
    except RuntimeError:  # "changed size during iteration": look again
        return None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procsched", "journal", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30
    )


def _write_finished(path: Path, n: int, **config: Any) -> None:
    """A journal of ``n`` keyed jobs that ran one after another and succeeded."""
    with procsched.Pool(1, journal=JournalConfig(path=str(path), **config)) as pool:
        for i in range(n):
            assert pool.options(key=f"k{i}").submit(square, i).result(timeout=RESULT) == i * i


# -- 1. a torn tail, cut at every byte ------------------------------------------------


@pytest.mark.timeout(60)
def test_torn_tail_at_every_byte_keeps_every_whole_record(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial frame: readers stop before it, the writer cuts it off."""
    src = tmp_path / "journal"
    with procsched.Pool(2, journal=JournalConfig(path=str(src), fsync="never")) as pool:
        assert list(pool.map(square, range(24), key=lambda x: f"sq{x}")) == [x * x for x in range(24)]
        futs = [pool.options(name=f"n{i}").submit(square, i) for i in range(6)]
        assert [f.result(timeout=RESULT) for f in futs] == [i * i for i in range(6)]
    seg_name = os.path.basename(_segment(src))
    frames = _frames(_segment(src))
    size = os.path.getsize(_segment(src))
    assert frames[-1][1] == size
    bounds = [start for start, _ in frames[-3:]] + [size]  # where the last three frames start, and the end
    first = bounds[0]

    def cut_copy(name: str, at: int) -> tuple[Path, str]:
        d = tmp_path / name
        shutil.copytree(src, d)
        seg = str(d / seg_name)
        os.truncate(seg, at)
        return d, seg

    # What a journal cut exactly between frames holds: the records before the cut.
    expected: dict[int, dict[str, Any]] = {}
    for b in bounds:
        d, _ = cut_copy(f"at{b}", b)
        j = _read(d)
        assert j.damage == []
        expected[b] = j.state.dump()
        shutil.rmtree(d)
    assert expected[bounds[0]] != expected[size], "the last three frames change the state"
    victim = 1  # a job every cut keeps: the record appended after reopening drops it
    assert all(victim in e["jobs"] for e in expected.values())
    dropped = r.frame(r.Dropped([victim], "test"))

    for cut in range(first, size + 1):
        whole = max(b for b in bounds if b <= cut)  # the end of the last whole frame
        d, seg = cut_copy(f"cut{cut}", cut)
        ro = _read(d)
        assert ro.state.dump() == expected[whole], f"cut at {cut}"
        if cut == whole:
            assert ro.damage == [], f"cut at {cut}"
        else:
            assert [(x.path, x.offset, x.resumed, x.kind) for x in ro.damage] == [(seg, whole, cut, "torn")], f"cut at {cut}"
        assert os.path.getsize(seg) == cut, "a read-only open changes nothing"

        rw = Journal(JournalConfig(path=str(d), fsync="never"))
        assert os.path.getsize(seg) == whole, f"cut at {cut}: the torn frame is cut off"
        assert rw.state.dump() == expected[whole]
        rw.append(r.Dropped([victim], "test"))
        rw.close()
        after = _read(d)
        assert after.damage == [], f"cut at {cut}: the record appended after the cut is whole"
        assert os.path.getsize(seg) == whole + len(dropped)
        assert victim not in after.state.jobs
        assert after.state.dump() == rw.state.dump()
        shutil.rmtree(d)

    # A cut inside the segment header (the crash came right after creating it).
    d, seg = cut_copy("header", r.HEADER_SIZE // 2)
    ro = _read(d)
    assert [(x.offset, x.kind) for x in ro.damage] == [(0, "torn")]
    assert ro.state.jobs == {}
    Journal(JournalConfig(path=str(d), fsync="never")).close()
    assert os.path.getsize(seg) == r.HEADER_SIZE  # started again, with a whole header
    assert _read(d).damage == []


# -- 2. bit flips -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bit_flips_torn_at_the_tail_corrupt_before_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="procsched")
    src = tmp_path / "journal"
    _write_finished(src, 8)
    seg_name = os.path.basename(_segment(src))
    frames = _frames(_segment(src))
    intact = _read(src).state.dump()
    assert _cli("verify", str(src)).returncode == 0

    # A flip in the last frame: indistinguishable from a torn write, so it is one.
    last = tmp_path / "last"
    shutil.copytree(src, last)
    seg = str(last / seg_name)
    start, end = frames[-1]
    _flip(seg, (start + r.FRAME.size + end) // 2)
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    os.truncate(cut / seg_name, start)
    before_last = _read(cut).state.dump()
    caplog.clear()
    j = _read(last)
    assert [(d.path, d.offset, d.resumed, d.kind) for d in j.damage] == [(seg, start, end, "torn")]
    assert j.state.dump() == before_last
    assert any(m.startswith("journal_torn_tail") and f"offset={start}" in m for m in (x.getMessage() for x in caplog.records))
    out = _cli("verify", str(last))
    assert out.returncode == 1
    assert f"torn tail at byte offset {start}" in out.stdout
    Journal(JournalConfig(path=str(last))).close()
    assert os.path.getsize(seg) == start  # the writer cut it off
    assert _cli("verify", str(last)).returncode == 0

    # A flip in an earlier frame: the Succeeded record of a job in the middle.
    succeeded = [(i, f) for i, f in enumerate(frames) if type(_record(_segment(src), f)) is r.Succeeded]
    index, (start, end) = succeeded[len(succeeded) // 2]
    victim = _record(_segment(src), (start, end)).job
    assert index < len(frames) - 2
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    seg = str(bad / seg_name)
    _flip(seg, start + r.FRAME.size + 1)
    damaged = Path(seg).read_bytes()
    for readonly in (True, False):
        with pytest.raises(procsched.JournalCorrupt) as info:
            Journal(JournalConfig(path=str(bad)), readonly=readonly)
        assert (info.value.path, info.value.offset) == (seg, start)
        assert seg in str(info.value) and f"byte offset {start}" in str(info.value)
        assert isinstance(info.value, procsched.JournalError)
    assert Path(seg).read_bytes() == damaged, "a refused open leaves the file alone"

    # With salvage it skips exactly that frame and keeps every record after it.
    want = JournalState()
    for i, f in enumerate(frames):
        if i != index:
            want.apply(_record(_segment(src), f))
    caplog.clear()
    j = Journal(JournalConfig(path=str(bad), salvage=True), readonly=True)
    assert [(d.path, d.offset, d.resumed, d.kind, d.detail) for d in j.damage] == [(seg, start, end, "corrupt", "checksum mismatch")]
    assert j.state.dump() == want.dump()
    assert j.state.jobs[victim].state == "running"  # its success was in the lost frame
    later = [e for e in j.state.jobs.values() if e.job > victim]
    assert later and all(e.state == "succeeded" for e in later)
    assert {k: v for k, v in j.state.dump()["jobs"].items() if k != victim} == {k: v for k, v in intact["jobs"].items() if k != victim}
    assert any(m.startswith("journal_salvaged") and f"offset={start}" in m for m in (x.getMessage() for x in caplog.records))
    out = _cli("verify", str(bad))
    assert out.returncode == 1
    assert f"corrupt records at byte offset {start}" in out.stdout and seg in out.stdout

    # A writable salvaging open keeps the records after the damage and appends after them.
    w = Journal(JournalConfig(path=str(bad), salvage=True))
    w.append(r.Dropped([victim], "test"))
    w.close()
    assert Path(seg).read_bytes()[: len(damaged)] == damaged
    j = Journal(JournalConfig(path=str(bad), salvage=True), readonly=True)
    assert victim not in j.state.jobs and len(j.state.jobs) == len(intact["jobs"]) - 1

    # A flip in the segment header: nothing to salvage past.
    head = tmp_path / "head"
    shutil.copytree(src, head)
    _flip(str(head / seg_name), 1)
    with pytest.raises(procsched.JournalCorrupt) as info:
        Journal(JournalConfig(path=str(head), salvage=True), readonly=True)
    assert info.value.offset == 0
    out = _cli("verify", str(head))
    assert out.returncode == 1 and "byte offset 0" in out.stdout


# -- 3. one writer at a time ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_second_opener_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with procsched.Pool(1, journal=JournalConfig(path=str(path), fsync="always")) as pool:
        assert pool.options(key="a").submit(square, 3).result(timeout=RESULT) == 9
        # fsync="always": a future resolves once its records are on disk, so
        # nothing the pool writes is still on its way while the openers try.
        before = _files(path)
        assert before["LOCK"] == f"{os.getpid()}\n".encode()

        with pytest.raises(procsched.JournalLocked, match=f"in use by another process \\(pid {os.getpid()}\\)"):
            procsched.Pool(1, journal=str(path))
        with pytest.raises(procsched.JournalLocked):
            Journal(JournalConfig(path=str(path)))
        code = "import sys, procsched; procsched.Pool(1, journal=sys.argv[1]); print('opened')"
        other = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
        assert other.returncode != 0
        assert "opened" not in other.stdout
        assert "JournalLocked" in other.stderr and "in use" in other.stderr and f"pid {os.getpid()}" in other.stderr
        assert _files(path) == before, "the refused openers changed the journal"
        # A reader needs no lock, and sees what the pool wrote.
        assert _read(path).state.keys == {"a": 1}
        # The pool that holds it is unharmed.
        assert pool.submit(square, 4).result(timeout=RESULT) == 16
    with procsched.Pool(1, journal=str(path)) as pool:
        assert pool.recovered == {}
        assert pool.options(key="a").submit(logged, str(tmp_path / "log"), 0).result(timeout=RESULT) == 9  # stored, not run
        assert pool.submit(square, 5).result(timeout=RESULT) == 25
    assert _runs(tmp_path / "log") == 0


# -- 4. replay equals live -----------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compact", [False, True], ids=["appended", "compacted-mid-run"])
def test_replayed_state_equals_live_state(compact: bool, tmp_path: Path) -> None:
    path = tmp_path / "journal"
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    for g in gates:
        g.mkdir()
    quick_retry = procsched.RetryPolicy.make(1, backoff=0.01)
    cfg = JournalConfig(path=str(path), spill_bytes=4096)
    with procsched.Pool(2, journal=cfg) as pool:
        live = _live(pool)
        # Both workers busy (and no job measured yet, so nothing is prefetched):
        # the next job waits in the queue, where cancelling it succeeds.
        blockers = [pool.submit(gated, str(g), i) for i, g in enumerate(gates[:2])]
        wait_for(lambda: all((g / "started").exists() for g in gates[:2]), RESULT, "both blockers to start")
        doomed = pool.submit(square, 99)
        assert doomed.cancel()
        for g in gates[:2]:
            (g / "go").touch()
        assert [f.result(timeout=RESULT) for f in blockers] == [0, 1]

        futs: dict[str, list[Any]] = {
            "keyed": [pool.options(key=f"m{i}").submit(square, i) for i in range(4)],
            "map": list(pool.map(square, range(5), key=lambda x: x + 1000)),  # int keys
            "error": [pool.options(retries=procsched.RetryPolicy.make(1, backoff=1.5, jitter=0)).submit(always_fails, "nope")],
            "retried": [pool.options(retries=quick_retry).submit(fail_once, str(tmp_path / "count"))],
            "crash": [pool.submit(crash_exit)],
            "timeout": [pool.options(timeout=0.3).submit(sleep_long)],
            "spill": [pool.options(key="big").submit(big_bytes, str(tmp_path / "biglog"), 64 * 1024)],
            "holder": [pool.options(name="holder").submit(gated, str(gates[2]), "held")],
        }
        assert [f.result(timeout=RESULT) for f in futs["keyed"]] == [0, 1, 4, 9]
        assert futs["map"] == [0, 1, 4, 9, 16]
        assert futs["retried"][0].result(timeout=RESULT) == 2
        with pytest.raises(procsched.WorkerCrashed):
            futs["crash"][0].result(timeout=RESULT)
        with pytest.raises(procsched.JobTimeout):
            futs["timeout"][0].result(timeout=RESULT)
        assert len(futs["spill"][0].result(timeout=RESULT)) == 64 * 1024
        wait_for(lambda: (gates[2] / "started").exists(), RESULT, "the holder to start")
        error_id = futs["error"][0].job_id
        # (it waits 1.5 s to retry; on a slow machine it may be past that, which only covers less)
        wait_for(lambda: _settled(lambda: live.jobs[error_id].state) in ("pending", "failed"), RESULT, "the failing job's first attempt")

        # Mid-run, with a job running and one waiting to retry: once the loop
        # has written its turn, what a reader replays is what the loop holds.
        def replay_matches() -> None:
            end = time.monotonic() + RESULT
            while _read(path).state.dump() != _settled(live.dump) and time.monotonic() < end:
                time.sleep(0.02)
            assert _read(path).state.dump() == live.dump()  # (past the deadline: shows the difference)

        replay_matches()
        if compact:
            pool.compact_journal()
            segments = list_segments(str(path))
            assert len(segments) == 1 and segments[0][0] == 2
            assert r.parse_header(Path(segments[0][1]).read_bytes()[: r.HEADER_SIZE])[1] & r.BASE
            replay_matches()
        # More transitions after it: a stored key, new options, the holder and the retry finishing.
        assert pool.options(key="m2").submit(square, 2).result(timeout=RESULT) == 4
        assert pool.options(name="after", priority=3).submit(square, 7).result(timeout=RESULT) == 49
        (gates[2] / "go").touch()
        assert futs["holder"][0].result(timeout=RESULT) == "held"
        with pytest.raises(ValueError, match="nope"):
            futs["error"][0].result(timeout=RESULT)
    live_dump = _live(pool).dump()
    replayed = _read(path)
    assert replayed.damage == []
    assert replayed.state.dump() == live_dump

    # The comparison covers every kind of outcome.
    states = {e.state for e in replayed.state.jobs.values()}
    assert states == {"succeeded", "failed", "crashed", "timed_out", "cancelled"}
    jobs = replayed.state.jobs
    assert jobs[doomed.job_id].state == "cancelled"
    assert (jobs[error_id].state, jobs[error_id].attempt) == ("failed", 2)
    assert (jobs[futs["retried"][0].job_id].state, jobs[futs["retried"][0].job_id].attempt) == ("succeeded", 2)
    assert jobs[futs["crash"][0].job_id].dead and jobs[futs["timeout"][0].job_id].dead
    assert jobs[futs["spill"][0].job_id].spill and not jobs[futs["spill"][0].job_id].result
    assert {"m0", "m3", 1000, 1004, "big"} <= set(replayed.state.keys)
    assert _runs(tmp_path / "biglog") == 1


# -- 5. retention ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_keep_results_drops_the_oldest_finished_jobs(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with procsched.Pool(1, journal=JournalConfig(path=str(path), keep_results=3)) as pool:
        state = _live(pool)
        ids = []
        for i in range(8):
            fut = pool.options(key=f"r{i}").submit(square, i)
            assert fut.result(timeout=RESULT) == i * i
            ids.append(fut.job_id)
        # Retention runs a few times a second, not every turn: wait for it.
        wait_for(lambda: _settled(lambda: sorted(state.finished)) == ids[-3:], RESULT, "retention to keep the newest three")
        assert sorted(state.jobs) == ids[-3:]
        fut = pool.submit(square, 8)
        assert fut.result(timeout=RESULT) == 64
        ids.append(fut.job_id)
        wait_for(lambda: _settled(lambda: sorted(state.finished)) == ids[-3:], RESULT, "retention to drop one more")
    j = _read(path)
    assert sorted(j.state.jobs) == ids[-3:]
    assert set(j.state.keys) == {"r6", "r7"}
    # A dropped key runs again; a kept one comes from the journal.
    log = str(tmp_path / "log")
    with procsched.Pool(1, journal=JournalConfig(path=str(path), keep_results=3)) as pool:
        assert pool.options(key="r0").submit(logged, log, 0).result(timeout=RESULT) == 0
        assert pool.options(key="r7").submit(logged, log, -1).result(timeout=RESULT) == 49
    assert Path(log).read_text() == "0\n"


@pytest.mark.timeout(60)
def test_drop_fetched_forgets_a_result_once_read(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    log = str(tmp_path / "log")
    cfg = JournalConfig(path=str(path), drop_fetched=True)
    with procsched.Pool(1, journal=cfg) as pool:
        read = pool.options(key="read").submit(logged, log, "read")
        unread = pool.options(key="unread").submit(logged, log, "unread")
        done, _ = cf.wait([read, unread], timeout=RESULT)
        assert len(done) == 2
        assert read.result() == "read"  # unread's result is never asked for
    assert _runs(log) == 2
    j = _read(path)
    assert set(j.state.keys) == {"unread"}
    assert read.job_id not in j.state.jobs and j.state.jobs[unread.job_id].state == "succeeded"
    with procsched.Pool(1, journal=JournalConfig(path=str(path))) as pool:
        assert pool.options(key="read").submit(logged, log, "again").result(timeout=RESULT) == "again"  # runs again
        assert pool.options(key="unread").submit(logged, log, "never").result(timeout=RESULT) == "unread"  # stored
    assert Path(log).read_text().splitlines() == ["'read'", "'unread'", "'again'"]


@pytest.mark.timeout(60)
def test_drop_fetched_also_drops_a_stored_result_once_read(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    log = str(tmp_path / "log")
    with procsched.Pool(1, journal=JournalConfig(path=str(path))) as pool:
        assert pool.options(key="k").submit(logged, log, "stored").result(timeout=RESULT) == "stored"
    with procsched.Pool(1, journal=JournalConfig(path=str(path), drop_fetched=True)) as pool:
        assert pool.options(key="k").submit(logged, log, "never").result(timeout=RESULT) == "stored"  # read
    assert _runs(log) == 1
    assert "k" not in _read(path).state.keys


# -- 6. large results spill to their own files -----------------------------------------------


@pytest.mark.timeout(60)
def test_large_results_spill_and_come_back_without_running(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    np = pytest.importorskip("numpy")
    caplog.set_level(logging.WARNING, logger="procsched")
    path = tmp_path / "journal"
    spill = path / "spill"
    n = 256 * 1024
    logs = {name: str(tmp_path / f"{name}.log") for name in ("big", "array", "gone")}
    cfg = JournalConfig(path=str(path), spill_bytes=16 * 1024, drop_fetched=True)
    with procsched.Pool(1, journal=cfg) as pool:
        big = pool.options(key="big").submit(big_bytes, logs["big"], n)
        arr = pool.options(key="array").submit(big_array, logs["array"], n // 8)
        gone = pool.options(key="gone").submit(big_bytes, logs["gone"], n)
        done, _ = cf.wait([big, arr, gone], timeout=RESULT)  # waits without reading: nothing is fetched yet
        assert len(done) == 3
        assert sorted(os.listdir(spill)) == sorted(f"{f.job_id}.res" for f in (big, arr, gone))
        assert len(gone.result()) == n  # read: dropped, and its file with it
        wait_for(lambda: not (spill / f"{gone.job_id}.res").exists(), RESULT, "the fetched result's file to go")
    assert sorted(os.listdir(spill)) == sorted(f"{f.job_id}.res" for f in (big, arr))
    j = _read(path)
    assert {e.spill for e in j.state.jobs.values()} == {f"{big.job_id}.res", f"{arr.job_id}.res"}
    assert all(e.result == b"" for e in j.state.jobs.values())
    assert j.total_bytes < n // 4, "the results are not in the segments"

    with procsched.Pool(1, journal=JournalConfig(path=str(path), spill_bytes=16 * 1024)) as pool:
        assert pool.options(key="big").submit(big_bytes, logs["big"], n).result(timeout=RESULT) == bytes(range(256)) * (n // 256)
        got = pool.options(key="array").submit(big_array, logs["array"], n // 8).result(timeout=RESULT)
        assert np.array_equal(got, np.arange(n // 8, dtype=np.int64))
        assert pool.recovered == {}
        # A file no record refers to (a crash between writing a spill and its record) goes at compaction.
        (spill / "999.res").write_bytes(b"orphan")
        pool.compact_journal()
        assert sorted(os.listdir(spill)) == sorted(f"{f.job_id}.res" for f in (big, arr))
    assert [_runs(logs[k]) for k in ("big", "array", "gone")] == [1, 1, 1]

    # A spill file lost or damaged: its key runs again instead of failing the pool.
    os.unlink(spill / f"{big.job_id}.res")
    _flip(str(spill / f"{arr.job_id}.res"), os.path.getsize(spill / f"{arr.job_id}.res") // 2)
    caplog.clear()
    with procsched.Pool(1, journal=JournalConfig(path=str(path), spill_bytes=16 * 1024)) as pool:
        assert len(pool.options(key="big").submit(big_bytes, logs["big"], n).result(timeout=RESULT)) == n
        got = pool.options(key="array").submit(big_array, logs["array"], n // 8).result(timeout=RESULT)
        assert np.array_equal(got, np.arange(n // 8, dtype=np.int64))
    assert [_runs(logs[k]) for k in ("big", "array")] == [2, 2]
    lost = [m for m in (x.getMessage() for x in caplog.records) if m.startswith("journal_result_lost")]
    assert len(lost) == 2


@pytest.mark.timeout(60)
def test_a_drop_lost_in_a_crash_keeps_its_spill_file(tmp_path: Path) -> None:
    """The file of a dropped result outlives the drop's record until that record is written."""
    path = tmp_path / "journal"
    log = str(tmp_path / "log")
    cfg = JournalConfig(path=str(path), spill_bytes=1024)
    with procsched.Pool(1, journal=cfg) as pool:
        job = pool.options(key="big").submit(big_bytes, log, 8192)
        assert len(job.result(timeout=RESULT)) == 8192
    # Another process drops it, then dies before its turn is committed.
    code = (
        "import os, sys; from procsched import JournalConfig; from procsched.journal import Journal\n"
        "j = Journal(JournalConfig(path=sys.argv[1], spill_bytes=1024)); j.drop([int(sys.argv[2])], 'retention'); os._exit(9)"
    )
    died = subprocess.run([sys.executable, "-c", code, str(path), str(job.job_id)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert died.returncode == 9, died.stderr
    assert _read(path).state.jobs[job.job_id].spill == f"{job.job_id}.res"
    assert os.path.exists(path / "spill" / f"{job.job_id}.res"), "the journal still refers to the file"
    with procsched.Pool(1, journal=cfg) as pool:
        assert len(pool.options(key="big").submit(big_bytes, log, 8192).result(timeout=RESULT)) == 8192
    assert _runs(log) == 1


# -- 7. the command line ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_inspect_table_and_json(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    gate = tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(1, journal=JournalConfig(path=str(path))) as pool:
        ok = pool.options(key="alpha").submit(square, 6)
        bad = pool.submit(always_fails, "kaput\nat line two")
        assert ok.result(timeout=RESULT) == 36
        with pytest.raises(ValueError):
            bad.result(timeout=RESULT)
        held = pool.options(name="held").submit(gated, str(gate), 1)
        wait_for(lambda: (gate / "started").exists(), RESULT, "the held job to start")
        # inspect takes no lock: it reads a journal a pool holds
        wait_for(lambda: "running" in _cli("inspect", str(path)).stdout, RESULT, "inspect to show the running job")
        (gate / "go").touch()
        assert held.result(timeout=RESULT) == 1

    out = _cli("inspect", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "3 jobs" in lines[0] and "2 succeeded" in lines[0] and "1 failed" in lines[0]
    assert lines[1].split()[:5] == ["JOB", "KEY", "NAME", "STATE", "ATTEMPT"]
    assert len(lines) == 2 + 3, "one line per job, even for a message of several lines"
    rows = {int(line.split()[0]): line for line in lines[2:]}
    assert set(rows) == {ok.job_id, bad.job_id, held.job_id}
    assert rows[ok.job_id].split()[1:4] == ["alpha", "square", "succeeded"]
    assert rows[bad.job_id].split()[1:4] == ["-", "always_fails", "failed"]
    assert "ValueError: kaput at line two" in rows[bad.job_id]
    assert rows[held.job_id].split()[1:4] == ["-", "held", "succeeded"]

    out = _cli("inspect", "--json", str(path))
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["damage"] == []
    assert doc["summary"]["by_state"] == {"succeeded": 2, "failed": 1}
    by_id = {row["job"]: row for row in doc["jobs"]}
    assert set(by_id) == {ok.job_id, bad.job_id, held.job_id}
    assert (by_id[ok.job_id]["key"], by_id[ok.job_id]["state"]) == ("alpha", "succeeded")
    assert by_id[bad.job_id]["state"] == "failed" and by_id[bad.job_id]["error"] == "ValueError: kaput\nat line two"
    assert all(isinstance(row["submitted"], float) and row["finished"] >= row["submitted"] for row in doc["jobs"])

    out = _cli("inspect", "--json", "--state", "failed", str(path))
    assert [row["job"] for row in json.loads(out.stdout)["jobs"]] == [bad.job_id]

    out = _cli("verify", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1


@pytest.mark.timeout(60)
def test_cli_compact_shrinks_and_refuses_a_journal_in_use(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    payload = b"p" * 2048
    # keep_results=0: every finished job is dropped, and only its history is left.
    with procsched.Pool(1, journal=JournalConfig(path=str(path), keep_results=0)) as pool:
        futs = [pool.submit(logged, os.devnull, payload) for _ in range(30)]
        assert all(f.result(timeout=RESULT) == payload for f in futs)
        wait_for(lambda: not _live(pool).jobs, RESULT, "retention to drop every job")
    before_bytes = sum(os.path.getsize(p) for _, p in list_segments(str(path)))
    before = _read(path).state
    assert before.jobs == {} and before_bytes > 30 * len(payload)

    out = _cli("compact", str(path))
    assert out.returncode == 0, out.stderr
    assert f"{before_bytes} bytes ->" in out.stdout
    segments = list_segments(str(path))
    assert len(segments) == 1
    after_bytes = os.path.getsize(segments[0][1])
    assert after_bytes < 200 < before_bytes
    after = _read(path)
    assert after.damage == [] and after.state.jobs == {} and after.state.next_job == before.next_job
    # Job ids go on from where they were, not from 1.
    with procsched.Pool(1, journal=JournalConfig(path=str(path), fsync="always")) as pool:
        fut = pool.submit(square, 2)
        assert fut.result(timeout=RESULT) == 4
        assert fut.job_id == before.next_job

        held = _files(path)  # (fsync="always": the job's records were on disk before its result)
        out = _cli("compact", str(path))
        assert out.returncode == 2
        assert out.stdout == ""
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("procsched: ") and "in use" in out.stderr
        assert _files(path) == held


@pytest.mark.timeout(10)
def test_a_record_from_before_a_field_was_appended_reads_with_its_default() -> None:
    """Records evolve by appending fields with defaults: an older, shorter record still decodes."""
    old_dispatched = msgspec.msgpack.encode([4, 7, 2])  # tag, job, attempt: no worker yet
    rec = r.decoder.decode(old_dispatched)
    assert isinstance(rec, r.Dispatched) and (rec.job, rec.attempt, rec.worker) == (7, 2, -1)
    old_image = msgspec.msgpack.encode([12, 3, 1, 1, 0, b"", [], "f", None, 1.0, "succeeded"])
    image = r.decoder.decode(old_image)
    assert isinstance(image, r.Image) and image.state == "succeeded" and image.attempt == 1 and not image.dead


@pytest.mark.timeout(10)
def test_entries_share_one_empty_list_and_each_keeps_its_own_history() -> None:
    # An entry's empty lists are one shared list (three of their own per job made the cyclic
    # GC walk three more objects a job); a failure gives the entry a history of its own.
    state = JournalState()
    for job in (1, 2):
        state.apply(r.Submitted(job, 1, 1, 0, b"args", [], f"job{job}", None, 1.0))
    state.apply(r.Failed(1, 1, "error", b"", "boom", 2.0, 1.5))
    state.apply(r.Failed(1, 2, "error", b"", "boom again", 0.0, 2.5))
    one, two = state.jobs[1], state.jobs[2]
    assert [h[:3] for h in one.history] == [(1, "error", "boom"), (2, "error", "boom again")]
    assert two.history == [] and two.deps == [] and two.result_buffers == []
    assert two.history is two.deps is two.result_buffers, "no lists of its own"
    assert not any(gc.is_tracked(e) for e in (one, two))
