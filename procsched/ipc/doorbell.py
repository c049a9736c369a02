"""Doorbells: the one syscall a sleeping side of a ring needs to be woken.

A doorbell is an eventfd (a pipe where eventfd is missing). Every process
owns exactly one doorbell it sleeps on: each worker has its own, and the
supervisor has one shared by all its workers and its intake. Ringing is a
write of 8 bytes; draining is one read. Nothing here decides *when* to
ring: the ring protocol (``ring.py``) rings only when the other side said it
is going to sleep, so a busy pipeline makes no syscalls at all.

This module must stay importable in a worker: stdlib only.
"""

from __future__ import annotations

import os

_ONE = (1).to_bytes(8, "little")


class Doorbell:
    """A wakeup fd pair. ``fileno()`` is what a selector waits on."""

    __slots__ = ("read_fd", "write_fd", "_is_eventfd")

    def __init__(self, read_fd: int, write_fd: int, is_eventfd: bool) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._is_eventfd = is_eventfd

    @classmethod
    def create(cls) -> Doorbell:
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            return cls(fd, fd, True)
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        return cls(r, w, False)

    @classmethod
    def from_fds(cls, read_fd: int, write_fd: int) -> Doorbell:
        """Rebuild a doorbell from inherited fds (in a child process)."""
        return cls(read_fd, write_fd, read_fd == write_fd)

    def fds(self) -> tuple[int, ...]:
        """The distinct fds to pass to a child."""
        return (self.read_fd,) if self.read_fd == self.write_fd else (self.read_fd, self.write_fd)

    def fileno(self) -> int:
        return self.read_fd

    def ring(self) -> None:
        try:
            os.write(self.write_fd, _ONE)
        except BlockingIOError:  # a full pipe or saturated eventfd is already ringing
            pass

    def drain(self) -> None:
        """Consume pending rings so the next wait blocks until a new one."""
        try:
            if self._is_eventfd:
                os.read(self.read_fd, 8)
            else:
                while os.read(self.read_fd, 4096):
                    pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass
