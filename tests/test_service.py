"""``procsched serve`` as a real subprocess, reached by a real client over its socket.

Crashes are real (SIGKILL of the service mid-batch), signals are real
(SIGTERM drains), and systemd's side of the notify protocol is a real
datagram socket.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import wait_for
from servicectl import Service
from svcjobs import crash, slow_square, square, touch_then_square

import procsched
from procsched import protocol as p


@pytest.fixture
def svc(tmp_path: Path):
    with Service(tmp_path) as s:
        yield s


def test_submit_map_and_errors_travel_by_value(svc: Service) -> None:
    offset = 10

    def shifted(x: int) -> int:  # a closure: pickled by value, as a notebook's functions are
        return x + offset

    with procsched.connect(svc.address, progress=False) as client:
        assert client.submit(shifted, 5).result(10) == 15
        assert client.submit(lambda: "lambda").result(10) == "lambda"
        assert list(client.map(square, range(50))) == [x * x for x in range(50)]
        assert list(client.map(shifted, range(20), chunksize=4)) == [x + 10 for x in range(20)]
        with pytest.raises(ZeroDivisionError):
            client.submit(divmod, 1, 0).result(10)
        crashed = client.submit(crash, 7)
        with pytest.raises(procsched.WorkerCrashed) as info:
            crashed.result(10)
        assert info.value.exitcode == 7
        events = [json.loads(line) for line in svc.output().splitlines() if line.startswith("{")]
        crashed_log = next(e for e in events if e["event"] == "job_crashed")  # JSON logs: the job's fields
        assert (crashed_log["job"], crashed_log["attempt"], crashed_log["pid"]) == (crashed.job_id, 1, info.value.pid)
        assert crashed_log["level"] == "warning" and crashed_log["ts"] > 0
        with pytest.raises(procsched.JobTimeout):
            client.options(timeout=0.2).submit(slow_square, 3, 30).result(20)
        assert client.submit("svcjobs:square", 9).result(10) == 81  # by import path
        done, _ = cf.wait([client.submit(square, i) for i in range(100)], timeout=20)
        assert len(done) == 100
        stats = client.stats()
        assert (stats["crashed"], stats["timed_out"], stats["failed"]) == (1, 1, 3)


def test_kill9_mid_batch_then_restart_the_same_client_gets_every_result(tmp_path: Path) -> None:
    svc = Service(tmp_path).start()
    try:
        client = procsched.connect(svc.address, progress=False, reconnect=60)
        futures = [client.submit(slow_square, i, 0.01) for i in range(200)]
        wait_for(lambda: sum(f.done() for f in futures) >= 40, 30, "some results before the kill")
        assert not all(f.done() for f in futures)
        svc.kill()
        svc.start()
        results = [f.result(60) for f in futures]
        assert results == [i * i for i in range(200)]
        assert client.submit(square, 12).result(10) == 144  # and it goes on
        client.close()
    finally:
        svc.stop()


def test_closing_a_client_never_cancels_its_jobs(svc: Service, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    client = procsched.connect(svc.address, progress=False)
    fut = client.submit(touch_then_square, str(gate), 4)
    job = fut.job_id
    wait_for(lambda: (gate / "started-4").exists(), 10, "the job to start")
    client.close()
    assert isinstance(fut.exception(5), procsched.PoolError)  # not left waiting forever: nobody would settle it
    (gate / "go").touch()
    with procsched.connect(svc.address, progress=False) as other:
        wait_for(lambda: other.show(job)["state"] == "succeeded", 10, "the job to finish")


def test_sigterm_drains_running_jobs_and_keeps_queued_ones_for_the_next_start(tmp_path: Path) -> None:
    svc = Service(tmp_path, workers=2, config="[service]\ndrain_timeout = 20.0\n").start()
    gate = tmp_path / "gate"
    gate.mkdir()
    client = procsched.connect(svc.address, progress=False, reconnect=60)
    futures = [client.submit(touch_then_square, str(gate), i) for i in range(6)]
    wait_for(lambda: len(list(gate.glob("started-*"))) == 2, 10, "two jobs on the two workers")
    svc.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining" in svc.output(), 10, "the drain to begin")
    with pytest.raises(OSError):  # it accepts no one new
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(svc.socket)
        finally:
            s.close()
    (gate / "go").touch()  # the running jobs may finish now
    assert svc.proc.wait(30) == 0
    started = sorted(p.name for p in gate.glob("started-*"))
    assert len(started) == 2, started  # nothing new started while draining
    running = [int(n.split("-")[1]) for n in started]
    for i in running:
        assert futures[i].result(10) == i * i
    assert not any(futures[i].done() for i in range(6) if i not in running)
    svc.start()  # the queued jobs come back from the journal, and the client gets them
    assert [f.result(30) for f in futures] == [i * i for i in range(6)]
    client.close()
    svc.stop()


def test_drain_deadline_stops_a_running_job_and_the_next_start_runs_it_again(tmp_path: Path) -> None:
    svc = Service(tmp_path, workers=1, config="[service]\ndrain_timeout = 0.5\n").start()
    gate = tmp_path / "gate"
    gate.mkdir()
    client = procsched.connect(svc.address, progress=False, reconnect=60)
    fut = client.submit(touch_then_square, str(gate), 3)
    wait_for(lambda: (gate / "started-3").exists(), 10, "the job to start")
    assert svc.terminate(30) == 0
    assert not fut.done()  # stopped, not failed: it runs again
    (gate / "started-3").unlink()
    (gate / "go").touch()
    svc.start()
    assert fut.result(30) == 9
    assert (gate / "started-3").exists()
    client.close()
    svc.stop()


def test_systemd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    svc = Service(tmp_path, config="[service]\nstatus_interval = 0.1\n", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    svc.start()
    seen: list[str] = []

    def until(field: str) -> str:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            msg = listener.recv(4096).decode()
            seen.append(msg)
            if field in msg:
                return msg
        raise AssertionError(f"no {field} among {seen}")

    try:
        ready = until("READY=1")
        assert f"MAINPID={svc.proc.pid}" in ready
        assert "STATUS=" in until("STATUS=")
        assert "running" in seen[-1]
        until("WATCHDOG=1")
        until("WATCHDOG=1")  # the loop keeps pinging
        svc.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert svc.proc.wait(30) == 0
    finally:
        svc.stop()
        listener.close()


def test_sighup_reloads_the_worker_count_and_limits(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    svc = Service(tmp_path, workers=None, config="[pool]\nmax_workers = 1\n", env={"NOTIFY_SOCKET": path})
    with svc, procsched.connect(svc.address, progress=False) as client:
        assert len(client.status()["workers"]) == 1
        Path(svc.config_path).write_text("[pool]\nmax_workers = 3\nmax_tasks_per_child = 5\n")
        svc.proc.send_signal(signal.SIGHUP)
        seen = []
        while not any("READY=1" in m and "MAINPID" not in m for m in seen):
            seen.append(listener.recv(4096).decode())
        assert any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in seen), seen
        wait_for(lambda: [w["state"] for w in client.status()["workers"]] == ["ready"] * 3, 20, "three workers")
        pids = {client.submit(os.getpid).result(10) for _ in range(20)}
        assert len(pids) >= 2  # max_tasks_per_child = 5 recycles them too
        Path(svc.config_path).write_text("[pool]\nmax_workers = 1\n")
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(client.status()["workers"]) == 1, 20, "back to one worker")
        assert client.submit(square, 3).result(10) == 9
        Path(svc.config_path).write_text("[pool]\nmax_workers = 'many'\n")  # a bad file: keeps running as it was
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in svc.output(), 10, "the reload to be refused")
        assert client.submit(square, 4).result(10) == 16
    listener.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # the child only connects and exits
def test_socket_is_0660_and_a_peer_that_is_not_allowed_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    root = Path(tempfile.mkdtemp(prefix="procsched-peer-", dir="/tmp"))
    root.chmod(0o755)  # so another user can reach the socket file at all
    try:
        with Service(root) as svc:
            assert os.stat(svc.socket).st_mode & 0o777 == 0o660
            assert "Permission" in _as_user(65534, svc.socket)  # the file mode stops it first
            os.chmod(svc.socket, 0o666)  # past the file mode, the credentials check stops it
            answer = _as_user(65534, svc.socket)
            assert "not allowed" in answer and "65534" in answer
            assert _as_user(4321, svc.socket, gid=os.getgid()) == "Welcome"  # in the service's group: the 0660 mode lets it in
        (root / "state").chmod(0o755)
        with Service(root, config="[service]\nallow_users = [65534]\n") as svc:
            os.chmod(svc.socket, 0o666)
            assert _as_user(65534, svc.socket) == "Welcome"
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _as_user(uid: int, path: str, gid: int | None = None) -> str:
    """Connect and say Hello as user ``uid`` (group ``gid``, default the same number; a forked child); what came back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(path)
                try:
                    s.sendall(p.frame(p.Hello(p.VERSION)))
                except OSError:  # refused before our Hello arrived: its reason is waiting to be read
                    pass
                reader = p.FrameReader(1 << 20)
                bodies: list[bytes] = []
                while not bodies:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError("closed without a reply")
                    bodies = reader.feed(data)
                msg = p.reply_decoder.decode(bodies[0])
                text = "Welcome" if type(msg) is p.Welcome else f"{msg.kind}: {msg.message}"
            except OSError as e:
                text = f"{type(e).__name__}: {e}"
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_tcp_needs_the_token_and_refuses_to_start_without_one(tmp_path: Path) -> None:
    token = "s3cret-token"
    svc = Service(tmp_path / "a", config='[service]\ntcp = "127.0.0.1:0"\n', env={"PROCSCHED_TOKEN": token})
    with svc:
        line = wait_for(lambda: next((l for l in svc.output().splitlines() if '"tcp"' in l), None), 10, "the TCP address")
        address = "tcp://" + json.loads(line)["tcp"]
        with procsched.connect(address, token=token, progress=False) as client:
            assert client.submit(square, 6).result(10) == 36
        with pytest.raises(PermissionError, match="token"):
            procsched.connect(address, token="wrong", progress=False)
    lone = Service(tmp_path / "b", config='[service]\ntcp = "0.0.0.0:0"\n', env={"PROCSCHED_TOKEN": ""})
    lone.start(wait=False)
    assert lone.proc.wait(30) == 2
    assert "needs a token" in lone.output()


def test_an_oversized_frame_closes_that_connection_only(svc: Service) -> None:
    with procsched.connect(svc.address, progress=False) as client:
        futures = [client.submit(slow_square, i, 0.005) for i in range(100)]
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(10)
        raw.connect(svc.socket)
        raw.sendall(p.frame(p.Hello(p.VERSION)))
        raw.sendall(p.HEADER.pack(1 << 31) + b"x" * 100)
        replies = b""
        while True:
            data = raw.recv(65536)
            if not data:
                break  # closed by the server
            replies += data
        raw.close()
        bodies = p.FrameReader(1 << 20).feed(replies)
        msgs = [p.reply_decoder.decode(b) for b in bodies]
        assert type(msgs[0]) is p.Welcome
        assert type(msgs[-1]) is p.Failure and "over the limit" in msgs[-1].message
        assert [f.result(30) for f in futures] == [i * i for i in range(100)]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("[service]\nmax_frame = 'big'\n", "max_frame"),
        ("[service]\nstatus_interval = 0\n", "status_interval"),
        ("[service]\nmetrics = 'nonsense'\n", "metrics"),
        ("[pool]\nkill_grace = -1\n", "kill_grace"),
        ("[service]\nunknown_key = 1\n", "unknown_key"),
    ],
)
def test_a_bad_settings_file_exits_2_naming_the_key_and_file(tmp_path: Path, setting: str, named: str) -> None:
    svc = Service(tmp_path, config=setting)
    svc.start(wait=False)
    assert svc.proc.wait(30) == 2  # the unit does not restart on 2: a restart cannot fix it
    out = svc.output()
    assert named in out and "procsched.toml" in out


def test_submit_rejects_bad_options_from_a_client_and_keeps_what_it_accepted(svc: Service) -> None:
    with procsched.connect(svc.address, progress=False) as client:
        good = client.submit(square, 5)
        assert good.result(10) == 25
        spec = p.JobSpec(b"\x80\x05N.", 0, b"", "bad", procsched.JobOptions(timeout=-1.0))
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(10)
        raw.connect(svc.socket)
        raw.sendall(p.frame(p.Hello(p.VERSION)) + p.frame(p.Submit([spec])))
        reader = p.FrameReader(1 << 20)
        msgs: list[object] = []
        while len(msgs) < 2:
            msgs += [p.reply_decoder.decode(b) for b in reader.feed(raw.recv(65536))]
        raw.close()
        assert type(msgs[1]) is p.Accepted and msgs[1].jobs == [0] and "timeout" in msgs[1].errors[0][1]
        assert client.show(good.job_id)["state"] == "succeeded"
        # through the client: one bad submit among good ones fails alone, with its own reason
        futures = [client.submit(square, i) for i in range(30)]
        bad = client.options(depends_on=10**9).submit(square, 99)
        futures += [client.submit(square, i) for i in range(30, 60)]
        with pytest.raises(ValueError, match="depends_on"):
            bad.result(10)
        assert [f.result(10) for f in futures] == [i * i for i in range(60)]


def test_socket_activation_serves_the_socket_systemd_passed(tmp_path: Path) -> None:
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # as procsched.socket does, before the service exists
    listener.listen(16)
    fd = listener.fileno()
    svc = Service(tmp_path)
    # systemd's hand-over: the socket at fd 3, LISTEN_PID the service's own pid (the shim exec()s it)
    shim = [sys.executable, "-c", "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd);"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='procsched');"
            "os.execv(sys.argv[2], sys.argv[2:])", str(fd)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    with open(svc.log, "ab") as out:
        svc.proc = subprocess.Popen([*shim, *svc.command()], env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(fd,))
    listener.close()
    try:
        with procsched.connect("unix://" + path, progress=False) as client:
            assert client.submit(square, 11).result(20) == 121
            assert not os.path.exists(svc.socket)  # it did not make a socket of its own
            pid = client.submit(os.getpid).result(10)
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"LISTEN_FDS" not in f.read()  # taken before any worker started
        assert svc.terminate(30) == 0
        assert os.path.exists(path)  # the socket file is systemd's: it outlives the service
    finally:
        svc.stop()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(60)
def test_an_idle_service_sleeps_after_watching_for_more_short_jobs(tmp_path: Path) -> None:
    # With short jobs about, the service's loop watches its rings and sockets a while
    # before it sleeps (supervisor.py). Whatever rings its doorbell meanwhile (here a
    # reload, posted by the service's main thread while jobs run) must not keep it
    # watching for ever: once idle, it uses no CPU.
    svc = Service(tmp_path, workers=None, config="[pool]\nmax_workers = 2\n")
    with svc, procsched.connect(svc.address, progress=False) as client:
        assert svc.proc is not None
        for limit in (7, 8, 9):
            futures = [client.submit(square, x) for x in range(2000)]
            Path(svc.config_path).write_text(f"[pool]\nmax_workers = 2\nmax_tasks_per_child = {limit * 1000}\n")
            svc.proc.send_signal(signal.SIGHUP)
            assert [f.result(timeout=30) for f in futures] == [x * x for x in range(2000)]
        wait_for(lambda: svc.output().count('"reloaded"') == 3, 10, "the three reloads")
        assert client.submit(square, 3).result(timeout=30) == 9  # (the loop has taken the last one in)
        before = _cpu_seconds(svc.proc.pid)
        time.sleep(1.0)  # (a window in which an idle service must not work)
        used = _cpu_seconds(svc.proc.pid) - before
    assert used < 0.2, f"an idle service used {used:.2f} s of CPU in a second"
