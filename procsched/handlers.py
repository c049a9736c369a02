"""What the service does for each client request, and how it reads what clients send.

``server.py`` moves bytes: connections, frames, outcomes. This module holds
the rest of a request's meaning, run on the supervisor's loop like the
server itself: the checks a client's job spec must pass (a client is not
trusted to have run ``pool.options()``'s checks), the outcome of a job the
journal kept, and one handler per control request, each calling the loop's
own method for it (``Supervisor._asks``).
"""

from __future__ import annotations

import math
import os
import pickle
from typing import TYPE_CHECKING, Any, Callable

from . import protocol as p
from .errors import PoolError
from .futures import EncodedError, JobFuture
from .ipc import frames
from .model import DEFAULT_OPTIONS, JobOptions, RetryPolicy, make_options
from .schedule import parse_cron
from .submit import _check_key, check_schedule

if TYPE_CHECKING:
    from .server import Front

_USER_FLAGS = frames.F_FN_CACHEABLE | frames.F_THEN


def outcome(fut: JobFuture) -> p.Outcome:
    """A settled future as the client will rebuild it; the job's own bytes pass through."""
    if fut.cancelled():
        return p.Outcome(fut.job_id, p.CANCELLED)
    exc = fut._exception
    if exc is not None:
        if type(exc) is EncodedError:
            return p.Outcome(fut.job_id, p.RAISED, exc.payload)
        return p.Outcome(fut.job_id, p.ERROR, pickle.dumps(exc))  # one of procsched's own errors
    enc = fut.encoded_result()
    assert enc is not None
    return p.Outcome(fut.job_id, p.OK, enc.payload, enc.buffers)  # type: ignore[arg-type]


def stored_outcome(job_id: int, how: str, value: Any) -> p.Outcome:
    if how == "ok":
        return p.Outcome(job_id, p.OK, value.payload, value.buffers)
    if how == "raised":
        return p.Outcome(job_id, p.RAISED, value)
    if how == "cancelled":
        return p.Outcome(job_id, p.CANCELLED)
    return p.Outcome(job_id, p.ERROR, pickle.dumps(value))


def check_spec(s: p.JobSpec, pool: Any, fns: dict[int, bytes]) -> bytes:
    """Check one job a client sent; its pickled function."""
    if s.flags & ~_USER_FLAGS:
        raise ValueError(f"unknown job flags {s.flags:#x}")
    fn = s.fn if isinstance(s.fn, bytes) else fns.get(s.fn, b"")
    if not fn:
        raise ValueError("the job has no function" if isinstance(s.fn, bytes) else f"function {s.fn} was never defined on this connection")
    if s.options not in _VALID_OPTIONS:
        _check_options(s.options)
    if s.key is not None:
        _check_key(s.key)  # the same check, and message, as options(key=)
    if not math.isfinite(s.not_before):
        raise ValueError("the job's start time is not a finite number")
    if s.dep_policy not in ("cancel", "run"):
        raise ValueError(f"option 'on_failure' must be 'cancel' or 'run', not {s.dep_policy!r}")
    for dep in s.deps:
        if not pool._known(dep):
            raise ValueError(f"option 'depends_on': no job {dep} in this service")
    return fn


#: job options already checked (a batch's jobs share theirs)
_VALID_OPTIONS: set[JobOptions] = set()


def _check_options(opts: JobOptions) -> None:
    changes = {f: getattr(opts, f) for f in opts.__struct_fields__ if f != "retries"}
    make_options(DEFAULT_OPTIONS, changes)  # the same checks, and messages, as pool.options()
    r = opts.retries
    RetryPolicy.make(r.retries, backoff=r.backoff, factor=r.factor, max_backoff=r.max_backoff, jitter=r.jitter, on=r.on, crashes=r.crashes, timeouts=r.timeouts)
    if len(_VALID_OPTIONS) < 4096:
        _VALID_OPTIONS.add(opts)


# -- control requests: (front, message) -> a msgpack-able answer, on the loop ---------
def _ask(what: str, *fields: str) -> Callable[[Front, Any], Any]:
    return lambda f, m: f.sup._asks[what](*(getattr(m, name) for name in fields))


def _logs(f: Front, m: p.Logs) -> dict[str, Any]:
    if not f.log_dir:
        raise PoolError("this service does not capture job output (no log directory)")
    path = os.path.join(f.log_dir, f"{m.job}.log")
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, m.offset))
            data = fh.read(max(0, min(m.limit, f.max_frame // 2)))
    except FileNotFoundError:
        data = b""
        f.sup._show(m.job)  # KeyError for a job the service does not know
    return {"data": data, "offset": m.offset + len(data), "running": m.job in f.sup.jobs}


def _resubmit(f: Front, m: p.Resubmit) -> int:
    """A resubmitted dead letter's new job: owed to whoever watches it (the client asks next)."""
    fut = f.sup._asks["resubmit"](m.job, m.options)
    f.adopt(fut)
    f.futures[fut.job_id] = fut
    return int(fut.job_id)


def _schedule(f: Front, m: p.Schedule) -> str:
    """A schedule a client made (its call already pickled), checked as ``cron()`` checks it."""
    spec = m.spec
    check_schedule(spec.name, spec.misfire, spec.overlap)
    if spec.kind == "cron":
        parse_cron(spec.expr, spec.tz or None)
    elif spec.kind != "every" or not 0 < spec.every < float("inf"):
        raise ValueError(f"schedule {spec.name!r}: kind must be 'cron', or 'every' with a positive interval")
    if spec.options not in _VALID_OPTIONS:
        _check_options(spec.options)
    f.sup._asks["schedule"](spec, m.replace)
    return spec.name


def _compact(f: Front, m: p.Compact) -> None:
    if f.sup.rec is None:
        raise PoolError("this service has no journal")
    f.sup.rec.journal.compact()


HANDLERS: dict[type, Callable[[Front, Any], Any]] = {
    p.Cancel: _ask("cancel", "job", "kill"),
    p.Reprioritize: _ask("reprioritize", "job", "priority"),
    p.ListJobs: _ask("list_jobs", "state", "tag", "name"),
    p.Show: _ask("show", "job"),
    p.GetStats: lambda f, m: f.sup.snapshot(),
    p.Status: lambda f, m: {**f.sup._asks["status"](), "clients": len(f.conns), "draining": f.draining},
    p.Logs: _logs,
    p.DeadLetters: _ask("dead_letters"),
    p.Resubmit: _resubmit,
    p.Purge: _ask("purge", "job"),
    p.Schedules: _ask("schedules"),
    p.Unschedule: _ask("unschedule", "name"),
    p.Pause: _ask("pause", "name", "paused"),
    p.Trigger: _ask("trigger", "name"),
    p.Compact: _compact,
    p.Schedule: _schedule,
}
