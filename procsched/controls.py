"""The requests a caller makes of running jobs, shared by ``Pool`` and ``Client``.

Each is one ``_ask(what, *args)``: the embedded pool posts it to its
supervisor's loop, a client sends it to the service; both wait for the
answer and raise the error it carries.
"""

from __future__ import annotations

from typing import Any

from .futures import JobFuture


class Controls:
    """cancel, reprioritize, dead letters, listings and schedules, over ``_ask``."""

    def _ask(self, what: str, *args: Any) -> Any:
        raise NotImplementedError

    def cancel(self, job: JobFuture | int, kill: bool = False) -> bool:
        """Cancel a job (its future or id) that has not started; with ``kill``, also one that runs
        (its worker is killed and replaced). True if the job is, or is being, cancelled."""
        return bool(self._ask("cancel", _job_id(job), bool(kill)))

    def reprioritize(self, job: JobFuture | int, priority: int) -> bool:
        """Give a job that has not started a new priority; False if it has started or ended."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        return bool(self._ask("reprioritize", _job_id(job), priority))

    def dead_letters(self) -> list[dict[str, Any]]:
        """Jobs out of attempts after a crash or a timeout: each with its failure history."""
        return list(self._ask("dead_letters"))

    def resubmit(self, job: JobFuture | int, **options: Any) -> JobFuture:
        """Run a dead letter again as a new job, with its options changed by ``options``; it
        leaves the dead letters. ``KeyError`` if there is no dead letter for ``job``."""
        fut = self._ask("resubmit", _job_id(job), options)
        assert isinstance(fut, JobFuture)
        return fut

    def purge(self, job: JobFuture | int | None = None) -> int:
        """Forget a dead letter (or, with no argument, all of them); how many were forgotten."""
        return int(self._ask("purge", None if job is None else _job_id(job)))

    def jobs(self, state: str | None = None, tag: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """The jobs the pool holds (queued, pending, waiting, running) and its dead letters, filtered."""
        return list(self._ask("list_jobs", state, tag, name))

    def schedules(self) -> list[dict[str, Any]]:
        """The pool's schedules: name, schedule, policies, paused, last and next fire times, runs."""
        return list(self._ask("schedules"))

    def pause(self, name: str) -> bool:
        """Stop firing a schedule (its running job is left alone); False if there is none by that name."""
        return bool(self._ask("pause", name, True))

    def resume(self, name: str) -> bool:
        """Fire a paused schedule again, from now on (the paused time is not owed)."""
        return bool(self._ask("pause", name, False))

    def trigger(self, name: str) -> bool:
        """Fire a schedule now, once (its overlap policy applies), besides its regular times."""
        return bool(self._ask("trigger", name))

    def unschedule(self, name: str) -> bool:
        """Remove a schedule; False if there is none by that name."""
        return bool(self._ask("unschedule", name))


    def show(self, job: JobFuture | int) -> dict[str, Any]:
        """One job: its state, options, attempts and failure history (``KeyError`` if unknown)."""
        return dict(self._ask("show", _job_id(job)))

    def status(self) -> dict[str, Any]:
        """Workers (pid, RSS, current job, uptime), queue depth per lane, running jobs, degraded."""
        return dict(self._ask("status"))


def _job_id(job: Any) -> int:
    if isinstance(job, JobFuture):
        return job.job_id
    if isinstance(job, bool) or not isinstance(job, int):
        raise TypeError(f"expected a job's future or id, not {type(job).__name__}")
    return job
