"""Per-job output capture: a job's stdout and stderr to ``<log_dir>/<job id>.log``.

Used in a worker (``worker.py``) when the pool's ``log_dir`` is set. For a
job's duration, :meth:`JobLog.begin` points fds 1 and 2 at the job's file
(``dup2``), so that what C code, ``os.write(1, ...)`` and subprocesses write
lands there, and swaps ``sys.stdout`` / ``sys.stderr`` for line-buffered
streams that count what they write against the cap. :meth:`JobLog.end`
flushes them, puts everything back and caps the file (:func:`cap_file`):
C-level writes cannot be counted as they happen, so they are cut after the
job. A job whose worker died is capped by the backend when it reaps the
worker (``backends/local.py``).

The file is opened for appending, so every attempt of a job adds to it
(after a ``--- attempt N ---`` line), and it is written as the job goes, so
it can be followed while the job runs. The cap is the file's: at most
``log_bytes`` of output, then one line that says the rest was dropped.

It never touches the worker's channel or the job's result. Stdlib only:
workers import this module.
"""

from __future__ import annotations

import io
import os
import sys

TYPE_CHECKING = False  # typing costs a worker ~8 ms at boot; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Any, TextIO

_NO_CAP = float("inf")
_OPEN = os.O_RDWR | os.O_CREAT | os.O_APPEND  # read too: capping reads the byte before the cut


def log_path(directory: str, job: int) -> str:
    return os.path.join(directory, f"{job}.log")


def _marker(cap: int) -> bytes:
    return f"--- output truncated: a job's log keeps {cap} bytes ---\n".encode()


def cap_file(fd: int, cap: int, sealed: bool = False) -> None:
    """Keep the first ``cap`` bytes of the file open on ``fd`` (read-write, appending), then the marker line.

    ``sealed``: output was dropped already, so the marker belongs there even
    if the file is no longer than ``cap``. Idempotent: a file that ends at
    the marker after ``cap`` bytes is left as it is. ``cap`` 0: no cap.
    """
    if cap <= 0:
        return
    size = os.fstat(fd).st_size
    if size < cap or (size == cap and not sealed):
        return
    mark = _marker(cap)
    if size > cap:
        if size - cap <= len(mark) + 1 and os.pread(fd, size - cap, cap) in (mark, b"\n" + mark):
            return
        os.ftruncate(fd, cap)
    last = os.pread(fd, 1, cap - 1)
    _write_all(fd, mark if last in (b"\n", b"") else b"\n" + mark)


def cap_path(path: str, cap: int) -> None:
    """:func:`cap_file` by name (a job whose worker died before it could); a missing file is fine."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except OSError:
        return
    try:
        cap_file(fd, cap)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Sink(io.BufferedIOBase):
    """The byte layer under a job's ``sys.stdout`` or ``sys.stderr``: writes through to fd 1 or 2, within the cap."""

    def __init__(self, log: JobLog, fd: int) -> None:
        super().__init__()
        self._log = log
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        return self._log.write(self._fd, data)


class JobLog:
    """Where a worker's jobs write; one per worker, :meth:`begin` and :meth:`end` around each job."""

    def __init__(self, directory: str, cap: int) -> None:
        self.prefix = os.path.join(directory, "")  # a job's log is this plus "<id>.log"
        self.cap = cap
        self.fd = -1  # the running job's file
        self.room: float = _NO_CAP  # bytes the running job may still write through sys.stdout/stderr
        self.sealed = False  # the running job's output hit the cap
        self.saved: tuple[Any, Any] = (None, None)  # sys.stdout and sys.stderr before the job
        for fd in (1, 2):  # a worker started with fd 1 or 2 closed: /dev/null there, so a log never takes its number
            try:
                os.fstat(fd)
            except OSError:
                null = os.open(os.devnull, os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
        self.keep = (os.dup(1), os.dup(2))  # the worker's own stdout and stderr, to restore after each job
        self.out = self._stream(1)
        self.err = self._stream(2)

    def _stream(self, fd: int) -> TextIO:
        """A job's ``sys.stdout`` or ``sys.stderr``: line-buffered, so a log can be followed line by line."""
        like = sys.__stdout__ if fd == 1 else sys.__stderr__  # encoding as the worker's own; unbuffered if it is
        encoding = getattr(like, "encoding", None) or "utf-8"
        errors = getattr(like, "errors", None) or "backslashreplace"
        write_through = fd == 2 or bool(getattr(like, "write_through", False))
        sink: Any = _Sink(self, fd)  # (a write-only buffer: the stubs want a readable one)
        return io.TextIOWrapper(sink, encoding, errors, line_buffering=True, write_through=write_through)

    def begin(self, job: int, attempt: int) -> None:
        """Send the output of the job about to run to its file.

        If the file cannot be opened, the job runs all the same, its output
        uncaptured, and the worker's stderr says why.
        """
        out, err = sys.stdout, sys.stderr
        _flush(out)  # what the worker itself buffered is not the job's
        _flush(err)
        try:
            fd = os.open(f"{self.prefix}{job}.log", _OPEN, 0o644)
        except OSError as e:
            os.write(2, f"procsched worker {os.getpid()}: job {job}'s output is not captured: {e}\n".encode())
            return
        size = os.lseek(fd, 0, os.SEEK_END)
        self.fd = fd
        self.room = max(0, self.cap - size) if self.cap else _NO_CAP
        self.sealed = False
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if self.out.closed:  # a job closed them: fresh ones
            self.out = self._stream(1)
        if self.err.closed:
            self.err = self._stream(2)
        self.saved = (out, err)
        sys.stdout, sys.stderr = self.out, self.err
        if size or attempt > 1:
            self.write(1, f"--- attempt {attempt} ---\n".encode())

    def end(self) -> None:
        """Flush the job's output, give the worker its stdout and stderr back, cap the file."""
        fd = self.fd
        if fd < 0:
            return
        # Ours, theirs (a job may have replaced them), and the originals (a
        # handler made before the job holds them): all of it is the job's output.
        out, err = sys.stdout, sys.stderr
        _flush(self.out)
        _flush(self.err)
        if out is not self.out:
            _flush(out)
        if err is not self.err:
            _flush(err)
        _flush(sys.__stdout__)
        _flush(sys.__stderr__)
        sys.stdout, sys.stderr = self.saved
        self.saved = (None, None)
        os.dup2(self.keep[0], 1)
        os.dup2(self.keep[1], 2)
        self.fd, self.room = -1, _NO_CAP
        try:
            if self.sealed or (self.cap and os.lseek(fd, 0, os.SEEK_END) > self.cap):  # C-level output went past it
                cap_file(fd, self.cap, self.sealed)
        except OSError:  # (a full disk): the log is the worse for it, the job's outcome is not
            pass
        finally:
            os.close(fd)

    def write(self, fd: int, data: Any) -> int:
        """Write ``data`` to ``fd`` as far as the cap allows; the rest is dropped (and said to be, once)."""
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        n = len(data)
        room = self.room
        if n <= room:
            self.room = room - n
            _write_all(fd, data)
            return n
        if self.sealed:
            return n
        if room > 0:
            _write_all(fd, data[: int(room)])
        self.room, self.sealed = 0, True
        if self.fd >= 0:
            cap_file(self.fd, self.cap, sealed=True)
        return n


def _flush(stream: Any) -> None:
    if stream is not None:
        try:
            stream.flush()
        except Exception:  # closed, or a broken replacement: nothing more to keep
            pass
