"""The error tree: one base, small named leaves, each formatting its own message.

Everything a job's future can raise besides the job's own exception is a
:class:`ProcschedError`. A job's own exception is re-raised as itself (its
class unpickled on the caller's side) with the remote traceback as
``__cause__``; when its class cannot be unpickled there, a
:class:`RemoteError` carries its type name, message and traceback as strings.

Stdlib only: workers import this module.
"""

from __future__ import annotations

from .fastpickle import PicklingError

TYPE_CHECKING = False  # typing costs a worker ~8 ms at boot; annotations are strings anyway
if TYPE_CHECKING:
    import signal
    from typing import Any


class ProcschedError(Exception):
    """Base of every error procsched raises on its own account."""


class PoolError(ProcschedError):
    """The pool cannot do what was asked (shut down, misconfigured, ...)."""


class SerializationError(ProcschedError, PicklingError):
    """A call, result or exception could not be pickled or unpickled."""


class RemoteTraceback(Exception):
    """The traceback of a job's exception, as the worker printed it."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class JobFailed(ProcschedError):
    """Base of the failures that are about one job, not the pool."""


class RemoteError(JobFailed):
    """A job raised an exception whose class could not be rebuilt here."""

    def __init__(self, type_name: str, message: str, tb: str = "") -> None:
        super().__init__(type_name, message, tb)
        self.type_name = type_name
        self.message = message
        self.tb = tb

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


def describe_exit(exitcode: int | None) -> str:
    """'exit code 3' or 'signal SIGSEGV' for a ``Popen.returncode``-style value."""
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        sig = _signal_of(exitcode)
        return f"signal {sig.name if sig is not None else -exitcode}"
    return f"exit code {exitcode}"


def _signal_of(exitcode: int) -> signal.Signals | None:
    # (signal is imported here, in the supervisor's process: its enum costs a worker's boot ~5 ms)
    import signal

    try:
        return signal.Signals(-exitcode)
    except ValueError:
        return None


_LIKELY = {
    "SIGSEGV": "a segmentation fault in native code",
    "SIGKILL": "killed from outside, possibly by the OOM killer",
    "SIGBUS": "a bus error (bad memory access, or /dev/shm full)",
    "SIGABRT": "an abort() in native code",
}


class WorkerCrashed(JobFailed):
    """The worker process running the job died before reporting an outcome."""

    def __init__(self, exitcode: int | None, pid: int = 0, job: str = "") -> None:
        super().__init__(exitcode, pid, job)
        self.exitcode = exitcode
        self.pid = pid
        self.job = job
        self.signal: signal.Signals | None = _signal_of(exitcode) if exitcode is not None and exitcode < 0 else None

    def for_job(self, job: str) -> WorkerCrashed:
        """Name the job it cost (also in ``args``, so a pickled copy keeps it)."""
        self.job = job
        self.args = (*self.args[:-1], job)
        return self

    @property
    def signal_name(self) -> str | None:
        return self.signal.name if self.signal is not None else None

    def __str__(self) -> str:
        what = f"job {self.job}" if self.job else "the job"
        hint = _LIKELY.get(self.signal.name) if self.signal is not None else None
        tail = f"; likely {hint}" if hint else ""
        return f"worker {self.pid} running {what} died with {describe_exit(self.exitcode)}{tail}"


class WorkerLost(WorkerCrashed):
    """The executor running the job was lost, where no exit status can be known (a Ray
    worker or node that died, a task killed from outside); ``detail`` says what was seen."""

    def __init__(self, detail: str, job: str = "") -> None:
        super().__init__(None, 0, job)
        self.args = (detail, job)
        self.detail = detail

    def __str__(self) -> str:
        what = f"job {self.job}" if self.job else "the job"
        return f"the worker running {what} was lost: {self.detail}"


class MemoryLimitExceeded(WorkerCrashed):
    """The worker passed its hard memory cap while running the job and was killed."""

    def __init__(self, rss: int, limit: int, pid: int = 0, job: str = "") -> None:
        super().__init__(-9, pid, job)  # SIGKILL (9 on every platform)
        self.args = (rss, limit, pid, job)
        self.rss = rss
        self.limit = limit

    def __str__(self) -> str:
        what = f"job {self.job}" if self.job else "the job"
        return (
            f"worker {self.pid} running {what} used {self.rss // 2**20} MiB, over its hard "
            f"memory limit of {self.limit // 2**20} MiB, and was killed"
        )


class JobTimeout(JobFailed, TimeoutError):
    """The job ran past its timeout; its worker was killed and replaced."""

    def __init__(self, timeout: float, job: str = "") -> None:
        super().__init__(timeout, job)
        self.timeout = timeout
        self.job = job

    def __str__(self) -> str:
        what = f"job {self.job}" if self.job else "the job"
        return f"{what} ran past its timeout of {self.timeout:g} s and was killed"


class Preempted(ProcschedError):
    """Raised inside a cold job by ``checkpoint()`` when a hot job needs its worker.

    Let it propagate: the worker catches it, hands ``state`` back to the
    supervisor and the job is re-queued to resume from it later.
    """

    def __init__(self, state: Any = None) -> None:
        super().__init__(state)
        self.state = state


def rebuild(exc: BaseException, tb: str) -> BaseException:
    """Attach a remote traceback to a job's exception, as its ``__cause__``."""
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc
