"""The operator's commands (``procsched submit|jobs|show|cancel|logs|cron|dead|status``)
against a real ``procsched serve``, each run as a real ``procsched`` process.

One service for the module (starting one costs seconds); every test names
its jobs and schedules apart from the others'. The CLI runs from the
service's root directory, where the job functions (``tests/jobfns.py``) are
not importable: it sends their paths, and only the workers import them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import alive, wait_for, wait_no_leaks
from servicectl import Service

import procsched

CLI_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with Service(tmp_path_factory.mktemp("cli")) as s:
        yield s


@pytest.fixture(scope="module")
def client(svc: Service) -> Iterator[procsched.Client]:
    """The test's own view of the service, to set things up and to wait on them."""
    c = procsched.connect(svc.address, progress=False)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_leaks(svc: Service) -> Iterator[None]:
    """conftest's check, except for the module's service, which outlives the tests."""
    yield
    assert svc.proc is not None
    wait_no_leaks(keep=(svc.proc.pid,))


def cli(svc: Service, *args: str, address: bool = True) -> subprocess.CompletedProcess[str]:
    """``procsched [--address svc] args...`` from the service's root; its outcome."""
    where = ["--address", svc.address] if address else []
    return subprocess.run([sys.executable, "-m", "procsched", *where, *args], cwd=svc.root,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, env={**os.environ, "PROCSCHED_ADDRESS": svc.address})  # fmt: skip


def failed(out: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the command failed with ``code`` and one ``procsched: ...`` line on stderr; that line."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("procsched: "), out.stderr
    return lines[0]


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    return out.stdout


def test_help_lists_the_commands_and_their_options(svc: Service) -> None:
    top = ok(cli(svc, "--help"))
    for command in ("serve", "journal", "submit", "jobs", "show", "cancel", "logs", "cron", "dead", "status", "--address"):
        assert command in top
    sub = ok(cli(svc, "submit", "--help"))
    for option in ("PATH", "--args", "--kwargs", "--priority", "--timeout", "--retries", "--hot", "--preempt", "--tag", "--key", "--delay", "--wait"):
        assert option in sub


def test_submit_wait_prints_the_result_as_json(svc: Service) -> None:
    out = cli(svc, "submit", "jobfns:add", "--args", '[[1, "a"], [2.5]]', "--wait")
    assert json.loads(ok(out)) == [1, "a", 2.5]


def test_submit_prints_the_id_then_show_describes_the_job(svc: Service, client: procsched.Client) -> None:
    job = int(ok(cli(svc, "submit", "jobfns:add", "--kwargs", '{"a": 2, "b": 3}', "--name", "show-me", "--tag", "t-show", "--priority", "7")))
    wait_for(lambda: client.show(job)["state"] == "succeeded", what=f"job {job} to succeed")
    info = json.loads(ok(cli(svc, "show", str(job), "--json")))
    assert (info["job"], info["name"], info["state"]) == (job, "show-me", "succeeded")
    assert failed(cli(svc, "show", "999999"), 1) == "procsched: no job 999999"


def test_a_failing_job_with_wait_exits_1_naming_its_error(svc: Service) -> None:
    out = cli(svc, "submit", "jobfns:fail", "--args", '["kaput"]', "--wait")
    line = failed(out, 1)
    assert "ValueError: kaput" in line and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_jobs_filters_by_state_and_tag(svc: Service, client: procsched.Client) -> None:
    good = client.options(tags=("t-jobs",)).submit("jobfns:add", 1, 1)
    bad = client.options(tags=("t-jobs",)).submit("jobfns:fail", "no")
    wait_for(lambda: good.done() and bad.done(), what="both jobs to end")
    rows = json.loads(ok(cli(svc, "jobs", "--json", "--state", "failed")))
    assert bad.job_id in [r["job"] for r in rows] and good.job_id not in [r["job"] for r in rows]
    assert {r["state"] for r in rows} == {"failed"}
    table = ok(cli(svc, "jobs", "--tag", "t-jobs")).splitlines()
    assert table[0].split()[:3] == ["JOB", "NAME", "STATE"]
    assert sorted(line.split()[:3] for line in table[1:]) == sorted(
        [[str(good.job_id), "jobfns:add", "succeeded"], [str(bad.job_id), "jobfns:fail", "failed"]]
    )


def test_cancel_a_delayed_job_then_show_says_cancelled(svc: Service) -> None:
    job = ok(cli(svc, "submit", "jobfns:add", "--args", "[1, 1]", "--delay", "60")).strip()
    assert ok(cli(svc, "cancel", job)).strip() == f"cancelled job {job}"
    assert json.loads(ok(cli(svc, "show", job, "--json")))["state"] == "cancelled"


def test_logs_follow_a_running_job_to_its_end(svc: Service, client: procsched.Client, tmp_path: Path) -> None:
    fut = client.submit("jobfns:chatter", str(tmp_path), "first line", "last line")
    wait_for(lambda: (tmp_path / "started").exists(), what="the job to start")
    sink = tmp_path / "followed"
    with open(sink, "wb") as f:
        follower = subprocess.Popen([sys.executable, "-m", "procsched", "--address", svc.address, "logs", "-f", str(fut.job_id)], stdout=f, cwd=svc.root)
    try:
        wait_for(lambda: b"first line\n" in sink.read_bytes(), what="logs -f to print the first line")
        assert follower.poll() is None  # still following: the job runs
        (tmp_path / "go").touch()
        assert follower.wait(CLI_TIMEOUT) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert sink.read_bytes() == b"first line\nlast line\n"
    assert ok(cli(svc, "logs", str(fut.job_id))) == "first line\nlast line\n"


def test_cron_every_ls_trigger_rm(svc: Service, client: procsched.Client) -> None:
    assert ok(cli(svc, "cron", "every", "tick-cli", "3600", "jobfns:add", "--args", "[20, 22]", "--tag", "t-cron"))
    [row] = [r for r in json.loads(ok(cli(svc, "cron", "ls", "--json"))) if r["name"] == "tick-cli"]
    assert row["paused"] is False and row["next"] > time.time() + 3000
    ok(cli(svc, "cron", "trigger", "tick-cli"))
    fired = wait_for(lambda: client.jobs(tag="t-cron"), what="the triggered run")
    assert isinstance(fired, list) and fired[0]["name"] == "jobfns:add"
    ok(cli(svc, "cron", "rm", "tick-cli"))
    assert failed(cli(svc, "cron", "rm", "tick-cli"), 1) == "procsched: no schedule tick-cli"


def test_dead_letters_after_a_crash_list_retry_and_purge(svc: Service, client: procsched.Client) -> None:
    fut = client.options(retries=0).submit("jobfns:crash", 3)
    with pytest.raises(procsched.WorkerCrashed):
        fut.result(CLI_TIMEOUT)
    [letter] = [d for d in json.loads(ok(cli(svc, "dead", "ls", "--json"))) if d["job"] == fut.job_id]
    assert letter["state"] == "crashed" and "exit code 3" in letter["error"]
    again = int(ok(cli(svc, "dead", "retry", str(fut.job_id))))
    assert again != fut.job_id
    wait_for(lambda: [d["job"] for d in client.dead_letters()] == [again], what="the retried job to crash into the dead letters")
    assert ok(cli(svc, "dead", "purge", str(again))).strip() == "purged 1 dead letter"
    assert client.dead_letters() == []


def test_status_shows_the_workers(svc: Service) -> None:
    doc = json.loads(ok(cli(svc, "status", "--json", address=False)))  # the address from $PROCSCHED_ADDRESS
    assert len(doc["workers"]) == 2
    assert all(isinstance(w["pid"], int) and alive(w["pid"]) for w in doc["workers"])
    assert doc["degraded"] is False and "throughput_per_s" in doc["stats"]
    text = ok(cli(svc, "status"))
    assert "WORKER" in text and all(str(w["pid"]) in text for w in doc["workers"])


def test_no_service_is_exit_2_with_one_line(svc: Service, tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/absent.sock"
    out = subprocess.run([sys.executable, "-m", "procsched", "--address", address, "jobs"], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert failed(out, 2) == f"procsched: cannot connect to {address}: No such file or directory (is procsched serve running?)"


def test_bad_json_arguments_name_the_option(svc: Service, client: procsched.Client) -> None:
    assert "--args" in failed(cli(svc, "submit", "jobfns:add", "--args", "[1,", "--name", "bad-json"), 2)
    assert "--kwargs" in failed(cli(svc, "submit", "jobfns:add", "--kwargs", "[1]", "--name", "bad-json"), 2)
    assert client.jobs(name="bad-json") == []
