"""The public API is typed and checked: mypy --strict over the package."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_package_passes_strict_mypy() -> None:
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", os.devnull],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


CLIENT = '''
import procsched

def work(x: int) -> int:
    return x * 2

with procsched.Pool(2) as pool:
    fut: procsched.JobFuture = pool.options(priority=1, timeout=5.0).submit(work, 1)
    policy: procsched.RetryPolicy = procsched.RetryPolicy.make(2, on=[ValueError])
    for value in pool.map(work, [1, 2]):
        print(value)
    try:
        fut.result()
    except procsched.WorkerCrashed as e:
        code: int | None = e.exitcode
'''


@pytest.mark.timeout(300)
def test_public_names_are_visible_to_a_strict_client(tmp_path: "os.PathLike[str]") -> None:
    pytest.importorskip("mypy")
    client = os.path.join(tmp_path, "client.py")
    with open(client, "w") as f:
        f.write(CLIENT)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", os.devnull, client],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
