"""The systemd protocols, spoken to real sockets in real processes.

Given a datagram socket bound where ``NOTIFY_SOCKET`` points (a path in
``tmp_path``, or an abstract name), when the service notifies, then the
socket receives exactly the documented datagram, sent by this process.
Given a socket that is missing, refuses, or is full, a notify returns False
at once, logs one warning, and raises nothing.

Socket activation runs end to end: the test creates listening sockets,
connects to them before any "service" runs (as a client of a socket unit
would), then starts a child whose fds 3, 4, 5 are those sockets and a pipe,
with ``LISTEN_PID`` set to the child's own pid by the image that exec()s
it, the way the manager does between fork and exec. The child adopts them
with ``listen_fds_with_names``, answers the queued connections, and reports
what it saw. Every wait has a deadline (socket timeouts, ``communicate``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import procsched
from procsched import systemd
from procsched.systemd import Notifier

REPO = str(Path(procsched.__file__).resolve().parents[1])
WAIT = 10.0  # seconds any single receive or child may take

pytestmark = pytest.mark.timeout(60)


# --- notify ---------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, named by NOTIFY_SOCKET as a filesystem path."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def notifier(receiver: socket.socket) -> Iterator[Notifier]:
    n = Notifier.from_env()
    assert n is not None
    with n:
        yield n


def received(sock: socket.socket) -> str:
    """The next datagram, waiting at most WAIT seconds."""
    return sock.recv(65536).decode()


def nothing_pending(sock: socket.socket) -> bool:
    """No datagram is queued right now (a poll that does not wait)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def test_ready_sends_ready_and_mainpid_from_this_process(receiver: socket.socket, notifier: Notifier) -> None:
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    assert notifier.ready()
    data, ancillary, _, _ = receiver.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert data.decode() == f"READY=1\nMAINPID={os.getpid()}"
    senders = [
        struct.unpack("3i", payload)[0]  # struct ucred: pid, uid, gid
        for level, kind, payload in ancillary
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    ]
    assert senders == [os.getpid()]  # the sender NotifyAccess=main accepts


@pytest.mark.parametrize(
    ("method", "args", "expected"),
    [
        ("ready", ("serving 4 workers",), "READY=1\nMAINPID={pid}\nSTATUS=serving 4 workers"),
        ("status", ("3 running, 10 queued",), "STATUS=3 running, 10 queued"),
        ("status", ("two\nlines",), "STATUS=two lines"),  # a newline must not start an assignment
        ("watchdog", (), "WATCHDOG=1"),
        ("stopping", (), "STOPPING=1"),
        ("stopping", ("draining 2 jobs",), "STOPPING=1\nSTATUS=draining 2 jobs"),
        ("reloaded", (), "READY=1"),
        ("reloaded", ("config reloaded",), "READY=1\nSTATUS=config reloaded"),
        ("extend_timeout", (12.5,), "EXTEND_TIMEOUT_USEC=12500000"),
        ("notify", ("ERRNO=5", "BUSERROR=x"), "ERRNO=5\nBUSERROR=x"),
    ],
)
def test_each_message_is_one_exact_datagram(
    receiver: socket.socket, notifier: Notifier, method: str, args: tuple[object, ...], expected: str
) -> None:
    assert getattr(notifier, method)(*args) is True
    assert received(receiver) == expected.format(pid=os.getpid())
    assert nothing_pending(receiver)


def test_reloading_carries_the_monotonic_clock_in_microseconds(receiver: socket.socket, notifier: Notifier) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(receiver).split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"procsched-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier.from_env()
        assert n is not None
        with n:
            assert n.watchdog()
            assert received(sock) == "WATCHDOG=1"


@pytest.mark.parametrize("value", [None, "", "relative/notify.sock", "@", "vsock:2:1234", "/" + "x" * 200])
def test_from_env_without_a_usable_socket_is_none(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert Notifier.from_env() is None


def test_from_env_can_unset_the_variable(receiver: socket.socket) -> None:
    n = Notifier.from_env(unset=True)
    assert n is not None
    n.close()
    assert "NOTIFY_SOCKET" not in os.environ


def warnings_from_us(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "procsched.systemd" and r.levelno == logging.WARNING]


def test_missing_socket_does_not_raise_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="procsched.systemd")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here.sock"))
    n = Notifier.from_env()
    assert n is not None
    with n:
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.stopping("bye") is False
    [warning] = warnings_from_us(caplog)
    assert "systemd_notify_failed" in warning and "nobody-here.sock" in warning


def test_socket_whose_reader_is_gone_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="procsched.systemd")
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    assert path.exists()  # the file stays; sends to it are refused
    with Notifier(str(path)) as n:
        assert n.status("anyone?") is False
        assert n.status("anyone?") is False
    assert len(warnings_from_us(caplog)) == 1


def test_full_queue_drops_instead_of_blocking(
    receiver: socket.socket, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="procsched.systemd")
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent, started = 0, time.monotonic()
    for _ in range(100_000):  # a blocking send would hang here (and the timeout would fail the test)
        started = time.monotonic()
        if not notifier.status("x" * 512):
            break
        sent += 1
    else:
        pytest.fail("the receiver never filled up")
    assert time.monotonic() - started < 1.0  # the refused send returned at once
    assert sent > 0
    assert len(warnings_from_us(caplog)) == 1
    received(receiver)  # drain one: sending works again
    assert notifier.watchdog()


def test_closed_notifier_is_quiet(receiver: socket.socket, notifier: Notifier) -> None:
    notifier.close()
    notifier.close()
    assert notifier.ready() is False
    assert nothing_pending(receiver)


# --- watchdog, environment ------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4243"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "junk"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, 0.5),  # empty: not restricted
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_reads_the_environment_and_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"INVOCATION_ID": "0f3c"}, True),
        ({"JOURNAL_STREAM": "8:1234"}, True),
        ({"INVOCATION_ID": ""}, False),
    ],
)
def test_under_systemd(env: dict[str, str], expected: bool) -> None:
    assert systemd.under_systemd(env) is expected


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "4243", "LISTEN_FDS": "2"},  # for another process: not ours, even to look at
        {"LISTEN_FDS": "1"},  # no LISTEN_PID: never ours
        {"LISTEN_PID": "4242", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "4242", "LISTEN_FDS": "many", "LISTEN_FDNAMES": "a"},
    ],
)
def test_listen_fds_without_fds_for_us_is_empty_and_unsets(env: dict[str, str]) -> None:
    env = dict(env, OTHER="kept")
    assert systemd.listen_fds(env, pid=4242) == []
    assert env == {"OTHER": "kept"}


# --- socket activation, end to end ----------------------------------------

# Runs first in the child: place the inherited fds at 3, 4, 5 and name them,
# then exec the service image in this same process, as the manager does
# between fork and exec (so LISTEN_PID is the pid that will read it).
LAUNCHER = """
import os, sys
fds = [int(a) for a in sys.argv[1].split(",")]
for target, fd in enumerate(fds, 3):
    os.dup2(fd, target)
for fd in fds:
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES="control:tcp:fifo")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

# The "service": adopt, report, answer each queued connection.
SERVICE = """
import json, os, socket, subprocess, sys
from procsched import systemd
pairs = systemd.listen_fds_with_names()
grandchild = subprocess.run(
    [sys.executable, "-c", "import os, sys; print(sorted(k for k in os.environ if k.startswith('LISTEN_')))"],
    capture_output=True, text=True, timeout=20, check=True,
)
report = {
    "pid": os.getpid(),
    "names": [name for name, _ in pairs],
    "fds": [s.fileno() for _, s in pairs],
    "families": [int(s.family) for _, s in pairs],
    "types": [int(s.type) for _, s in pairs],
    "inheritable": [os.get_inheritable(s.fileno()) for _, s in pairs],
    "fd5_inheritable": os.get_inheritable(5),
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "grandchild_env": grandchild.stdout.strip(),
}
for name, s in pairs:
    s.settimeout(20)
    conn, _ = s.accept()
    with conn:
        conn.settimeout(20)
        conn.sendall(b"pong " + name.encode() + b" " + conn.recv(64))
print(json.dumps(report))
"""


def high_dup(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or above, clear of 3, 4, 5."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


@pytest.mark.timeout(60)
def test_listen_fds_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "procsched.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fifo_r, fifo_w = os.pipe()
    clients: list[socket.socket] = []
    passed: list[int] = []
    proc = None
    try:
        unix.bind(str(path))
        unix.listen(8)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        # Clients connect before the service exists: the listening socket queues them.
        for address, family in ((str(path), socket.AF_UNIX), (tcp.getsockname(), socket.AF_INET)):
            client = socket.socket(family, socket.SOCK_STREAM)
            clients.append(client)
            client.settimeout(WAIT)
            client.connect(address)
            client.sendall(b"ping")
        passed = [high_dup(unix.fileno()), high_dup(tcp.fileno()), high_dup(fifo_r)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        for name in systemd.LISTEN_VARS:
            env.pop(name, None)
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, ",".join(map(str, passed)), SERVICE],
            pass_fds=passed, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        replies = [client.recv(64) for client in clients]  # bounded by the clients' timeouts
        out, err = proc.communicate(timeout=WAIT * 2)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
        for s in [unix, tcp, *clients]:
            s.close()
        for fd in [fifo_r, fifo_w, *passed]:
            os.close(fd)

    assert proc.returncode == 0, err
    assert replies == [b"pong control ping", b"pong tcp ping"]
    report = json.loads(out)
    assert report["names"] == ["control", "tcp"]  # the FIFO at fd 5 is not a socket: skipped
    assert report["fds"] == [3, 4]
    assert report["families"] == [socket.AF_UNIX, socket.AF_INET]
    assert report["types"] == [socket.SOCK_STREAM, socket.SOCK_STREAM]
    assert report["inheritable"] == [False, False]  # FD_CLOEXEC: workers do not get them
    assert report["fd5_inheritable"] is False
    assert report["env"] == [] and report["grandchild_env"] == "[]"
    assert "systemd_listen_fd_skipped" in err and "fd=5" in err
