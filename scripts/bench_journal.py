"""What the journal costs: throughput with and without it, replay, bytes per job.

    python scripts/bench_journal.py [--quick] [--json]

Rows, all measured in this one run on this machine:

* no-op jobs per second through ``submit`` with no journal, with the journal
  at ``fsync="interval"`` and at ``"never"`` (interleaved rounds, medians);
* ``fsync="always"``: one submitting thread (each submit waits for its
  fsync), 16 submitting threads and one ``map`` batch with a key per call
  (group commit: one fsync covers many submits); the fsync latency of the
  journal's disk is measured beside it;
* replay: the time to open a journal of 1,000,000 records, and to reopen it
  after compaction;
* journal bytes written per no-op job.

The targets (from the journal's issue): ``interval`` at least 0.8x no
journal; ``always`` at least 10,000 jobs/s through group commit; replay of
1M records within 3 s; reopening after compaction within 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import procsched  # noqa: E402
from benchjobs import noop  # noqa: E402
from procsched.journal import Journal  # noqa: E402
from procsched.journal import records as r  # noqa: E402
from procsched.model import JobOptions, JournalConfig  # noqa: E402


def _pool(journal: JournalConfig | None, workers: int) -> procsched.Pool:
    pool = procsched.Pool(workers, journal=journal)
    list(pool.map(noop, range(500)))  # workers up, job duration measured
    return pool


def submit_rate(journal: JournalConfig | None, n: int, workers: int) -> tuple[float, int]:
    """Jobs/s of n no-op submits (and their results); journal bytes written per job."""
    pool = _pool(journal, workers)
    try:
        before = _written(pool)
        t = time.perf_counter()
        futures = [pool.submit(noop, i) for i in range(n)]
        for f in futures:
            f.result()
        rate = n / (time.perf_counter() - t)
        per_job = (_written(pool) - before) // n if journal else 0
    finally:
        pool.shutdown()
    return rate, per_job


def _written(pool: procsched.Pool) -> int:
    rec = pool._sup.rec
    return 0 if rec is None else rec.journal.bytes_written


def always_threads(journal: JournalConfig, n: int, workers: int, threads: int) -> float:
    pool = _pool(journal, workers)
    futures: list[Any] = []
    try:

        def submitter(k: int) -> None:
            futures.extend(pool.submit(noop, i) for i in range(k))

        t = time.perf_counter()
        ts = [threading.Thread(target=submitter, args=(n // threads,)) for _ in range(threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        for f in futures:
            f.result()
        return len(futures) / (time.perf_counter() - t)
    finally:
        pool.shutdown()


def always_batch(journal: JournalConfig, n: int, workers: int) -> float:
    pool = _pool(journal, workers)
    try:
        t = time.perf_counter()
        out = list(pool.map(noop, range(n), key=lambda i: f"b{i}"))
        assert out == list(range(n))
        return n / (time.perf_counter() - t)
    finally:
        pool.shutdown()


def fsync_latency(directory: str, rounds: int = 200) -> tuple[float, float]:
    """p50 and p99 of append + fsync on the journal's filesystem, in microseconds."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    samples = []
    try:
        for _ in range(rounds):
            os.write(fd, b"x" * 128)
            t = time.perf_counter()
            os.fsync(fd)
            samples.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def build_journal(path: str, records: int, keep: int = 100_000) -> int:
    """A journal of about ``records`` records: no-op jobs submitted, dispatched and
    finished, the oldest dropped past ``keep`` finished ones (the default retention),
    as a pool writes them; how many records it holds."""
    j = Journal(JournalConfig(path=path, fsync="never", compact_min_bytes=1 << 40))
    fn = j.fn_id(b"\x80\x05\x95\x1a\x00benchjobs\x94\x8c\x04noop\x94\x93\x94.")
    opts = j.opts_id(JobOptions())
    count = 2
    job = dropped = 0
    while count < records:
        job += 1
        j.append(r.Submitted(job, fn, opts, 1, b"\x80\x05K\x01\x85\x94.", [], "noop", None, 1.0))
        j.append(r.Dispatched(job, 1))
        j.append(r.Succeeded(job, b"\x80\x05K\x01.", [], "", 2.0))
        count += 3
        if job % 256 == 0:  # a loop turn: one commit, and retention's drops
            if job - dropped > keep:
                j.append(r.Dropped(list(range(dropped + 1, job - keep + 1)), "retention"))
                dropped, count = job - keep, count + 1
            j.commit()
    j.close()
    return count


def replay(path: str) -> tuple[float, int]:
    t = time.perf_counter()
    j = Journal(JournalConfig(path=path), readonly=True)
    return time.perf_counter() - t, len(j.state.jobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, one round")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the journals go (default: a temporary directory)")
    args = parser.parse_args()
    n = 5_000 if args.quick else 20_000
    rounds = 1 if args.quick else 3
    base = tempfile.mkdtemp(prefix="procsched-bench-", dir=args.dir)
    out: dict[str, Any] = {}
    try:
        jpath = os.path.join(base, "j")

        def fresh(**kw: Any) -> JournalConfig:
            shutil.rmtree(jpath, ignore_errors=True)
            return JournalConfig(path=jpath, **kw)

        rates: dict[str, list[float]] = {"none": [], "interval": [], "never": []}
        per_job = 0
        for _ in range(rounds):  # interleaved, so drift in the machine hits every variant alike
            rates["none"].append(submit_rate(None, n, args.workers)[0])
            rate, per_job = submit_rate(fresh(fsync="interval"), n, args.workers)
            rates["interval"].append(rate)
            rates["never"].append(submit_rate(fresh(fsync="never"), n, args.workers)[0])
        med = {k: statistics.median(v) for k, v in rates.items()}
        out["submit_jobs_per_s"] = {k: round(v) for k, v in med.items()}
        out["interval_vs_none"] = round(med["interval"] / med["none"], 3)
        out["never_vs_none"] = round(med["never"] / med["none"], 3)
        out["journal_bytes_per_job"] = per_job
        out["fsync_us_p50_p99"] = [round(x) for x in fsync_latency(base)]
        out["always_one_thread_jobs_per_s"] = round(submit_rate(fresh(fsync="always"), n // 10, args.workers)[0])
        out["always_16_threads_jobs_per_s"] = round(always_threads(fresh(fsync="always"), n, args.workers, 16))
        out["always_map_batch_jobs_per_s"] = round(always_batch(fresh(fsync="always"), n, args.workers))
        records = 100_000 if args.quick else 1_000_000
        shutil.rmtree(jpath, ignore_errors=True)
        count = build_journal(jpath, records)
        seconds, jobs = replay(jpath)
        out["replay"] = {"records": count, "seconds": round(seconds, 3), "jobs": jobs, "bytes": _size(jpath)}
        j = Journal(JournalConfig(path=jpath))
        j.compact()
        j.close()
        seconds, jobs = replay(jpath)
        out["reopen_after_compaction"] = {"seconds": round(seconds, 3), "jobs": jobs, "bytes": _size(jpath)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
    return 0


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".seg"))


if __name__ == "__main__":
    sys.exit(main())
