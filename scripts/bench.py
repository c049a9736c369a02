"""Benchmark procsched against its peers, side by side, in one run.

    python scripts/bench.py                  # full run (3 repeats, 2 workers)
    python scripts/bench.py --quick          # smoke run: small sizes, 1 repeat
    python scripts/bench.py --only 1,5 --peers ppe,procsched --json out.json

Peers: ``ppe`` (concurrent.futures.ProcessPoolExecutor), ``mp``
(multiprocessing.Pool), ``loky`` (get_reusable_executor), ``pebble``
(ProcessPool; skipped with a note when not installed) and ``procsched``
(procsched.Pool). All use ``--workers`` workers (default 2) and their
default start method (fork for the stdlib pools and pebble on Linux; loky
and procsched start fresh interpreters).

Every (peer, row) measurement runs in its own fresh subprocess (this script
with ``--one PEER ROW``), which prints one JSON line. The subprocess has a
hard time limit: past it, its whole process group is killed and the cell
reads n/a. Each measurement is repeated ``--repeat`` times (default 3) and
the table shows the median. Unless a row says otherwise, the pool is warmed
up first (every worker has run a job) and the timed region is the row's work
only. Job functions are defined at module level, and the subprocess imports
this file as the module ``bench``; the jobs live in ``benchjobs.py``, a
module that imports almost nothing, so every peer pickles them by
reference and a fresh worker's import of them is cheap.

Rows:

 1 submit     20k no-op jobs, one submit each (mp.Pool: apply_async, pebble:
              schedule); all submitted, then all results awaited. jobs/s.
 2 map        20k no-op items through map with the peer's default chunksize
              (ProcessPoolExecutor, loky, pebble: 1; mp.Pool and procsched:
              about four chunks per worker). items/s.
 3 map-256    the same with chunksize=256. items/s.
 4 cpu        2,000 jobs of ~1 ms of pure-Python CPU, one submit each.
              efficiency = 2000 * cost / (wall * workers), where cost is the
              job's CPU time measured once in the parent. 1.0 = no overhead;
              frequency scaling with all cores busy also costs a little.
 5 latency    sequential round trips (submit, wait, repeat), 2,000 after 200
              of warm-up: p50 and p99 in µs.
 6 arg-64M    a 64 MiB numpy array as the argument, a tiny result. MB/s
              (1 MB = 1e6 bytes) over the submit -> result time; median of 5
              rounds after one warm-up round.
 7 result-64M the job creates (np.ones) and returns a 64 MiB array: MB/s of
              submit -> result, allocation included.
 8 cold       constructing the executor (library already imported) to the
              first no-op result, in a fresh process. ms.
 9 crash      a job SIGKILLs its own worker: ms from submit to its future
              failing. The note says what was raised and whether the pool
              still runs jobs afterwards. mp.Pool never fails the job: after
              a bounded wait the cell reads n/a with the note 'hang'.
10 timeout    a job sleeps 10 s under a 0.2 s per-job timeout: ms from the
              deadline (submit + 0.2 s) to the future failing. Only pebble and
              procsched have per-job timeouts; the others are n/a.

Floor rows (their own subprocess, no pool; what the OS and pickling cost):

f1 pipe       os.pipe ping-pong of one byte between two processes: p50 µs.
f2 conn       multiprocessing.Connection echo of a small tuple: throughput
              with 64 messages in flight (msgs/s) and sequential p50 (µs).

Journal rows (procsched alone; scripts/bench_journal.py has more):

j1 journal    no-op submits without a journal and with fsync="interval"
              (jobs/s, and their ratio; target >= 0.8), a keyed map with
              fsync="always" (jobs/s through group commit; target >= 10,000),
              this disk's fsync p50, journal bytes written per no-op job.
j2 replay     opening a journal of 1,000,000 records (s; target <= 3) and
              reopening it after compaction (s; target <= 0.5).

Scheduling rows (procsched alone):

s1 timers     1,000 jobs delayed by 0.05-1 s at random: how late each starts
              (ms, its wall-clock start in the worker minus its due time).
s2 graphs     10,000 no-op jobs each depending on the one before, and 10,000
              fanning into one job: jobs/s.

Reading the table: each cell is the median, followed for every peer but
ProcessPoolExecutor by ``xR``, its ratio to ProcessPoolExecutor, oriented
so that R > 1 always means better than ProcessPoolExecutor (rate / PPE rate
for throughput and efficiency, PPE time / time for latencies and times).
A ``*`` means some repeats failed (see the notes under the table).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

now = time.perf_counter
RESULT_TAG = "@@bench-result "

FULL = dict(
    n_submit=20_000, n_map=20_000, chunk=256, n_cpu=2_000, lat_rounds=2_000, lat_warmup=200,
    array_mib=64, array_rounds=5, hang_after=3.0, timeout_s=0.2, sleep_s=10.0,
    floor_rounds=5_000, replay_records=1_000_000, n_timers=1_000, n_chain=10_000, limit=120.0,
)
QUICK = dict(FULL, n_submit=2_000, n_map=5_000, n_cpu=200, lat_rounds=300, lat_warmup=50,
             array_rounds=2, floor_rounds=1_000, replay_records=100_000, n_timers=200, n_chain=1_000, limit=60.0)


# -- jobs: module level in benchjobs.py, so every peer pickles them by reference -----

from benchjobs import crash, make_array, nbytes_of, noop, pause, spin  # noqa: E402


# -- peer adapters -------------------------------------------------------------------

class Unsupported(Exception):
    """The peer has no way to do what the row measures."""


class Peer:
    """How one library makes a pool, submits, maps, waits and shuts down.

    The default methods are the ``concurrent.futures.Executor`` ones.
    """

    key = label = module = ""
    entry = ""  # the pool class; resolved now, since some libraries load it on first access
    timeouts = False  # per-job timeouts

    def __init__(self) -> None:
        self.lib = importlib.import_module(self.module)  # imported outside every timed region
        if self.entry:
            getattr(self.lib, self.entry)

    def make(self, workers: int) -> Any:
        raise NotImplementedError

    def submit(self, ex: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return ex.submit(fn, *args)

    def submit_timeout(self, ex: Any, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        raise Unsupported("no per-job timeout")

    def map(self, ex: Any, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> Any:
        return ex.map(fn, items) if chunksize is None else ex.map(fn, items, chunksize=chunksize)

    def wait(self, h: Any, timeout: float) -> bool:
        return bool(cf.wait([h], timeout).done)

    def result(self, h: Any) -> Any:
        return h.result()

    def close(self, ex: Any, force: bool) -> None:
        ex.shutdown(wait=True, cancel_futures=force)


class PPEPeer(Peer):
    key, label, module = "ppe", "ProcessPoolExecutor", "concurrent.futures"
    entry = "ProcessPoolExecutor"

    def make(self, workers: int) -> Any:
        return self.lib.ProcessPoolExecutor(max_workers=workers)


class MPPeer(Peer):
    key, label, module = "mp", "mp.Pool", "multiprocessing"

    def make(self, workers: int) -> Any:
        return self.lib.Pool(workers)

    def submit(self, ex: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return ex.apply_async(fn, args)

    def map(self, ex: Any, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> Any:
        return ex.map(fn, items, chunksize)

    def wait(self, h: Any, timeout: float) -> bool:
        h.wait(timeout)
        return bool(h.ready())

    def result(self, h: Any) -> Any:
        return h.get()

    def close(self, ex: Any, force: bool) -> None:
        ex.terminate() if force else ex.close()
        ex.join()


class LokyPeer(Peer):
    key, label, module = "loky", "loky", "loky"

    def make(self, workers: int) -> Any:
        return self.lib.get_reusable_executor(max_workers=workers)

    def close(self, ex: Any, force: bool) -> None:
        ex.shutdown(wait=True, kill_workers=force)


class PebblePeer(Peer):
    key, label, module = "pebble", "pebble", "pebble"
    timeouts = True

    def make(self, workers: int) -> Any:
        return self.lib.ProcessPool(max_workers=workers)

    def submit(self, ex: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return ex.schedule(fn, args=args)

    def submit_timeout(self, ex: Any, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        return ex.schedule(fn, args=args, timeout=timeout)

    def map(self, ex: Any, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> Any:
        return super().map(ex, fn, items, chunksize).result()

    def close(self, ex: Any, force: bool) -> None:
        ex.stop() if force else ex.close()
        ex.join()


class ProcschedPeer(Peer):
    key, label, module = "procsched", "procsched", "procsched"
    entry = "Pool"
    timeouts = True

    def make(self, workers: int) -> Any:
        return self.lib.Pool(max_workers=workers)

    def submit_timeout(self, ex: Any, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
        return ex.options(timeout=timeout).submit(fn, *args)

    def close(self, ex: Any, force: bool) -> None:
        ex.terminate() if force else ex.shutdown(wait=True)


PEERS: dict[str, type[Peer]] = {p.key: p for p in (PPEPeer, MPPeer, LokyPeer, PebblePeer, ProcschedPeer)}
BASELINE = "ppe"


# -- helpers for the rows --------------------------------------------------------------

CLOSE_LIMIT = 4.0  # seconds a pool's shutdown may take before the cell gets a note
CLEANUP_PROBLEMS: list[str] = []


def close(peer: Peer, ex: Any, force: bool) -> None:
    """``peer.close`` with a bound: a shutdown that hangs is noted, not waited for."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            peer.close(ex, force)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run, name="bench-close", daemon=True)
    t.start()
    t.join(CLOSE_LIMIT)
    what = "terminate" if force else "shutdown"
    if t.is_alive():
        CLEANUP_PROBLEMS.append(f"{what} did not return within {CLOSE_LIMIT:g} s")
    elif errors:
        CLEANUP_PROBLEMS.append(f"{what} raised {type(errors[0]).__name__}: {errors[0]}")


@contextmanager
def executor(peer: Peer, cfg: SimpleNamespace, force: bool = False) -> Any:
    """A warmed-up pool of ``peer``, closed on the way out (forcibly after an error)."""
    ex = peer.make(cfg.workers)
    ok = False
    try:
        warm_up(peer, ex, cfg.workers)
        yield ex
        ok = True
    finally:
        close(peer, ex, force=force or not ok)


def warm_up(peer: Peer, ex: Any, workers: int, budget: float = 10.0) -> None:
    """Until every worker has run a job (or ``budget`` s), then 100 no-ops."""
    end, pids = now() + budget, set[int]()
    while len(pids) < workers and now() < end:
        pids.update(peer.result(h) for h in [peer.submit(ex, pause, 0.05) for _ in range(2 * workers)])
    for h in [peer.submit(ex, noop, i) for i in range(100)]:
        peer.result(h)


def run_all(peer: Peer, ex: Any, fn: Callable[..., Any], args: Iterable[Any]) -> tuple[float, list[Any]]:
    """Submit ``fn(a)`` for each ``a``, then await every result: (seconds, results)."""
    t0 = now()
    hs = [peer.submit(ex, fn, a) for a in args]
    out = [peer.result(h) for h in hs]
    return now() - t0, out


def percentiles_us(samples: list[float], *ps: int) -> list[float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return [cuts[p - 1] * 1e6 for p in ps]


def failure(peer: Peer, h: Any) -> BaseException | None:
    try:
        peer.result(h)
    except BaseException as e:  # noqa: BLE001 - whatever the peer raises is the measurement
        return e
    return None


def still_works(peer: Peer, ex: Any, wait: float = 5.0) -> str:
    try:
        h = peer.submit(ex, noop, 7)
        if not peer.wait(h, wait):
            return "pool stuck afterwards"
        peer.result(h)
    except Exception as e:  # noqa: BLE001
        return f"pool broken afterwards ({type(e).__name__})"
    return "pool still works"


def time_failure(peer: Peer, cfg: SimpleNamespace, start: Callable[[Any], Any], late: float) -> dict[str, Any]:
    """Time from ``start(ex)`` (a submit) to the job's future failing, minus ``late``."""
    with executor(peer, cfg, force=True) as ex:
        t0 = now()
        h = start(ex)
        if not peer.wait(h, late + cfg.hang_after):
            return {"note": f"hang: no failure {cfg.hang_after:g} s after the expected time"}
        dt = now() - t0
        exc = failure(peer, h)
        after = still_works(peer, ex)
    what = "no exception (!)" if exc is None else type(exc).__name__
    return {"ms": (dt - late) * 1e3, "note": f"{what}; {after}"}


def array_rate(peer: Peer, cfg: SimpleNamespace, fn: Callable[..., Any], arg: Any, nbytes: int) -> float:
    times = []
    with executor(peer, cfg) as ex:
        for _ in range(1 + cfg.array_rounds):
            t0 = now()
            out = peer.result(peer.submit(ex, fn, arg))
            times.append(now() - t0)
            got = out if isinstance(out, int) else out.nbytes
            del out
            if got != nbytes:
                raise AssertionError(f"wrong result: {got} bytes, expected {nbytes}")
    return nbytes / 1e6 / statistics.median(times[1:])


def check(out: list[Any], n: int) -> None:
    if out != list(range(n)):
        raise AssertionError("wrong or out-of-order results")


# -- rows: each returns {metric: value, "note": str (optional)} ------------------------

def row_submit(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    with executor(peer, cfg) as ex:
        dt, out = run_all(peer, ex, noop, range(cfg.n_submit))
    check(out, cfg.n_submit)
    return {"rate": cfg.n_submit / dt}


def _map_rate(peer: Peer, cfg: SimpleNamespace, chunksize: int | None) -> dict[str, Any]:
    with executor(peer, cfg) as ex:
        t0 = now()
        out = list(peer.map(ex, noop, range(cfg.n_map), chunksize))
        dt = now() - t0
    check(out, cfg.n_map)
    return {"rate": cfg.n_map / dt}


def row_map_default(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    return _map_rate(peer, cfg, None)


def row_map_tuned(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    return _map_rate(peer, cfg, cfg.chunk)


def row_cpu(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    with executor(peer, cfg) as ex:
        dt, out = run_all(peer, ex, spin, [cfg.spin_n] * cfg.n_cpu)
    if out != [spin(cfg.spin_n)] * cfg.n_cpu:
        raise AssertionError("wrong results")
    return {"eff": cfg.n_cpu * cfg.spin_cost / (dt * cfg.workers)}


def row_latency(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    lat = []
    with executor(peer, cfg) as ex:
        for i in range(cfg.lat_warmup + cfg.lat_rounds):
            t0 = now()
            peer.result(peer.submit(ex, noop, i))
            lat.append(now() - t0)
    p50, p99 = percentiles_us(lat[cfg.lat_warmup :], 50, 99)
    return {"p50": p50, "p99": p99}


def row_array_arg(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    import numpy as np

    a = np.ones(cfg.array_mib * 2**20 // 8)
    return {"rate": array_rate(peer, cfg, nbytes_of, a, a.nbytes)}


def row_array_result(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    nbytes = cfg.array_mib * 2**20
    return {"rate": array_rate(peer, cfg, make_array, nbytes, nbytes)}


def row_cold(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    t0 = now()
    ex = peer.make(cfg.workers)
    ok = False
    try:
        peer.result(peer.submit(ex, noop, 1))
        dt = now() - t0
        ok = True
    finally:
        close(peer, ex, force=not ok)
    return {"ms": dt * 1e3}


def row_crash(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    return time_failure(peer, cfg, lambda ex: peer.submit(ex, crash), 0.0)


def row_timeout(peer: Peer, cfg: SimpleNamespace) -> dict[str, Any]:
    if not peer.timeouts:
        raise Unsupported("no per-job timeout")

    def start(ex: Any) -> Any:
        return peer.submit_timeout(ex, cfg.timeout_s, pause, cfg.sleep_s)

    return time_failure(peer, cfg, start, cfg.timeout_s)


# -- journal rows: procsched alone (scripts/bench_journal.py has the pieces) --------------

JOURNAL = "journal (procsched only; ratios within the row):"


def journal_throughput(cfg: SimpleNamespace) -> dict[str, Any]:
    import bench_journal as bj

    base = tempfile.mkdtemp(prefix="procsched-bench-")
    try:
        path = os.path.join(base, "j")
        none = bj.submit_rate(None, cfg.n_submit, cfg.workers)[0]
        interval, per_job = bj.submit_rate(bj.JournalConfig(path=path), cfg.n_submit, cfg.workers)
        always = bj.always_batch(bj.JournalConfig(path=path + "a", fsync="always"), cfg.n_submit, cfg.workers)
        p50, _ = bj.fsync_latency(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"none": none, "interval": interval, "ratio": interval / none, "always": always, "fsync": p50, "bytes": per_job}


def journal_replay(cfg: SimpleNamespace) -> dict[str, Any]:
    import bench_journal as bj

    base = tempfile.mkdtemp(prefix="procsched-bench-")
    try:
        path = os.path.join(base, "j")
        bj.build_journal(path, cfg.replay_records)
        replay, _ = bj.replay(path)
        j = bj.Journal(bj.JournalConfig(path=path))
        j.compact()
        j.close()
        reopen, _ = bj.replay(path)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"replay": replay, "reopen": reopen}


# -- scheduling rows: procsched alone ----------------------------------------------------

SCHEDULING = "scheduling (procsched only):"


def sched_timers(cfg: SimpleNamespace) -> dict[str, Any]:
    """Lateness of delayed jobs: start (wall clock, in the worker) minus the time they were due."""
    import random

    import procsched
    from benchjobs import wall_clock

    rng = random.Random(7)
    with procsched.Pool(cfg.workers) as pool:
        list(pool.map(noop, range(200)))
        jobs = []
        for _ in range(cfg.n_timers):
            delay = rng.uniform(0.05, 1.0)
            jobs.append((time.time() + delay, pool.options(delay=delay).submit(wall_clock)))
        late = [f.result() - due for due, f in jobs]
    p50, p99 = percentiles_us(late, 50, 99)
    return {"p50": p50 / 1000, "p99": p99 / 1000}


def sched_graphs(cfg: SimpleNamespace) -> dict[str, Any]:
    """A chain of jobs, each waiting for the one before, and a wide fan-in: jobs/s."""
    import procsched

    with procsched.Pool(cfg.workers) as pool:
        list(pool.map(noop, range(200)))
        t = now()
        prev = pool.submit(noop, 0)
        for i in range(cfg.n_chain - 1):
            prev = pool.options(depends_on=[prev]).submit(noop, i)
        prev.result()
        chain = cfg.n_chain / (now() - t)
        t = now()
        parts = [pool.submit(noop, i) for i in range(cfg.n_chain)]
        pool.options(depends_on=parts).submit(noop, 0).result()
        fan_in = (cfg.n_chain + 1) / (now() - t)
    return {"chain": chain, "fan_in": fan_in}


# -- floor rows: no pool, just the OS and pickling ---------------------------------------

def _echo(conn: Any) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(msg)


def floor_pipe(cfg: SimpleNamespace) -> dict[str, Any]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: echo bytes until EOF
        try:
            os.close(w1)
            os.close(r2)
            while b := os.read(r1, 1):
                os.write(w2, b)
        finally:
            os._exit(0)
    os.close(r1)
    os.close(w2)
    lat = []
    for _ in range(cfg.lat_warmup + cfg.floor_rounds):
        t0 = now()
        os.write(w1, b"x")
        os.read(r2, 1)
        lat.append(now() - t0)
    os.close(w1)
    os.waitpid(pid, 0)
    os.close(r2)
    (p50,) = percentiles_us(lat[cfg.lat_warmup :], 50)
    return {"p50": p50}


def floor_conn(cfg: SimpleNamespace) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(theirs,))
    proc.start()
    theirs.close()
    msg = (12345, "noop", (1, 2.5), None)
    try:
        lat = []
        for _ in range(cfg.lat_warmup + cfg.floor_rounds):
            t0 = now()
            mine.send(msg)
            mine.recv()
            lat.append(now() - t0)
        window, batches = 64, max(1, 4 * cfg.floor_rounds // 64)
        t0 = now()
        for _ in range(batches):
            for _ in range(window):
                mine.send(msg)
            for _ in range(window):
                mine.recv()
        rate = window * batches / (now() - t0)
    finally:
        mine.send(None)
        proc.join(5)
    (p50,) = percentiles_us(lat[cfg.lat_warmup :], 50)
    return {"rate": rate, "p50": p50}


# -- the table of rows ----------------------------------------------------------------------

HIGHER, LOWER = True, False


@dataclass(frozen=True)
class Metric:
    key: str  # the key in the row function's result
    label: str
    unit: str
    higher_is_better: bool


@dataclass(frozen=True)
class Row:
    id: str
    fn: Callable[..., dict[str, Any]]
    metrics: tuple[Metric, ...]
    floor: bool = False  # runs once, without a peer
    heading: str = "floor (no pool):"  # where a floor row is listed


ROWS: dict[str, Row] = {r.id: r for r in (
    Row("1", row_submit, (Metric("rate", "no-op, submit each", "jobs/s", HIGHER),)),
    Row("2", row_map_default, (Metric("rate", "no-op map, default chunks", "items/s", HIGHER),)),
    Row("3", row_map_tuned, (Metric("rate", "no-op map, chunksize=256", "items/s", HIGHER),)),
    Row("4", row_cpu, (Metric("eff", "1 ms CPU jobs, efficiency", "fraction", HIGHER),)),
    Row("5", row_latency, (Metric("p50", "round trip p50", "µs", LOWER), Metric("p99", "round trip p99", "µs", LOWER))),
    Row("6", row_array_arg, (Metric("rate", "64 MiB numpy argument", "MB/s", HIGHER),)),
    Row("7", row_array_result, (Metric("rate", "64 MiB numpy result", "MB/s", HIGHER),)),
    Row("8", row_cold, (Metric("ms", "cold start to 1st result", "ms", LOWER),)),
    Row("9", row_crash, (Metric("ms", "crashed job fails after", "ms", LOWER),)),
    Row("10", row_timeout, (Metric("ms", "timeout fails, past deadline", "ms", LOWER),)),
    Row("f1", floor_pipe, (Metric("p50", "os.pipe ping-pong p50", "µs", LOWER),), floor=True),
    Row("f2", floor_conn, (Metric("rate", "Connection echo, 64 in flight", "msgs/s", HIGHER),
                           Metric("p50", "Connection echo p50", "µs", LOWER)), floor=True),
    Row("j1", journal_throughput, (
        Metric("none", "no-op submits, no journal", "jobs/s", HIGHER),
        Metric("interval", "no-op submits, fsync=interval", "jobs/s", HIGHER),
        Metric("ratio", "fsync=interval / no journal", "ratio", HIGHER),
        Metric("always", "keyed map, fsync=always", "jobs/s", HIGHER),
        Metric("fsync", "fsync of this disk, p50", "µs", LOWER),
        Metric("bytes", "journal bytes per no-op job", "bytes", LOWER)), floor=True, heading=JOURNAL),
    Row("s1", sched_timers, (
        Metric("p50", "delayed job lateness p50", "ms", LOWER),
        Metric("p99", "delayed job lateness p99", "ms", LOWER)), floor=True, heading=SCHEDULING),
    Row("s2", sched_graphs, (
        Metric("chain", "10k-job dependency chain", "jobs/s", HIGHER),
        Metric("fan_in", "10k jobs fanning into one", "jobs/s", HIGHER)), floor=True, heading=SCHEDULING),
    Row("j2", journal_replay, (
        Metric("replay", "replay of 1M records", "s", LOWER),
        Metric("reopen", "reopen after compaction", "s", LOWER)), floor=True, heading=JOURNAL),
)}


# -- the child: one measurement ---------------------------------------------------------------

def child_main(peer_key: str, row_id: str, cfg_json: str) -> int:
    import faulthandler

    cfg = SimpleNamespace(**json.loads(cfg_json))
    faulthandler.dump_traceback_later(max(1.0, cfg.limit - 2), exit=False)  # where it hung, if it does
    row = ROWS[row_id]
    out: dict[str, Any]
    try:
        out = row.fn(cfg) if row.floor else row.fn(PEERS[peer_key](), cfg)
    except Unsupported as e:
        out = {"note": f"unsupported: {e}", "unsupported": True}
    except Exception as e:  # noqa: BLE001 - reported as this cell's error
        out = {"error": f"{type(e).__name__}: {e}"[:300]}
    faulthandler.cancel_dump_traceback_later()
    if CLEANUP_PROBLEMS:
        out["note"] = "; ".join(filter(None, [out.get("note"), *CLEANUP_PROBLEMS]))
    print(RESULT_TAG + json.dumps(out), flush=True)
    if CLEANUP_PROBLEMS:  # a pool that would not shut down: leave it to the parent to kill
        sys.stderr.flush()
        os._exit(0)
    return 0


# -- the parent: run every child, aggregate, print ---------------------------------------------

def _live_members(pgid: int) -> list[int]:
    """Pids of the (non-zombie) processes in process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_child(peer: str, row: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh process (its own process group) under a hard limit."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", peer, row, "--cfg", json.dumps(cfg)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = now()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        res: dict[str, Any] = {}
        try:
            proc.wait(timeout=cfg["limit"])
        except subprocess.TimeoutExpired:
            res = {"error": f"killed after the {cfg['limit']:g} s limit", "hard_timeout": True}
        finally:
            if _live_members(proc.pid):  # the child itself, or workers it left behind
                time.sleep(0.3)
                if _live_members(proc.pid) and not res:
                    res["leak"] = "processes left behind, killed"
                _kill_group(proc.pid)
            proc.wait()
        elapsed = now() - t0
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith(RESULT_TAG)]
        stderr_tail = err.read()[-3000:]
    if lines and "hard_timeout" not in res:
        res = {**json.loads(lines[-1][len(RESULT_TAG) :]), **res}
    elif not res:
        res = {"error": f"no result (exit code {proc.returncode})"}
    if "error" in res:
        res["stderr"] = stderr_tail
    res["seconds"] = round(elapsed, 2)
    return res


def spin_cost(n: int, batches: int = 7, calls: int = 30) -> float:
    """CPU seconds of one ``spin(n)``: the median over batches of calls."""
    per_call = []
    for _ in range(batches):
        t0 = time.process_time()
        for _ in range(calls):
            spin(n)
        per_call.append((time.process_time() - t0) / calls)
    return statistics.median(per_call)


def calibrate_spin(target_s: float = 1e-3) -> tuple[int, float]:
    """Loop count for a ~1 ms ``spin`` job, and its CPU cost per call."""
    n = 20_000
    for _ in range(3):  # the cost is linear in n: a few rescalings converge
        n = max(1, round(n * target_s / spin_cost(n, batches=3)))
    return n, spin_cost(n)


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    failed: int = 0
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def note_lines(self) -> list[str]:
        runs = len(self.values) + self.failed
        return [n if k == runs else f"{n} ({k} of {runs} runs)" for n, k in sorted(self.notes.items())]


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    return f"{v:,.0f}" if a >= 1000 else f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def ratio(m: Metric, v: float | None, base: float | None) -> float | None:
    if v is None or base is None or v <= 0 or base <= 0:
        return None
    return v / base if m.higher_is_better else base / v


def render(headers: list[str], rows: list[list[str]]) -> str:
    """Columns: three left-aligned labels, then right-aligned values."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def tree_state() -> str:
    """The procsched checkout measured: commit, and whether it has local changes."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or '?'}{' + uncommitted changes' if dirty else ''}"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    p.add_argument("--repeat", type=int, default=None, help="runs per cell, each in a fresh process (default 3, --quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes and 1 repeat: a smoke run")
    p.add_argument("--only", default="", help=f"comma-separated rows: {','.join(ROWS)}")
    p.add_argument("--peers", default="", help=f"comma-separated peers: {','.join(PEERS)}")
    p.add_argument("--json", metavar="PATH", help="save the raw results here")
    p.add_argument("--one", nargs=2, metavar=("PEER", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    return args


def compile_bytecode() -> None:
    """Write the bytecode of procsched and the job module, as installing a wheel does.

    An editable install (a checkout) has none until Python writes it on first import, and with
    ``PYTHONDONTWRITEBYTECODE`` set it never does: every process, every worker included, would
    compile procsched from source (about 40 ms at each start), which is not what a user's
    install costs. The peers come from wheels, compiled at install.
    """
    import compileall

    spec = importlib.util.find_spec("procsched")
    if spec is not None and spec.submodule_search_locations:
        for where in spec.submodule_search_locations:
            compileall.compile_dir(where, quiet=1)
    compileall.compile_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchjobs.py"), quiet=1)


def pick(spec: str, known: dict[str, Any], what: str) -> list[str]:
    if not spec:
        return list(known)
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in chosen if s not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return [k for k in known if k in chosen]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        peer, row = args.one
        return child_main(peer, row, args.cfg)

    rows = [ROWS[r] for r in pick(args.only, ROWS, "rows")]
    peers = pick(args.peers, PEERS, "peers")
    compile_bytecode()
    skipped_peers = {}
    for key in peers:
        if importlib.util.find_spec(PEERS[key].module.split(".")[0]) is None:
            skipped_peers[key] = f"{key} skipped: {PEERS[key].module} is not importable"
    peers = [k for k in peers if k not in skipped_peers]
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL, workers=args.workers)
    if any(r.id == "4" for r in rows):
        cfg["spin_n"], cfg["spin_cost"] = calibrate_spin()
        print(f"spin job: {cfg['spin_n']} loops = {cfg['spin_cost'] * 1e3:.3f} ms CPU (measured here)", file=sys.stderr)

    cells: dict[tuple[str, str], Cell] = {}
    runs: list[dict[str, Any]] = []
    skip: dict[tuple[str, str], str] = {}  # no point repeating: unsupported, or hit the hard limit
    t_start = now()
    for rep in range(args.repeat):
        for row in rows:
            for peer in ["floor"] if row.floor else peers:
                if (peer, row.id) in skip:
                    continue
                res = run_child(peer, row.id, cfg)
                runs.append({"repeat": rep, "peer": peer, "row": row.id, **res})
                values = ", ".join(f"{k}={fmt(v)}" for k, v in res.items() if isinstance(v, float) and k != "seconds")
                status = "  ".join(filter(None, [values, res.get("error"), res.get("note"), res.get("leak")]))
                print(f"[{rep + 1}/{args.repeat}] row {row.id:>2} {peer:<9} {res['seconds']:6.1f}s  {status}", file=sys.stderr, flush=True)
                if res.get("unsupported") or res.get("hard_timeout"):
                    skip[(peer, row.id)] = res.get("note") or res["error"]
                for m in row.metrics:
                    cell = cells.setdefault((peer, m.key + "@" + row.id), Cell())
                    v = res.get(m.key)
                    if isinstance(v, (int, float)):
                        cell.values.append(float(v))
                    else:
                        cell.failed += 1
                    cell.notes.update(res[k] for k in ("note", "error", "leak") if res.get(k))

    total = now() - t_start
    print(report(args, rows, peers, cells, skipped_peers, cfg, total))
    if args.json:
        medians = {f"{p}/{k}": c.median for (p, k), c in cells.items()}
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "args": vars(args), "python": sys.version, "tree": tree_state(), "seconds": total,
                       "runs": runs, "medians": medians}, f, indent=1)
    return 0


def report(args: argparse.Namespace, rows: list[Row], peers: list[str], cells: dict[tuple[str, str], Cell],
           skipped: dict[str, str], cfg: dict[str, Any], total: float) -> str:
    out = [
        f"procsched bench: {args.workers} workers, median of {args.repeat} run(s){' (quick sizes)' if args.quick else ''}; "
        f"Python {platform.python_version()}, {platform.system()} {os.cpu_count()} CPUs, {total:.0f} s",
        "versions: " + ", ".join(f"{d} {version(d)}" for d in ("procsched", "loky", "pebble", "numpy"))
        + f"; procsched tree {tree_state()}",
        "cell = median, then xR = ratio to ProcessPoolExecutor (R > 1: better than it); * = some runs failed",
        "",
    ]
    table, notes = [], []
    for row in (r for r in rows if not r.floor):
        for m in row.metrics:
            base = cells.get((BASELINE, m.key + "@" + row.id), Cell()).median
            line = [row.id, m.label, m.unit]
            for p in peers:
                cell = cells.get((p, m.key + "@" + row.id), Cell())
                r = ratio(m, cell.median, base)
                text = fmt(cell.median) + ("*" if cell.failed and cell.values else "")
                line.append(text + (f" x{r:.2f}" if r is not None and p != BASELINE else ""))
                if m is row.metrics[0]:
                    notes += [f"  [{row.id}] {PEERS[p].label}: {n}" for n in cell.note_lines()]
            table.append(line)
    if table:
        out.append(render(["row", "measure", "unit", *(PEERS[p].label for p in peers)], table))
    for heading in dict.fromkeys(row.heading for row in rows if row.floor):
        solo = [r for r in rows if r.floor and r.heading == heading]
        lines = [[row.id, m.label, m.unit, fmt(cells.get(("floor", m.key + "@" + row.id), Cell()).median)]
                 for row in solo for m in row.metrics]
        out += ["", heading, render(["row", "measure", "unit", "median"], lines)]
        notes += [f"  [{row.id}] {n}" for row in solo
                  for n in cells.get(("floor", row.metrics[0].key + "@" + row.id), Cell()).note_lines()]
    if "spin_cost" in cfg:
        notes.insert(0, f"  [4] the 1 ms job: spin({cfg['spin_n']}) = {cfg['spin_cost'] * 1e3:.3f} ms CPU, measured in the parent")
    notes += [f"  {s}" for s in skipped.values()]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


if __name__ == "__main__":
    # Run as the importable module ``bench`` rather than ``__main__``, so the job
    # functions pickle by reference for every peer, including those whose workers
    # are fresh interpreters (loky, procsched).
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench

    sys.exit(bench.main())
