"""Keys and the journal at their edges: races, cancelled leaders, callbacks, bad input, terminate().

Each test pins down a way a keyed or journaled job could be lost, run twice,
or hang a pool.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import await_file, wait_for
from jobfns import gated

import procsched
from procsched import JournalConfig
from procsched.codec import CallEncoder
from procsched.futures import Encoded, JobFuture
from procsched.jobs import resolve
from procsched.journal import Journal
from procsched.journal import records as r
from procsched.journal.store import list_segments
from procsched.model import JobOptions

RESULT = 20.0
REPO = str(Path(procsched.__file__).resolve().parents[1])


def square(x: int) -> int:
    return x * x


def counted(log: str, value: Any) -> Any:
    """Append a line per run, so a test can count runs."""
    with open(log, "a") as f:
        f.write(f"{value!r}\n")
    return value


def array(n: int) -> Any:
    return np.arange(n, dtype=np.int64)


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no pickling this")


def _runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _state(path: Path) -> Any:
    return Journal(JournalConfig(path=str(path)), readonly=True).state


@pytest.mark.timeout(60)
def test_a_cancelled_hot_leader_hands_its_job_to_the_next_submit_of_its_key(tmp_path: Path) -> None:
    """A hot keyed job whose first future was cancelled while a second submit of the key waits:
    the job runs for the second future (it is neither lost nor left in the queue)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    with procsched.Pool(1, journal=str(tmp_path / "j")) as pool:
        blocker = pool.submit(gated, str(gate), "cold")
        await_file(gate / "started", RESULT)
        first = pool.options(hot=True, key="K").submit(square, 3)
        assert first.cancel()
        second = pool.options(hot=True, key="K").submit(square, 3)
        assert second is not first
        (gate / "go").touch()
        assert blocker.result(timeout=RESULT) == "cold"
        assert second.result(timeout=RESULT) == 9


@pytest.mark.timeout(60)
def test_submit_from_a_done_callback_under_fsync_always(tmp_path: Path) -> None:
    """A done-callback runs on the supervisor's loop; a submit there must not wait for the loop itself."""
    chained: list[JobFuture] = []
    with procsched.Pool(1, journal=JournalConfig(path=str(tmp_path / "j"), fsync="always")) as pool:
        first = pool.submit(square, 2)
        first.add_done_callback(lambda _: chained.append(pool.submit(square, 5)))
        assert first.result(timeout=RESULT) == 4
        wait_for(lambda: chained, RESULT, "the callback to submit")
        assert chained[0].result(timeout=RESULT) == 25
        with pytest.raises(procsched.PoolError, match="done-callback"):
            errors: list[BaseException] = []

            def compact_from_callback(_: Any) -> None:
                try:
                    pool.compact_journal()
                except BaseException as e:
                    errors.append(e)

            pool.submit(square, 1).add_done_callback(compact_from_callback)
            wait_for(lambda: errors, RESULT, "the callback to try")
            raise errors[0]


@pytest.mark.timeout(30)
def test_bad_keys_are_refused_where_they_are_given(tmp_path: Path) -> None:
    with procsched.Pool(1, journal=str(tmp_path / "j")) as pool:
        with pytest.raises(ValueError, match="'key'"):
            pool.options(key=2**64)
        with pytest.raises(TypeError, match="'key'"):
            pool.options(key=1.5)
        with pytest.raises(TypeError, match="'key'"):
            list(pool.map(square, [1, 2], key=lambda x: [x]))  # type: ignore[arg-type, return-value]
        with pytest.raises(TypeError, match="one key to many calls"):
            pool.options(key="k").map(square, [1, 2])
        assert pool.options(key=-(2**63)).submit(square, 4).result(timeout=RESULT) == 16


@pytest.mark.timeout(60)
def test_a_keyed_map_that_fails_partway_frees_its_keys(tmp_path: Path) -> None:
    """A call that cannot be pickled stops the map before anything is posted; its keys stay usable."""
    with procsched.Pool(1, journal=str(tmp_path / "j")) as pool:
        with pytest.raises(procsched.SerializationError):
            pool.map(square, [1, 2, Unpicklable(), 4], key=str)
        assert pool.options(key="1").submit(square, 1).result(timeout=RESULT) == 1
        assert list(pool.map(square, [2, 4], key=str)) == [4, 16]


@pytest.mark.timeout(60)
def test_many_threads_submitting_one_key_run_it_once(tmp_path: Path) -> None:
    """Without a journal too: the check and the registration of a key are one step."""
    log = tmp_path / "runs"
    barrier = threading.Barrier(8)
    got: list[JobFuture] = []

    with procsched.Pool(2) as pool:

        def submit() -> None:
            barrier.wait()
            got.append(pool.options(key="once").submit(counted, str(log), "x"))

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RESULT)
        assert len({id(f) for f in got}) == 1
        assert [f.result(timeout=RESULT) for f in got] == ["x"] * 8
    assert _runs(log) == ["'x'"]


@pytest.mark.timeout(60)
def test_terminate_leaves_the_jobs_for_the_next_pool(tmp_path: Path) -> None:
    """terminate() (and Ctrl-C) stop this process's work; the journal still holds it."""
    path, gate = tmp_path / "j", tmp_path / "gate"
    gate.mkdir()
    pool = procsched.Pool(1, journal=str(path))
    running = pool.submit(gated, str(gate), "ran")
    queued = [pool.submit(square, i) for i in range(3)]
    await_file(gate / "started", RESULT)
    pool.terminate()
    assert all(f.done() for f in [running, *queued])
    state = _state(path)
    assert sorted(e.state for e in state.jobs.values()) == ["queued"] * 3 + ["running"]
    (gate / "go").touch()
    with procsched.Pool(1, journal=str(path)) as again:
        assert len(again.recovered) == 4
        results = sorted(f.result(timeout=RESULT) for f in again.recovered.values() if f.result(timeout=RESULT) != "ran")
        assert results == [0, 1, 4]


@pytest.mark.timeout(60)
def test_equal_options_are_written_once(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with procsched.Pool(1, journal=str(path)) as pool:
        for i in range(50):
            pool.options(key=i).submit(square, i)
        for i in range(50):
            pool.options(priority=3, key=f"p{i}").submit(square, i)  # equal options, each a new object
        pool.submit(square, 0).result(timeout=RESULT)
    assert len(_state(path).options) == 2


def test_followers_decode_their_own_copy_of_a_result() -> None:
    """Futures sharing one job's outcome must not share the memory of its buffers."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(np.arange(8), 5, buffer_callback=buffers.append)
    shared = memoryview(bytearray(buffers[0].raw()))
    leader, follower = JobFuture(), JobFuture()
    leader.set_running_or_notify_cancel()
    resolve(leader, Encoded(payload, [shared]), None, [follower])
    a, b = leader.result(), follower.result()
    b[0] = 42
    assert a[0] == 0 and list(a) == list(range(8))


@pytest.mark.timeout(60)
def test_a_stored_result_is_as_writable_as_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with procsched.Pool(1, journal=str(path)) as pool:
        live = pool.options(key="a").submit(array, 40_000).result(timeout=RESULT)  # out of band: > 128 KiB
    with procsched.Pool(1, journal=str(path)) as pool:
        stored = pool.options(key="a").submit(array, 40_000).result(timeout=RESULT)
    assert live.flags.writeable and stored.flags.writeable
    stored += 1
    assert int(stored[0]) == 1


@pytest.mark.timeout(60)
def test_drop_fetched_applies_to_recovered_jobs(tmp_path: Path) -> None:
    """A job the journal brings back is dropped once its result is read, like any other."""
    path = tmp_path / "j"
    enc = CallEncoder()
    fn, flags = enc.function(square)
    args, _ = enc.arguments(square, (7,), {})
    j = Journal(JournalConfig(path=str(path)))
    j.append(r.Submitted(1, j.fn_id(fn), j.opts_id(JobOptions()), flags, args, [], "square", "seven", 1.0))
    j.close()
    with procsched.Pool(1, journal=JournalConfig(path=str(path), drop_fetched=True)) as pool:
        assert pool.recovered[1].result(timeout=RESULT) == 49
    assert _state(path).jobs == {}


@pytest.mark.timeout(60)
def test_cli_compact_refuses_damage_unless_asked_to_salvage(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with procsched.Pool(1, journal=str(path)) as pool:
        for i in range(6):
            pool.options(key=i).submit(square, i).result(timeout=RESULT)
    (_, segment), = list_segments(str(path))
    data = bytearray(Path(segment).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(segment).write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": REPO}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "procsched", "journal", *args], env=env, capture_output=True, text=True, timeout=30)

    refused = cli("compact", str(path))
    assert refused.returncode == 2 and "byte offset" in refused.stderr
    assert Path(segment).read_bytes() == bytes(data), "a refused compaction changes nothing"
    salvaged = cli("compact", "--salvage", str(path))
    assert salvaged.returncode == 0, salvaged.stderr
    assert cli("verify", str(path)).returncode == 0
    missing = cli("compact", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2 and not (tmp_path / "nothing-here").exists()
