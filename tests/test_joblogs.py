"""Per-job output capture: a job's stdout and stderr in ``<log_dir>/<job id>.log``.

Given a pool with a ``log_dir``, when jobs write (print, ``sys.stderr``,
logging, ``os.write`` to fds 1 and 2, a subprocess), then each job's output
is in its own file, every attempt appended, within ``log_bytes`` plus one
line that says the rest was dropped, kept when the worker crashes, and
readable while the job runs. Without a ``log_dir``, nothing is written and
the output goes to the worker's stdout and stderr as before.

Real pools, real jobs, real files. Job functions live at module level so
that they pickle by reference; a job that must wait does so on a gate file
the test creates, never on a sleep.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import await_file, wait_for

import procsched

CAP = 4096


def _log(log_dir: Path, fut: procsched.JobFuture) -> str:
    return (log_dir / f"{fut.job_id}.log").read_text()


def _marker_line(text: str) -> str:
    return text.splitlines()[-1]


# -- jobs -----------------------------------------------------------------------


def chatty(tag: str) -> str:
    print(f"print {tag}")
    print(f"stderr {tag}", file=sys.stderr)
    sys.stdout.write(f"write {tag}\n")
    logger = logging.getLogger(f"joblogs.{tag}")
    handler = logging.StreamHandler()  # sys.stderr, as it is while the job runs
    logger.addHandler(handler)
    try:
        logger.warning("logging %s", tag)
    finally:
        logger.removeHandler(handler)
    return tag


def fd_writes(tag: str) -> str:
    os.write(1, f"fd1 {tag}\n".encode())
    os.write(2, f"fd2 {tag}\n".encode())
    return tag


def runs_subprocesses(tag: str) -> int:
    subprocess.run(["echo", f"echo {tag}"], check=True)
    code = f"import sys; print('child out {tag}'); print('child err {tag}', file=sys.stderr)"
    return subprocess.run([sys.executable, "-c", code], check=True).returncode


def floods_python(n: int) -> int:
    """Print ``n`` numbered lines, then say how large the log is now (it is fd 1)."""
    for i in range(n):
        print(f"line {i:06d}")
    sys.stdout.flush()
    return os.fstat(1).st_size


def floods_fd(nbytes: int) -> int:
    os.write(1, b"a" * nbytes)
    os.write(1, b"\n")
    return nbytes


def floods_both(n: int) -> None:
    for i in range(n):
        print(f"py {i:06d}")
        os.write(2, f"fd {i:06d}\n".encode())


def fails_first() -> int:
    attempt = procsched.current_job().attempt
    print(f"running attempt {attempt}")
    if attempt == 1:
        raise ValueError("first attempt fails")
    return attempt


def crashes_after_output(nbytes: int) -> None:
    print("before the crash")
    os.write(2, b"fd2 before the crash\n")
    if nbytes:
        os.write(1, b"c" * nbytes)
    os._exit(3)


def waits_on_gate(gate: str) -> str:
    print("started, waiting")
    await_file(gate)
    print("gate opened")
    return "done"


def prints_and_flushes(tag: str) -> str:
    print(f"uncaptured {tag}", flush=True)
    os.write(2, f"uncaptured fd2 {tag}\n".encode())
    return tag


# -- tests ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_python_level_output_goes_to_the_jobs_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with procsched.Pool(2, log_dir=str(tmp_path)) as pool:
        futs = [pool.submit(chatty, f"job{i}") for i in range(4)]
        assert [f.result(timeout=20) for f in futs] == [f"job{i}" for i in range(4)]
    for i, fut in enumerate(futs):
        assert _log(tmp_path, fut).splitlines() == [f"print job{i}", f"stderr job{i}", f"write job{i}", f"logging job{i}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{f.job_id}.log" for f in futs)
    out, err = capfd.readouterr()
    for i in range(4):  # none of it reached the worker's own stdout or stderr
        assert f"print job{i}" not in out and f"stderr job{i}" not in err and f"logging job{i}" not in err


@pytest.mark.timeout(30)
def test_fd_level_writes_go_to_the_jobs_file(tmp_path: Path) -> None:
    with procsched.Pool(2, log_dir=str(tmp_path)) as pool:
        futs = [pool.submit(fd_writes, f"job{i}") for i in range(4)]
        for f in futs:
            f.result(timeout=20)
    for i, fut in enumerate(futs):
        assert _log(tmp_path, fut).splitlines() == [f"fd1 job{i}", f"fd2 job{i}"]


@pytest.mark.timeout(30)
def test_a_subprocess_output_goes_to_the_jobs_file(tmp_path: Path) -> None:
    with procsched.Pool(1, log_dir=str(tmp_path)) as pool:
        fut = pool.submit(runs_subprocesses, "x")
        assert fut.result(timeout=20) == 0
    lines = _log(tmp_path, fut).splitlines()
    assert lines[0] == "echo x"
    assert sorted(lines[1:]) == ["child err x", "child out x"]  # (the child buffers its stdout unless PYTHONUNBUFFERED)


@pytest.mark.timeout(30)
def test_python_output_past_the_cap_is_dropped_as_it_is_written(tmp_path: Path) -> None:
    with procsched.Pool(1, log_dir=str(tmp_path), log_bytes=CAP) as pool:
        fut = pool.submit(floods_python, 100_000)  # 1.2 MB
        size_in_job = fut.result(timeout=20)
    text = _log(tmp_path, fut)
    marker = _marker_line(text)
    assert "truncated" in marker and str(CAP) in marker
    assert size_in_job <= CAP + len(marker) + 2  # capped while the job still ran, not only after
    assert len(text.encode()) <= CAP + len(marker) + 2  # the cut, the newline ending it, the marker
    kept = text.encode()[:CAP].decode()
    assert kept == "".join(f"line {i:06d}\n" for i in range(CAP // 12 + 1))[:CAP]


@pytest.mark.timeout(30)
def test_fd_output_past_the_cap_is_cut_after_the_job(tmp_path: Path) -> None:
    with procsched.Pool(1, log_dir=str(tmp_path), log_bytes=CAP) as pool:
        big = pool.submit(floods_fd, 50 * CAP)
        mixed = pool.submit(floods_both, 5000)
        big.result(timeout=20)
        mixed.result(timeout=20)
    text = _log(tmp_path, big)
    assert text.startswith("a" * CAP)
    assert "truncated" in _marker_line(text)
    assert len(text.encode()) <= CAP + len(_marker_line(text)) + 2
    text = _log(tmp_path, mixed)
    assert text.startswith("py 000000\nfd 000000\npy 000001\n")
    assert "truncated" in _marker_line(text)
    assert len(text.encode()) <= CAP + len(_marker_line(text)) + 2
    assert text.count("truncated") == 1


@pytest.mark.timeout(30)
def test_zero_log_bytes_means_no_cap(tmp_path: Path) -> None:
    with procsched.Pool(1, log_dir=str(tmp_path), log_bytes=0) as pool:
        fut = pool.submit(floods_python, 10_000)
        assert fut.result(timeout=20) == 120_000
    assert len(_log(tmp_path, fut)) == 120_000


@pytest.mark.timeout(30)
def test_a_retried_job_appends_each_attempt_to_one_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    policy = procsched.RetryPolicy.make(retries=1, backoff=0.01)
    with procsched.Pool(2, log_dir=str(logs)) as pool:  # the directory is made for us
        fut = pool.options(retries=policy).submit(fails_first)
        assert fut.result(timeout=20) == 2
    lines = _log(logs, fut).splitlines()
    assert lines[0] == "running attempt 1"
    assert "ValueError" not in "".join(lines)  # the error goes to the future, not the log
    assert lines[-2:] == ["--- attempt 2 ---", "running attempt 2"]
    assert [p.name for p in logs.iterdir()] == [f"{fut.job_id}.log"]  # the job's id, not a run's


@pytest.mark.timeout(30)
def test_a_crashed_jobs_output_is_kept(tmp_path: Path) -> None:
    with procsched.Pool(1, log_dir=str(tmp_path), log_bytes=CAP) as pool:
        fut = pool.submit(crashes_after_output, 0)
        with pytest.raises(procsched.WorkerCrashed):
            fut.result(timeout=20)
        flood = pool.submit(crashes_after_output, 50 * CAP)  # its worker cannot cap it: the pool does
        with pytest.raises(procsched.WorkerCrashed):
            flood.result(timeout=20)
        assert pool.submit(fd_writes, "after").result(timeout=20) == "after"  # the respawned worker logs too
    assert _log(tmp_path, fut).splitlines() == ["before the crash", "fd2 before the crash"]
    text = _log(tmp_path, flood)
    assert text.startswith("before the crash\nfd2 before the crash\nccc")
    assert "truncated" in _marker_line(text)
    assert len(text.encode()) <= CAP + len(_marker_line(text)) + 2


@pytest.mark.timeout(30)
def test_the_log_can_be_read_while_the_job_runs(tmp_path: Path) -> None:
    logs, gate = tmp_path / "logs", tmp_path / "go"
    with procsched.Pool(1, log_dir=str(logs)) as pool:
        fut = pool.submit(waits_on_gate, str(gate))
        path = logs / f"{fut.job_id}.log"
        wait_for(lambda: path.exists() and path.read_text() == "started, waiting\n", what="the job's first line in its log")
        gate.touch()
        assert fut.result(timeout=20) == "done"
    assert path.read_text() == "started, waiting\ngate opened\n"


@pytest.mark.timeout(30)
def test_without_log_dir_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with procsched.Pool(2) as pool:
        assert pool.submit(prints_and_flushes, "tag").result(timeout=20) == "tag"
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()  # the workers' stdout and stderr are this process's
    assert "uncaptured tag" in out
    assert "uncaptured fd2 tag" in err


@pytest.mark.timeout(30)
def test_log_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_bytes"):
        procsched.Pool(1, log_bytes=-1)
    with pytest.raises(ValueError, match="log_bytes"):
        procsched.Pool(1, log_bytes=1.5)
    with pytest.raises(ValueError, match="log_dir"):
        procsched.Pool(1, log_dir=tmp_path)  # a str, not a Path
    blocker = tmp_path / "file"
    blocker.touch()
    with pytest.raises(OSError):
        procsched.Pool(1, log_dir=str(blocker / "logs"))  # cannot be made: the pool is not built


def test_the_shipped_settings_name_the_log_options() -> None:
    text = (Path(__file__).resolve().parent.parent / "conf" / "procsched.toml").read_text()
    assert re.search(r'^log_dir = ""\s+#', text, re.M)
    assert re.search(r"^log_bytes = 1048576\s+#", text, re.M)
