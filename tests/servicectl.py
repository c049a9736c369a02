"""A real ``procsched serve`` subprocess for tests: start, wait until it answers, kill, restart.

The service runs with the tests directory on its path, so job functions
defined in test modules and in ``jobfns`` are importable by its workers, as
a user's own modules would be.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TESTS = os.path.dirname(os.path.abspath(__file__))
START_TIMEOUT = 30.0


class Service:
    """One service's settings and state directory; it may be started, killed and started again."""

    def __init__(self, root: Path, workers: int | None = 2, config: str = "", env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.socket = str(root / "s.sock")
        self.address = "unix://" + self.socket
        self.state = root / "state"
        self.workers = workers
        self.config_path = ""
        if config:
            self.config_path = str(root / "procsched.toml")
            Path(self.config_path).write_text(config)
        self.env = env or {}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "serve.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "procsched", "serve", "--socket", self.socket, "--state-dir", str(self.state),
               "--log-format", "json", "--log-level", "info", *self.args]  # fmt: skip
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return cmd

    def start(self, wait: bool = True) -> Service:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])), **self.env}
        out = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        finally:
            out.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the socket accepts a connection (the service listens only once it has replayed)."""
        end = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"procsched serve exited with {self.proc.returncode}:\n{self.output()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket)
                return
            except OSError:
                pass
            finally:
                s.close()
            if time.monotonic() > end:
                raise AssertionError(f"procsched serve did not listen within {timeout} s:\n{self.output()}")
            time.sleep(0.01)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the service (its workers die with it: they watch their parent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM: the service drains and exits; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.terminate(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
