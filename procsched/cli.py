"""The ``procsched`` command line.

``procsched journal inspect|verify|compact PATH`` looks after a journal:

* ``inspect`` lists its jobs (state, attempts, times, error summaries) as a
  table, or as JSON with ``--json``; it reads without taking the lock, so it
  works on a journal a running pool holds;
* ``verify`` checks every frame's checksum and says where any damage is;
  the exit code is 0 when the journal is intact and 1 when it is not;
* ``compact`` rewrites it as its live state (it must not be in use).

Errors go to stderr as one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from .journal import Journal, JournalCorrupt, JournalError
from .journal.state import describe
from .model import JournalConfig

_COLUMNS = ("job", "key", "name", "state", "attempt", "submitted", "finished", "error")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="procsched", description="procsched: a worker pool for CPU-bound Python jobs")
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = parser.parse_args(argv)
    try:
        return _ACTIONS[args.action](args, sys.stdout)
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the exit-time flush does not complain
        return 0
    except (JournalError, OSError) as e:
        print(f"procsched: {e}", file=sys.stderr)
        return 2


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
    table = [[_cell(col, row[col]) for col in _COLUMNS] for row in rows]
    _table(out, [c.upper() for c in _COLUMNS], table)
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


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("submitted", "finished"):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    text = " ".join(str(value).split())  # one line per row: newlines and tabs become spaces
    return text if len(text) <= 60 else text[:57] + "..."


def _table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
