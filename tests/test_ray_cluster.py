"""A real two-node Ray cluster on this machine, and a node that dies mid-batch.

``ray start --head`` and a second ``ray start --address=127.0.0.1:PORT``
joining it, each in a session of its own, so the test can SIGKILL the
second node's whole process tree (raylet, agents, workers) and, at the end,
both nodes, without touching any other Ray on the machine (``ray stop``
would stop them all). The head's health checks are tightened so the dead
node leaves the cluster's CPU count within a couple of seconds.

The batch is spread over both nodes; once a job is seen running on the
second node, the node is killed. Every job must still finish: the run lost
with the node is a crash, retried by procsched's policy on the head.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import children, wait_for

import procsched
from procsched import backends

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

WAIT = 60.0
_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "500"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One ``ray start``, in a session of its own: ``kill()`` takes its daemons (the session's
    process group) and everything they started (Ray's workers may leave the group)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        with open(log, "wb") as out:
            proc = subprocess.Popen([ray_cli, "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            rc = proc.wait(timeout=120)
        if rc != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed ({rc}):\n{log.read_text()[-3000:]}")
        self.pgid = proc.pid  # the session's daemons keep its process group

    def processes(self) -> set[int]:
        found = {pid for pid in _pids() if _pgid(pid) == self.pgid}
        todo = list(found)
        while todo:
            for child in children(todo.pop()):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def kill(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def alive(self) -> bool:
        return bool(self.processes())


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, Node]]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="psrc")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **_HEALTH}
    port = _free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    nodes: list[Node] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # the driver's side must agree with the nodes'
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        try:
            head_args = ["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}", f"--temp-dir={temp}"]
            nodes.append(Node(head_args + common, env, tmp_path / "head.log"))
            nodes.append(Node([f"--address=127.0.0.1:{port}", *common], env, tmp_path / "node.log"))
            yield f"127.0.0.1:{port}", nodes[1]
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for node in nodes:
                node.kill()
            for node in nodes:
                wait_for(lambda n=node: not n.alive(), 30, "the node's processes to exit")  # type: ignore[misc]
            shutil.rmtree(temp, ignore_errors=True)


def where(i: int, started: str, seconds: float) -> tuple[int, str]:
    """Note the node this runs on, run a while, return (i, node id)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    with open(os.path.join(started, f"{i}.{node}.{os.getpid()}"), "w"):
        pass
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))
    return i, node


def test_a_batch_spread_over_two_nodes_finishes_when_one_dies(cluster: tuple[str, Node], tmp_path: Path) -> None:
    import ray

    address, second = cluster
    started = tmp_path / "started"
    started.mkdir()
    with procsched.Pool(backend=backends.Ray(address=address, spread=True)) as pool:
        assert pool.max_workers == 2, "one CPU on each node"
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        head = next(nid for nid, n in nodes.items() if "node:__internal_head__" in n["Resources"])
        other = next(nid for nid in nodes if nid != head)
        futs = [pool.options(retries=2).submit(where, i, str(started), 1.0) for i in range(12)]
        wait_for(lambda: any(other in p.name for p in started.iterdir()), WAIT, "a job to start on the second node")
        second.kill()
        results = [f.result(timeout=WAIT) for f in futs]
        stats = pool.stats()
    assert sorted(i for i, _ in results) == list(range(12)), "every job finished"
    ran_on = {node for _, node in results}
    assert head in ran_on
    starts = [p.name.split(".") for p in started.iterdir()]
    assert any(node == other for _, node, _ in starts), "the batch was spread over both nodes"
    assert stats["retried"] >= 1 and stats["restarts"] >= 1, "the run lost with the node was a crash, and retried"
    assert all(node == head for i, node in results if sum(1 for s in starts if s[0] == str(i)) > 1), "a rerun job finished on the head"
