"""The ``procsched`` command line: the parser, ``serve``, and the journal commands.

``procsched serve`` runs the service (:mod:`procsched.service`). The commands
that talk to a running service (submit, jobs, show, cancel, logs, cron, dead,
status) are parsed here, with their options and help, and run by
:mod:`procsched.commands`.

``procsched journal inspect|verify|compact PATH`` looks after a journal:

* ``inspect`` lists its jobs (state, attempts, times, error summaries) as a
  table, or as JSON with ``--json``; it reads without taking the lock, so it
  works on a journal a running pool holds;
* ``verify`` checks every frame's checksum and says where any damage is;
  the exit code is 0 when the journal is intact and 1 when it is not;
* ``compact`` rewrites it as its live state (it must not be in use).

Errors go to stderr as one line, ``procsched: <reason>``; usage errors and
journal errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import commands
from .journal import Journal, JournalCorrupt, JournalError
from .journal.state import describe
from .model import CANCELLED, CRASHED, FAILED, PENDING, QUEUED, RUNNING, SUCCEEDED, TIMED_OUT, JournalConfig
from .schedule import MISFIRE_POLICIES
from .schedules import OVERLAP_POLICIES
from .tables import cell, table

if TYPE_CHECKING:
    from .client import Client

#: a service command's function in ``commands``: (client, args, stdout) -> exit code
Handler = Callable[["Client", argparse.Namespace, TextIO], int]

_COLUMNS = ("job", "key", "name", "state", "attempt", "submitted", "finished", "error")
_STATES = (QUEUED, PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, CRASHED, "dead")


_EPILOG = """\
examples:
  procsched serve --workers 8
  procsched submit mypkg.tasks:resize --args '["in.png", 256]' --wait
  procsched jobs --state running
  procsched logs -f 42
  procsched cron add nightly '0 3 * * *' mypkg.tasks:cleanup --tz Europe/Berlin
  procsched status

'procsched COMMAND --help' describes each command."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr with exit code 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"procsched: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="procsched", description="procsched: a worker pool for CPU-bound Python jobs, as a service.",
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _connection_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the service (under systemd, or in a terminal)")
    serve.add_argument("--config", help="settings file (default: $PROCSCHED_CONFIG; none: defaults)")
    serve.add_argument("--socket", help="Unix socket path (default: <runtime dir>/procsched.sock)")
    serve.add_argument("--tcp", help="also listen on host:port (needs a token)")
    serve.add_argument("--state-dir", dest="state_dir", help="journal, spilled results and job logs")
    serve.add_argument("--workers", type=int, help="worker processes (default: the CPU count)")
    serve.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", dest="log_format", choices=("auto", "console", "json"))
    serve.add_argument("--metrics", help="serve Prometheus metrics on host:port")
    serve.add_argument("--backend", choices=("local", "ray"), help="what runs the jobs (default: local worker processes)")
    serve.add_argument("--ray-address", dest="ray_address", help="with --backend ray: the cluster (default: auto)")
    journal = sub.add_parser("journal", help="inspect, verify or compact a journal")
    jsub = journal.add_subparsers(dest="action", required=True)
    inspect = jsub.add_parser("inspect", help="list the jobs a journal holds")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    inspect.add_argument("--state", help="only jobs in this state (queued, running, succeeded, failed, ...)")
    verify = jsub.add_parser("verify", help="check checksums; exit 1 on damage")
    verify.add_argument("path")
    compact = jsub.add_parser("compact", help="rewrite the journal as its live state")
    compact.add_argument("path")
    compact.add_argument("--salvage", action="store_true", help="drop damaged records instead of refusing (they are lost)")
    _service_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .service import serve as run

        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "address", "token")}
        return run(args.config, **flags)
    if args.command != "journal":
        return commands.run(args)
    try:
        return _ACTIONS[args.action](args, sys.stdout)
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit-time flush does not complain
        return 0
    except (JournalError, OSError) as e:
        print(f"procsched: {e}", file=sys.stderr)
        return 2


# -- the service's commands (run by procsched.commands) ------------------------------
def _service_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """The commands that talk to a running service; each parser names its function in ``commands``."""
    conn = argparse.ArgumentParser(add_help=False)
    _connection_options(conn, argparse.SUPPRESS)  # also after the command (the top-level one holds the default)
    fmt = argparse.RawDescriptionHelpFormatter

    def command(parent: Any, name: str, handler: Handler, summary: str, description: str = "") -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=summary, description=description or summary, parents=[conn], formatter_class=fmt)
        p.set_defaults(command_fn=handler)
        return p

    p = command(sub, "submit", commands.submit, "submit a job: a function by import path", _SUBMIT_DOC)
    p.add_argument("path", metavar="PATH", type=_import_path, help="the function, as package.module:function")
    _call_arguments(p)
    _job_options(p, once=True)
    _wait_options(p)

    p = command(sub, "jobs", commands.jobs, "list jobs: live, dead letters, and finished ones the journal keeps")
    p.add_argument("--state", choices=_STATES, help="only jobs in this state ('dead': the dead letters)")
    p.add_argument("--tag", help="only jobs with this tag")
    p.add_argument("--name", help="only jobs of this name (by default a job's name is its function's path)")
    _json_option(p)

    p = command(sub, "show", commands.show, "one job: state, options, attempts and failure history")
    p.add_argument("job", metavar="JOB", type=_job_id, help="the job's id")
    _json_option(p)

    p = command(sub, "cancel", commands.cancel, "cancel a job that has not started (with --kill, also a running one)")
    p.add_argument("job", metavar="JOB", type=_job_id, help="the job's id")
    p.add_argument("--kill", action="store_true", help="also stop it if it runs: its worker is killed and replaced")

    p = command(sub, "logs", commands.logs, "print a job's captured stdout and stderr", _LOGS_DOC)
    p.add_argument("job", metavar="JOB", type=_job_id, help="the job's id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends (Ctrl-C stops, exit 0)")

    cron = sub.add_parser("cron", help="recurring jobs: add, every, ls, pause, resume, trigger, rm", description="Schedules the service fires as jobs.")
    csub = cron.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(csub, "add", commands.cron_add, "run a function on a cron schedule", _CRON_DOC)
    p.add_argument("schedule", metavar="NAME", help="the schedule's name (unique in the service)")
    p.add_argument("expr", metavar="EXPR", help="cron expression: 5 fields, or 6 with seconds last, e.g. '0 3 * * *'")
    p.add_argument("path", metavar="PATH", type=_import_path, help="the function, as package.module:function")
    p.add_argument("--tz", help="IANA time zone the expression is read in, e.g. Europe/Berlin (default: UTC)")
    _schedule_options(p, "run_once")
    p = command(csub, "every", commands.cron_every, "run a function every SECONDS seconds, from now")
    p.add_argument("schedule", metavar="NAME", help="the schedule's name (unique in the service)")
    p.add_argument("seconds", metavar="SECONDS", type=_positive, help="the interval")
    p.add_argument("path", metavar="PATH", type=_import_path, help="the function, as package.module:function")
    _schedule_options(p, "skip")
    p = command(csub, "ls", commands.cron_ls, "list the schedules: next and last fire times, runs, paused")
    _json_option(p)
    for name, handler, text in (
        ("pause", commands.cron_pause, "stop firing a schedule (a job it started runs on)"),
        ("resume", commands.cron_resume, "fire a paused schedule again, from now on"),
        ("trigger", commands.cron_trigger, "fire a schedule once now, besides its regular times"),
        ("rm", commands.cron_rm, "remove a schedule"),
    ):
        p = command(csub, name, handler, text)
        p.add_argument("schedule", metavar="NAME", help="the schedule's name")

    dead = sub.add_parser("dead", help="dead letters: jobs out of attempts after a crash or timeout", description="Dead letters: jobs out of attempts after a crash or a timeout, with their failure history.")
    dsub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(dsub, "ls", commands.dead_ls, "list the dead letters")
    _json_option(p)
    p = command(dsub, "show", commands.dead_show, "one dead letter with its failure history")
    p.add_argument("job", metavar="JOB", type=_job_id, help="the job's id")
    _json_option(p)
    p = command(dsub, "retry", commands.dead_retry, "run a dead letter again as a new job (options change it); prints the new id")
    p.add_argument("job", metavar="JOB", type=_job_id, help="the dead letter's job id")
    _job_options(p, once=False)
    _wait_options(p)
    p = command(dsub, "purge", commands.dead_purge, "forget a dead letter, or all of them")
    p.add_argument("job", metavar="JOB", type=_job_id, nargs="?", help="the dead letter's job id (default: all)")

    p = command(sub, "status", commands.status, "the service's workers (pid, RSS, job, uptime), queues, throughput")
    _json_option(p)


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--address`` and ``--token``: before the command (default None) and after it (SUPPRESS, so
    that, not given there, they leave the top-level value alone)."""
    parser.add_argument("--address", default=default, help="the service: unix:///path, a socket path, or tcp://host:port "
                        "(default: $PROCSCHED_ADDRESS, else the service's default socket)")  # fmt: skip
    parser.add_argument("--token", default=default, help="the service's token, for TCP (default: $PROCSCHED_TOKEN; better than this option, which ps shows)")


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")


def _call_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--args", dest="args_json", metavar="JSON", help="positional arguments, a JSON array: '[1, \"a\"]'")
    p.add_argument("--kwargs", dest="kwargs_json", metavar="JSON", help="keyword arguments, a JSON object: '{\"n\": 3}'")


def _job_options(p: argparse.ArgumentParser, once: bool) -> None:
    g = p.add_argument_group("job options")
    g.add_argument("--priority", type=int, metavar="N", help="higher runs first (default 0)")
    g.add_argument("--timeout", type=_positive, metavar="S", help="kill the job after it has run S seconds")
    g.add_argument("--retries", type=_count, metavar="N", help="run again up to N times after an exception, a crash or a timeout (default 0)")
    g.add_argument("--hot", action="store_true", default=None, help="the hot lane: ahead of every cold job, which it may preempt")
    g.add_argument("--preempt", choices=("cooperative", "kill"), help="how it yields its worker to a hot job (default cooperative)")
    g.add_argument("--name", metavar="NAME", help="the job's name in listings (default: its function's path)")
    g.add_argument("--tag", dest="tags", action="append", metavar="T", help="a tag to filter on (repeatable)")
    if once:
        g.add_argument("--key", metavar="K", help="idempotency key: a job with this key queued, running or (with a journal) succeeded is not run again")
        g.add_argument("--delay", type=_seconds, metavar="S", help="start no earlier than S seconds from now")


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the outcome and print the result as JSON (exit 1 if the job fails)")
    p.add_argument("--traceback", action="store_true", help="with --wait: print a failed job's remote traceback too")


def _schedule_options(p: argparse.ArgumentParser, misfire: str) -> None:
    _call_arguments(p)
    p.add_argument("--misfire", choices=MISFIRE_POLICIES, help=f"what missed fire times (a stall, downtime) owe (default {misfire})")
    p.add_argument("--overlap", choices=OVERLAP_POLICIES, help="a fire time while the previous run goes on (default skip)")
    p.add_argument("--replace", action="store_true", help="replace a schedule of this name instead of refusing")
    _job_options(p, once=False)


def _import_path(text: str) -> str:
    module, sep, name = text.partition(":")
    if not sep or not all(part.isidentifier() for part in (*module.split("."), *name.split("."))):
        raise argparse.ArgumentTypeError(f"{text!r} is not a function's import path (expected package.module:function)")
    return text


def _job_id(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (a positive integer)")
    return int(text)


def _number(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _positive(text: str) -> float:
    return _number(text, lambda v: 0 < v < float("inf"), "a positive number of seconds")


def _seconds(text: str) -> float:
    return _number(text, lambda v: 0 <= v < float("inf"), "a number of seconds >= 0")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (an integer >= 0)")
    return int(text)


_SUBMIT_DOC = """\
Submit PATH(*ARGS, **KWARGS) to the service and print the job's id (with
--wait, its result as JSON). The service's workers import PATH; it must be
importable where the service runs.

example:
  procsched submit mypkg.tasks:resize --args '["in.png", 256]' --priority 5 --wait"""

_LOGS_DOC = """\
Print what a job wrote to stdout and stderr, as the service captured it
(raw bytes). With -f, keep following while the job is queued or runs."""

_CRON_DOC = """\
Fire PATH(*ARGS, **KWARGS) as a job at each time of a cron expression.

example:
  procsched cron add nightly '0 3 * * *' mypkg.tasks:cleanup --tz Europe/Berlin --timeout 600"""



# -- the journal ----------------------------------------------------------------------
def _open(path: str, readonly: bool, salvage: bool = True) -> Journal:
    """Reading salvages (to show all of it); rewriting does only when asked, as it loses the damage for good."""
    if not os.path.isdir(path):
        raise JournalError(f"no journal at {path}")
    return Journal(JournalConfig(path=path, fsync="never", salvage=salvage), readonly=readonly)


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    j = _open(args.path, readonly=True)
    rows = [describe(e) for e in sorted(j.state.jobs.values(), key=lambda e: e.job)]
    if args.state:
        rows = [row for row in rows if row["state"] == args.state]
    if args.json:
        doc = {"path": j.path, "bytes": j.total_bytes, "summary": j.state.summary(), "damage": [d._asdict() for d in j.damage], "jobs": rows}
        json.dump(doc, out, indent=1)
        out.write("\n")
        return 0
    s = j.state.summary()
    states = ", ".join(f"{n} {k}" for k, n in sorted(s["by_state"].items())) or "no jobs"
    out.write(f"{j.path}: {s['jobs']} jobs ({states}), {j.total_bytes} bytes in {len(j.segments)} segment(s)\n")
    for d in j.damage:
        out.write(f"damage: {d.kind} at {d.path}:{d.offset}: {d.detail}\n")
    table(out, [c.upper() for c in _COLUMNS], [[cell(col, row[col]) for col in _COLUMNS] for row in rows])
    return 0


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    try:
        j = _open(args.path, readonly=True)
    except JournalCorrupt as e:  # damage salvage cannot step over (a segment's header)
        out.write(f"{e.path}: corrupt at byte offset {e.offset}: {e}\n")
        return 1
    if not j.damage:
        out.write(f"{j.path}: intact ({len(j.segments)} segment(s), {j.total_bytes} bytes, {len(j.state.jobs)} jobs)\n")
        return 0
    for d in j.damage:
        what = "torn tail" if d.kind == "torn" else "corrupt records"
        out.write(f"{d.path}: {what} at byte offset {d.offset} ({d.resumed - d.offset} bytes): {d.detail}\n")
    return 1


def _compact(args: argparse.Namespace, out: TextIO) -> int:
    j = _open(args.path, readonly=False, salvage=args.salvage)
    try:
        before, after = j.compact()
    finally:
        j.close()
    out.write(f"{j.path}: {before} bytes -> {after} bytes ({len(j.state.jobs)} jobs kept)\n")
    return 0


_ACTIONS = {"inspect": _inspect, "verify": _verify, "compact": _compact}


if __name__ == "__main__":
    sys.exit(main())
