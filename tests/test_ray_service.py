"""``procsched serve --backend ray``: the same service, clients and journal, over Ray.

The service starts a Ray of its own (``--ray-address ""``), with its session
files in a temporary directory, and stops it when it drains. A client's
jobs run there and come back; a timeout kills its task; the CLI's status
shows the backend; after SIGTERM no Ray process of the service is left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from servicectl import Service

import procsched

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def _processes_under(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def ray_temp() -> Iterator[str]:
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="psrs")  # short: Ray's socket paths live under it
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_the_service_runs_client_jobs_on_ray_and_drains(tmp_path: Path, ray_temp: str) -> None:
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_temp}
    svc = Service(tmp_path / "svc", workers=None, env=env, args=("--backend", "ray", "--ray-address", ""))
    with svc:
        with procsched.connect(svc.address) as client:
            from svcjobs import slow_square, square

            assert list(client.map(square, range(30))) == [x * x for x in range(30)]
            with pytest.raises(procsched.JobTimeout):
                client.options(timeout=0.5).submit(slow_square, 3, 30.0).result(timeout=60)
            assert client.submit(square, 9).result(timeout=60) == 81
            status = client.status()
            assert status["degraded"] is False
        assert _processes_under(ray_temp), "the service's Ray runs under the temporary directory"
        assert svc.terminate() == 0
    wait_for(lambda: not _processes_under(ray_temp), 30, "the service's Ray to stop with it")
    assert "ray_capacity" in svc.output(), "the service's log shows the cluster it ran on"
