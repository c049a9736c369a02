"""The operator's commands for a running service: submit, jobs, show, cancel, logs, cron, dead, status.

``cli.py`` parses the command line (every command's options are there) and
calls :func:`run`, which connects with :func:`procsched.connect`
(``--address``, ``--token``) and hands the client to the command's function
here; that asks through the public ``Client`` API, prints, and returns the
exit code; ``run`` disconnects.

    argv -> cli's parser -> run: JSON arguments decoded (before connecting)
         -> connect -> submit(client, args, out) ... -> stdout;
         errors -> one line on stderr

A function is named by its import path (``package.module:function``) and sent
as that string: the service's worker imports it. This process never imports
the user's code to submit it (reading a result back unpickles it, as any
client does).

Output: tables and summaries by default, one JSON document with ``--json``.
Exit codes: 0 done; 1 the operation failed (unknown job or schedule, refused
request, failed job); 2 usage errors, and a service that cannot be reached;
130 interrupted.

Never touches the service's files (journal, job logs): only its socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, TextIO

from .errors import ProcschedError, RemoteError, RemoteTraceback
from .model import CANCELLED, CRASHED, FAILED, RUNNING, SUCCEEDED, TIMED_OUT
from .tables import TIMES, cell, duration, mib, table, when

if TYPE_CHECKING:
    from .client import Client
    from .futures import JobFuture

#: how often ``logs -f`` asks for more output while the job runs
LOG_POLL_S = 0.2
_ENDED = frozenset((SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, CRASHED))
_SCHEDULE_ARGS = ("name", "tz", "misfire", "overlap", "replace")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


class UsageError(Exception):
    """A command's arguments are wrong (exit 2)."""


# -- running one ------------------------------------------------------------------
def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the parsed command (``args.command_fn``) against the service; its exit code."""
    out = out or sys.stdout
    try:
        _prepare(args)
        client = _connect(args.address, args.token)
    except UsageError as e:
        return _error(str(e), 2)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    try:
        code: int = args.command_fn(client, args, out)
        out.flush()
        return code
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit-time flush does not complain
        return 0
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except KeyError as e:  # the client's "unknown job"
        return _error(str(e.args[0]) if e.args else "no such job", 1)
    except (ProcschedError, ValueError, TypeError, OSError) as e:
        return _error(str(e) or type(e).__name__, 1)
    finally:
        client.close()


def _prepare(args: argparse.Namespace) -> None:
    """Decode the JSON arguments before connecting: a typo costs no round trip."""
    if hasattr(args, "args_json"):
        args.call_args = _json_value("--args", args.args_json, list)
        args.call_kwargs = _json_value("--kwargs", args.kwargs_json, dict)
        clash = sorted(set(args.call_kwargs) & set(_SCHEDULE_ARGS)) if hasattr(args, "schedule") else []
        if clash:
            raise UsageError(f"--kwargs cannot pass {', '.join(clash)} to a scheduled function (they are the schedule's own arguments)")


def _json_value(option: str, text: str | None, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{option}: not valid JSON: {e}") from None
    if type(value) is not kind:
        raise UsageError(f"{option} must be {_JSON_TYPES[kind]} in JSON, not {_JSON_TYPES.get(type(value), 'null')}")
    return value


def _connect(address: str | None, token: str | None) -> Client:
    from .client import connect  # the journal commands and serve do without the client
    from .protocol import ProtocolError, default_address

    address = address or default_address()
    try:
        return connect(address, token=token)
    except (OSError, ValueError, ProcschedError, ProtocolError) as e:
        detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
        if detail.startswith(address + ": "):
            detail = detail[len(address) + 2 :]
        hint = " (is procsched serve running?)" if isinstance(e, (FileNotFoundError, ConnectionRefusedError)) else ""
        raise UsageError(f"cannot connect to {address}: {detail}{hint}") from None


def _error(text: str, code: int) -> int:
    print(f"procsched: {' '.join(text.split())}", file=sys.stderr)
    return code


def _dump(value: Any, out: TextIO, indent: int | None = 1) -> None:
    json.dump(value, out, indent=indent, default=_plain)
    out.write("\n")


def _plain(value: Any) -> Any:
    """What JSON cannot hold: bytes as text, sets as lists, anything else as its repr."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The job options given on the command line (the others keep their defaults)."""
    names = ("priority", "timeout", "retries", "hot", "preempt", "name", "tags", "key", "delay")
    opts = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "tags" in opts:
        opts["tags"] = tuple(opts["tags"])
    return opts


# -- jobs ---------------------------------------------------------------------------
def submit(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    fut = c.options(**_options(args)).submit(args.path, *args.call_args, **args.call_kwargs)
    return _outcome(fut, args, out)


def _outcome(fut: JobFuture, args: argparse.Namespace, out: TextIO) -> int:
    """Print the job's id, or with ``--wait`` its result; 1 if it failed."""
    job = fut.job_id
    if not args.wait:
        out.write(f"{job}\n")
        return 0
    try:
        value = fut.result()
    except KeyboardInterrupt:
        return _error(f"interrupted; job {job} goes on (procsched cancel {job} stops it)", 130)
    except CancelledError:
        return _error(f"job {job} was cancelled", 1)
    except Exception as e:
        if args.traceback and isinstance(e.__cause__, RemoteTraceback):
            sys.stderr.write(e.__cause__.tb.rstrip("\n") + "\n")
        text = str(e) if isinstance(e, RemoteError) else f"{type(e).__name__}: {e}"
        return _error(f"job {job} failed: {text}", 1)
    _dump(value, out, indent=None)
    return 0


_JOB_COLUMNS = ("job", "name", "state", "attempt", "priority", "tags", "key", "error")


def jobs(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    rows = sorted(c.jobs(args.state, args.tag, args.name), key=lambda r: int(r["job"]))
    if args.json:
        _dump(rows, out)
        return 0
    cells = []
    for r in rows:
        r = {**r, "attempt": r.get("attempt", r.get("attempts"))}
        if r.get("dead_letter"):
            r["state"] = f"{r['state']} (dead)"
        cells.append([cell(col, r.get(col)) for col in _JOB_COLUMNS])
    table(out, [col.upper() for col in _JOB_COLUMNS], cells)
    return 0


def show(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = c.show(args.job)
    if args.json:
        _dump(info, out)
    else:
        _describe(info, out)
    return 0


def _describe(info: dict[str, Any], out: TextIO) -> None:
    """A job as ``field: value`` lines, its failure history last."""
    out.write(f"job {info['job']}: {info.get('name')} ({info.get('state')})\n")
    for k, v in info.items():
        if k in ("job", "name", "state", "history"):
            continue
        if v is None or v == []:
            text = "-"
        elif isinstance(v, bool):
            text = "yes" if v else "no"
        elif k in TIMES and isinstance(v, (int, float)):
            text = when(v)
        elif isinstance(v, list):
            text = ", ".join(map(str, v))
        else:
            text = str(v)
        out.write(f"  {k}: {text}\n")
    history = info.get("history") or []
    out.write(f"  history: {'-' if not history else ''}\n")
    for entry in history:
        if len(entry) == 4:  # (attempt, kind, message, time)
            attempt, kind, message, at = entry
            out.write(f"    attempt {attempt}  {when(at)}  {kind}: {message}\n")
        else:
            out.write(f"    {entry}\n")


def cancel(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    job = args.job
    if c.cancel(job, args.kill):
        out.write(f"cancelled job {job}\n" if not args.kill else f"cancelling job {job} (a running job's worker is killed)\n")
        return 0
    state = c.show(job)["state"]  # KeyError: no such job
    if state == RUNNING:
        return _error(f"job {job} is running; --kill stops it (its worker is killed and replaced)", 1)
    if state in _ENDED:
        return _error(f"job {job} has ended ({state}): nothing to cancel", 1)
    return _error(f"job {job} could not be cancelled ({state})", 1)


def logs(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    out.flush()
    sink = out.buffer
    offset = 0
    ended = False  # an earlier answer said the job no longer runs: a read since then has it all
    try:
        while True:
            r = c.logs(args.job, offset)
            data = r["data"]
            if data:
                sink.write(data)
                sink.flush()
                offset = r["offset"]
            elif ended or not args.follow:
                return 0
            if not r["running"]:
                ended = True
            elif not data:
                time.sleep(LOG_POLL_S)
    except KeyboardInterrupt:
        return 0


# -- schedules ----------------------------------------------------------------------
def _schedule_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    given = {k: getattr(args, k) for k in ("misfire", "overlap") if getattr(args, k) is not None}
    return {"name": args.schedule, "replace": args.replace, **given, **args.call_kwargs}


def cron_add(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    kwargs = _schedule_kwargs(args)
    c.options(**_options(args)).cron(args.expr, args.path, *args.call_args, tz=args.tz, **kwargs)
    out.write(f"added schedule {args.schedule}\n")
    return 0


def cron_every(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    kwargs = _schedule_kwargs(args)
    c.options(**_options(args)).every(args.seconds, args.path, *args.call_args, **kwargs)
    out.write(f"added schedule {args.schedule}\n")
    return 0


_SCHEDULE_COLUMNS = ("name", "schedule", "next", "last", "runs", "paused", "running", "misfire", "overlap")


def cron_ls(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    rows = sorted(c.schedules(), key=lambda r: str(r["name"]))
    if args.json:
        _dump(rows, out)
        return 0
    cells = [[cell(col, r.get(col)) for col in _SCHEDULE_COLUMNS] for r in rows]
    table(out, [col.upper() for col in _SCHEDULE_COLUMNS], cells)
    return 0


def _named(done: bool, name: str, what: str, out: TextIO) -> int:
    if not done:
        return _error(f"no schedule {name}", 1)
    out.write(f"{what} schedule {name}\n")
    return 0


def cron_pause(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _named(c.pause(args.schedule), args.schedule, "paused", out)


def cron_resume(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _named(c.resume(args.schedule), args.schedule, "resumed", out)


def cron_trigger(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _named(c.trigger(args.schedule), args.schedule, "triggered", out)


def cron_rm(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _named(c.unschedule(args.schedule), args.schedule, "removed", out)


# -- dead letters -------------------------------------------------------------------
_DEAD_COLUMNS = ("job", "name", "state", "attempts", "at", "error")


def dead_ls(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    rows = sorted(c.dead_letters(), key=lambda r: int(r["job"]))
    if args.json:
        _dump(rows, out)
        return 0
    table(out, [col.upper() for col in _DEAD_COLUMNS], [[cell(col, r.get(col)) for col in _DEAD_COLUMNS] for r in rows])
    return 0


def dead_show(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    letter = next((d for d in c.dead_letters() if d["job"] == args.job), None)
    if letter is None:
        raise KeyError(f"no dead letter for job {args.job}")
    if args.json:
        _dump(letter, out)
    else:
        _describe(letter, out)
    return 0


def dead_retry(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    return _outcome(c.resubmit(args.job, **_options(args)), args, out)


def dead_purge(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    n = c.purge(args.job)
    if args.job is not None and n == 0:
        raise KeyError(f"no dead letter for job {args.job}")
    out.write(f"purged {_count_of(n, 'dead letter')}\n")
    return 0


# -- the service --------------------------------------------------------------------
_WORKER_COLUMNS = ("WORKER", "PID", "STATE", "RSS", "JOB", "NAME", "UPTIME", "DONE")


def status(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    st, stats = c.status(), c.stats()
    if args.json:
        _dump({**st, "stats": stats}, out)
        return 0
    workers = st["workers"]
    if st.get("degraded"):
        out.write("DEGRADED: workers die as they start; see the service's log\n")
    extra = ", draining" if st.get("draining") else ""
    out.write(f"{c.address}: {len(workers)} workers, {st['running']} running, queued {st['queued_hot']} hot + {st['queued_cold']} cold, "
              f"{_count_of(st.get('clients', 0), 'client')}{extra}\n")  # fmt: skip
    w, r = stats.get("wait_s") or {}, stats.get("run_s") or {}  # (None until a job has run)
    out.write(f"throughput {stats.get('throughput_per_s', 0):g} jobs/s; wait p50 {_s(w, 'p50')} p99 {_s(w, 'p99')}; "
              f"run p50 {_s(r, 'p50')} p99 {_s(r, 'p99')}\n")  # fmt: skip
    counts = ("submitted", "succeeded", "failed", "crashed", "timed_out", "cancelled", "retried", "preempted", "dead_letters")
    out.write("jobs: " + ", ".join(f"{stats.get(k, 0)} {k.replace('_', ' ')}" for k in counts) + f"; {_count_of(st.get('restarts', 0), 'worker restart')}\n")
    rows = [[str(x["index"]), cell("pid", x.get("pid")), str(x["state"]), mib(x["rss"]) if x.get("rss") else "-",
             cell("job", x.get("job")), cell("name", x.get("name")),
             duration(x["uptime_s"]) if x.get("uptime_s") is not None else "-",
             "-" if x.get("jobs_done") is None else str(x["jobs_done"])] for x in workers]  # fmt: skip
    table(out, list(_WORKER_COLUMNS), rows)
    return 0


def _count_of(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _s(percentiles: dict[str, Any], key: str) -> str:
    v = percentiles.get(key)
    return "-" if v is None else f"{v:.3g} s"
