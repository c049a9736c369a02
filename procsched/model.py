"""The data model: pool configuration, job options and retry policies.

Small frozen msgspec Structs, validated once where the user hands them in,
with errors that name the option. They evolve by appending fields with
defaults. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, Union

import msgspec

Preempt = Literal["cooperative", "kill"]
#: a job's idempotency key
Key = Union[str, int]

# A job's states (the supervisor's and the journal's)
QUEUED, PENDING, RUNNING = "queued", "pending", "running"
SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, CRASHED = "succeeded", "failed", "cancelled", "timed_out", "crashed"


def type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How often and when a failed job runs again.

    ``retries`` re-runs after the first attempt; the n-th retry waits
    ``min(backoff * factor ** (n - 1), max_backoff)`` seconds, spread by
    ``± jitter`` (a fraction). ``on`` lists the exception types that are
    retried (by qualified name, matched against the exception's class and
    its bases, so the supervisor never needs the class itself); a crashed
    worker is retried when ``crashes`` is true, a timeout when ``timeouts`` is.
    """

    retries: int = 0
    backoff: float = 0.1
    factor: float = 2.0
    max_backoff: float = 60.0
    jitter: float = 0.1
    on: tuple[str, ...] = ("builtins.Exception",)
    crashes: bool = True
    timeouts: bool = True

    @classmethod
    def make(
        cls,
        retries: int = 0,
        *,
        backoff: float = 0.1,
        factor: float = 2.0,
        max_backoff: float = 60.0,
        jitter: float = 0.1,
        on: type[BaseException] | str | Iterable[type[BaseException] | str] = (Exception,),
        crashes: bool = True,
        timeouts: bool = True,
    ) -> RetryPolicy:
        _int("retries", retries, 0)
        _num("backoff", backoff, 0)
        _num("factor", factor, 1)
        _num("max_backoff", max_backoff, 0)
        _num("jitter", jitter, 0, 1)
        for flag, value in (("crashes", crashes), ("timeouts", timeouts)):
            if not isinstance(value, bool):  # bool("no") would be True
                raise TypeError(f"retry option {flag!r} must be a bool, not {type(value).__name__}")
        names = []
        if not isinstance(on, (type, str)) and not hasattr(on, "__iter__"):
            raise TypeError(f"retry option 'on' takes exception classes, not {on!r}")
        for t in (on,) if isinstance(on, (type, str)) else on:
            if isinstance(t, str):
                names.append(t)
            elif isinstance(t, type) and issubclass(t, BaseException):
                names.append(type_name(t))
            else:
                raise TypeError(f"retry option 'on' takes exception classes, not {t!r}")
        return cls(
            retries=retries,
            backoff=float(backoff),
            factor=float(factor),
            max_backoff=float(max_backoff),
            jitter=float(jitter),
            on=tuple(names),
            crashes=bool(crashes),
            timeouts=bool(timeouts),
        )


NO_RETRY = RetryPolicy()


class JobOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Per-job options, set through ``pool.options(...)``."""

    priority: int = 0
    hot: bool = False
    #: seconds from when a free worker is handed the job (unpickling included) to its kill
    timeout: float | None = None
    retries: RetryPolicy = NO_RETRY
    preempt: Preempt = "cooperative"
    name: str | None = None
    tags: tuple[str, ...] = ()


DEFAULT_OPTIONS = JobOptions()
_OPTION_NAMES = frozenset(JobOptions.__struct_fields__)


def _int(name: str, v: Any, lo: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"option {name!r} must be an int, not {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"option {name!r} must be >= {lo}, not {v}")


def _num(name: str, v: Any, lo: float | None = None, hi: float | None = None, strict: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"option {name!r} must be a number, not {type(v).__name__}")
    if not math.isfinite(v) or (lo is not None and (v <= lo if strict else v < lo)) or (hi is not None and v > hi):
        bound = f"> {lo}" if strict else f">= {lo}"
        rng = f"{bound} and <= {hi}" if hi is not None else bound
        raise ValueError(f"option {name!r} must be a finite number {rng}, not {v}")


def make_options(base: JobOptions, changes: dict[str, Any]) -> JobOptions:
    """``base`` with ``changes`` applied; ``TypeError``/``ValueError`` name the bad option."""
    unknown = set(changes) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(_OPTION_NAMES))})")
    out = dict(changes)
    if "priority" in out:
        _int("priority", out["priority"])
    if "hot" in out and not isinstance(out["hot"], bool):
        raise TypeError(f"option 'hot' must be a bool, not {type(out['hot']).__name__}")
    if out.get("timeout") is not None:
        _num("timeout", out["timeout"], 0, strict=True)
        out["timeout"] = float(out["timeout"])
    if "retries" in out:
        r = out["retries"]
        if isinstance(r, RetryPolicy):
            pass
        elif isinstance(r, int) and not isinstance(r, bool):
            out["retries"] = RetryPolicy.make(r)
        else:
            raise TypeError(f"option 'retries' must be an int or a RetryPolicy, not {type(r).__name__}")
    if "preempt" in out and out["preempt"] not in ("cooperative", "kill"):
        raise ValueError(f"option 'preempt' must be 'cooperative' or 'kill', not {out['preempt']!r}")
    if out.get("name") is not None and not isinstance(out["name"], str):
        raise TypeError(f"option 'name' must be a str, not {type(out['name']).__name__}")
    if "tags" in out:
        given = out["tags"]
        try:  # a tuple first: all() would exhaust a generator before tuple() saw it
            tags = None if isinstance(given, str) else tuple(given)
        except TypeError:
            tags = None
        if tags is None or not all(isinstance(t, str) for t in tags):
            raise TypeError(f"option 'tags' must be an iterable of str, not {given!r:.60}")
        out["tags"] = tags
    return msgspec.structs.replace(base, **out)


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a pool runs; every field has a working default."""

    max_workers: int = 1
    #: bytes of each direction of a worker's ring; larger frames go out of band
    ring_bytes: int = 1 << 20
    #: keep about this much work (seconds, at the measured job duration) queued per worker
    prefetch_s: float = 0.005
    #: and never more than this many jobs beyond the running one
    max_prefetch: int = 256
    #: SIGTERM to SIGKILL, when a worker is killed
    kill_grace: float = 0.5
    #: first respawn delay after a worker died at boot; doubles per failure up to the max
    respawn_backoff: float = 0.1
    respawn_backoff_max: float = 5.0
    #: a worker is replaced after this many jobs (0: never)
    max_tasks_per_child: int = 0
    #: soft cap (bytes of RSS): a worker over it after a job is replaced (0: none)
    max_memory: int = 0
    #: hard cap (bytes of RSS): a worker over it during a job is killed (0: none)
    max_memory_hard: int = 0
    memory_check_interval: float = 0.1
    #: priority points a queued job gains per second of waiting (0: no aging)
    aging_rate: float = 0.1
    #: seconds a cold job with preempt="kill" has to yield before it is killed
    preempt_grace: float = 1.0
    #: how long shutdown waits for workers to exit before SIGKILL
    stop_timeout: float = 5.0
    #: a directory (created if missing) where each job's stdout and stderr go, to ``<job id>.log``,
    #: every attempt appended ("": no capture, a job's output goes to the pool's own stdout/stderr)
    log_dir: str = ""
    #: bytes a job's log keeps at most; later output is dropped, and a last line says so (0: no cap)
    log_bytes: int = 1 << 20
    #: seconds an idle worker watches its ring before it sleeps, yielding the CPU meanwhile: a
    #: job sent in that time starts without a wake-up (0: sleep at once)
    idle_spin: float = 0.0002


FsyncPolicy = Literal["always", "interval", "never"]


class JournalConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where and how a pool journals its jobs (``Pool(journal=...)``)."""

    #: the journal's directory (created if missing)
    path: str
    #: "always": a submit returns, and a future resolves, only once its record is on disk;
    #: "interval": records are fsynced every ``fsync_interval`` seconds; "never": left to the OS
    fsync: FsyncPolicy = "interval"
    fsync_interval: float = 0.05
    #: a new segment is started past this size
    segment_bytes: int = 64 << 20
    #: compact when more than this fraction of the journal is history...
    compact_dead_fraction: float = 0.5
    #: ...and it has grown past this many bytes
    compact_min_bytes: int = 4 << 20
    #: finished jobs kept (results and errors), newest first; -1: no limit
    keep_results: int = 100_000
    #: seconds a finished job is kept (0: no limit)
    result_ttl: float = 7 * 24 * 3600.0
    #: also drop a result as soon as its future has been read
    drop_fetched: bool = False
    #: results larger than this (bytes) go to their own file under spill/
    spill_bytes: int = 1 << 20
    #: skip damaged records before the tail instead of refusing to open
    salvage: bool = False
