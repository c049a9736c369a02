"""The Client's concurrent.futures semantics and its recovery, against a real service."""

from __future__ import annotations

import concurrent.futures as cf
import signal
from pathlib import Path

import pytest
from conftest import wait_for
from servicectl import Service
from svcjobs import slow_square, square, touch_then_square

import procsched


@pytest.fixture
def svc(tmp_path: Path):
    with Service(tmp_path, workers=1) as s:
        yield s


def hold_worker(client: procsched.Client, gate: Path, x: int) -> cf.Future:
    """Take the (one) worker with a job that runs until ``gate/go`` exists; once it has begun."""
    gate.mkdir(exist_ok=True)
    fut = client.submit(touch_then_square, str(gate), x)
    wait_for(lambda: (gate / f"started-{x}").exists(), 10, "the job to start")
    return fut


def test_cancel_of_queued_jobs_and_map_timeout(svc: Service, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with procsched.connect(svc.address, progress=False) as client:
        blocker = hold_worker(client, gate, 1)
        queued = [client.submit(square, i) for i in range(20)]
        assert all(f.cancel() for f in queued)  # the service's own CANCELLED push races this: no error
        assert all(f.cancelled() for f in queued)
        done, _ = cf.wait(queued, timeout=5)
        assert len(done) == 20
        assert client.show(queued[0].job_id)["state"] == "cancelled"
        with pytest.raises(cf.TimeoutError):  # the stdlib's map contract, not a RuntimeError from cancelling
            list(client.map(slow_square, range(4), [0.5] * 4, timeout=0.3))
        (gate / "go").touch()
        assert blocker.result(10) == 1
        assert not blocker.cancel()  # finished: cannot be cancelled


def test_then_and_depends_on_through_the_client(svc: Service) -> None:
    with procsched.connect(svc.address, progress=False) as client:
        first = client.submit(square, 3)
        second = client.then(first, square)
        assert second.result(10) == 81
        after = client.options(depends_on=[first, second]).submit(square, 2)
        assert after.result(10) == 4
        assert client.show(after.job_id)["state"] == "succeeded"


def test_shutdown_cancel_futures_cancels_what_has_not_started(svc: Service, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    client = procsched.connect(svc.address, progress=False)
    running = hold_worker(client, gate, 2)
    queued = [client.submit(square, i) for i in range(20)]
    (gate / "go").touch()
    client.shutdown(wait=True, cancel_futures=True)
    assert running.result(0) == 4
    assert sum(f.cancelled() for f in queued) >= 15  # (a few may have started meanwhile)
    assert all(f.done() for f in queued)


def test_a_restart_without_a_journal_sends_the_jobs_again(tmp_path: Path) -> None:
    svc = Service(tmp_path, workers=1, config="[service]\njournal = false\n").start()
    gate = tmp_path / "gate"
    try:
        client = procsched.connect(svc.address, progress=False, reconnect=60)
        first = hold_worker(client, gate, 5)
        plain = [client.submit(square, i) for i in range(10)]
        chained = client.options(depends_on=first).submit(square, 7)
        svc.kill()
        (gate / "go").touch()
        svc.start()
        assert first.result(30) == 25  # the new service ran it again, from the bytes the client kept
        assert [f.result(30) for f in plain] == [i * i for i in range(10)]
        with pytest.raises(procsched.PoolError, match="without its journal"):
            chained.result(30)  # its prerequisite's id means nothing to the new service
        client.close()
    finally:
        svc.stop()


def test_submits_during_a_drain_go_to_the_next_service(tmp_path: Path) -> None:
    svc = Service(tmp_path, workers=1, config="[service]\ndrain_timeout = 20.0\n").start()
    gate = tmp_path / "gate"
    try:
        client = procsched.connect(svc.address, progress=False, reconnect=60)
        running = hold_worker(client, gate, 6)
        svc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in svc.output(), 10, "the drain")
        late = client.submit(square, 8)  # refused by the stopping service: held, not failed
        (gate / "go").touch()
        assert running.result(30) == 36
        assert svc.proc.wait(30) == 0
        svc.start()
        assert late.result(30) == 64
        client.close()
    finally:
        svc.stop()


def test_a_job_id_read_in_a_done_callback_before_acceptance_fails_fast(svc: Service) -> None:
    with procsched.connect(svc.address, progress=False) as client:
        seen: list[object] = []

        def callback(fut: cf.Future) -> None:  # runs on the client's reader thread
            inner = client.submit(square, 4)
            try:
                seen.append(inner.job_id)
            except procsched.PoolError as e:
                seen.append(e)
            seen.append(inner)

        client.submit(square, 1).add_done_callback(callback)
        wait_for(lambda: len(seen) == 2, 10, "the callback")
        assert isinstance(seen[0], (int, procsched.PoolError))
        assert seen[1].result(10) == 16  # type: ignore[attr-defined]


def test_the_default_socket_is_not_trusted_in_a_directory_others_can_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "procsched"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could have replaced the socket in here
    (shared / "procsched.sock").touch()
    monkeypatch.delenv("PROCSCHED_ADDRESS", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(PermissionError, match="writable by other users"):
        procsched.connect()
    svc = Service(tmp_path / "svc", args=("--socket", str(shared / "s.sock")))
    svc.start(wait=False)
    assert svc.proc.wait(30) == 2  # and the service will not put its socket there either
    assert "writable by other users" in svc.output()


def _cancel_storm(executor: object, submit: object, n: int = 2000) -> None:
    """Cancel half of ``n`` short jobs from 4 threads while results stream in: a True from
    cancel() must mean the future ends cancelled, a False that it ends with its result."""
    import threading

    futures = [submit(square, i) for i in range(n)]  # type: ignore[operator]
    said: dict[int, bool] = {}

    def cancel_some(k: int) -> None:
        for i in range(k, n, 8):
            said[i] = futures[i].cancel()

    threads = [threading.Thread(target=cancel_some, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    cf.wait(futures, timeout=60)
    for i, ok in said.items():
        assert futures[i].cancelled() is ok, (i, ok, futures[i])
        if not ok:
            assert futures[i].result(0) == i * i
    assert any(said.values())


def test_cancel_true_means_cancelled_while_results_stream_in_embedded() -> None:
    with procsched.Pool(2) as pool:
        _cancel_storm(pool, pool.submit)


def test_cancel_true_means_cancelled_while_results_stream_in_client(tmp_path: Path) -> None:
    with Service(tmp_path) as svc, procsched.connect(svc.address, progress=False) as client:
        _cancel_storm(client, client.submit)
