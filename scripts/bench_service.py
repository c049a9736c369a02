"""The service's speed beside the embedded pool and multiprocessing.Pool, in one run.

    python scripts/bench_service.py            # 3 rounds, 2 workers
    python scripts/bench_service.py --quick    # smaller, 1 round

It starts a real ``procsched serve`` (journal on, fsync="interval", job
output capture off as a throughput-minded service would run it, or on with
``--job-logs``, the service's default) on a
temporary socket and measures, interleaved round by round so a noisy
machine hurts every column alike:

  submit/s   N no-op jobs, one submit each: how fast submit() returns
             (mp.Pool: apply_async), then every result is awaited
  e2e/s      the same N jobs, submit of the first to result of the last
  map/s      N no-op items through map (default chunking)
  rtt p50    sequential round trips (submit, wait for the result): µs
  rtt p99

and prints medians, with the ratios the issue sets as targets: the
client's per-job submit rate against multiprocessing.Pool's (target >= 1)
and its latency p50 against the embedded pool's (target <= 2).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchjobs  # noqa: E402

import procsched  # noqa: E402


def rates(submit: Callable[[Any], Any], result: Callable[[Any], Any], n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    handles = [submit(i) for i in range(n)]
    t1 = time.perf_counter()
    for h in handles:
        result(h)
    t2 = time.perf_counter()
    return n / (t1 - t0), n / (t2 - t0)


def rtts(submit: Callable[[Any], Any], result: Callable[[Any], Any], n: int) -> tuple[float, float]:
    for i in range(n // 10):
        result(submit(i))
    samples = []
    for i in range(n):
        t = time.perf_counter()
        result(submit(i))
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def measure_executor(ex: Any, n: int, rtt_n: int, mp: bool = False) -> dict[str, float]:
    if mp:
        submit = lambda i: ex.apply_async(benchjobs.noop, (i,))  # noqa: E731
        result = lambda h: h.get()  # noqa: E731
        mapper = lambda: ex.map(benchjobs.noop, range(n))  # noqa: E731
    else:
        submit = lambda i: ex.submit(benchjobs.noop, i)  # noqa: E731
        result = lambda h: h.result()  # noqa: E731
        mapper = lambda: list(ex.map(benchjobs.noop, range(n)))  # noqa: E731
    for _ in range(3):  # warm: every worker has run jobs
        rates(submit, result, 200)
    sub, e2e = rates(submit, result, n)
    t = time.perf_counter()
    out = mapper()
    map_rate = n / (time.perf_counter() - t)
    assert len(out) == n
    p50, p99 = rtts(submit, result, rtt_n)
    return {"submit/s": sub, "e2e/s": e2e, "map/s": map_rate, "rtt p50": p50, "rtt p99": p99}


def start_service(root: str, workers: int, job_logs: bool) -> subprocess.Popen[bytes]:
    conf = os.path.join(root, "procsched.toml")
    with open(conf, "w") as f:
        f.write(f"[service]\njob_logs = {'true' if job_logs else 'false'}\nlog_level = \"warning\"\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "procsched", "serve", "--config", conf, "--socket", os.path.join(root, "s.sock"),
           "--state-dir", os.path.join(root, "state"), "--workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(os.path.join(root, "s.sock"))
            return proc
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                proc.kill()
                raise SystemExit("procsched serve did not start")
            time.sleep(0.02)
        finally:
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--job-logs", action="store_true", help="with the service's default per-job output capture on")
    args = ap.parse_args(argv)
    n, rtt_n, rounds = (args.jobs, 2000, args.rounds) if not args.quick else (2000, 200, 1)
    # mp.Pool forks: first, while this process has no other thread (a fork while
    # procsched's supervisor spawns a worker would keep that spawn's pipe open).
    mp = multiprocessing.Pool(args.workers)
    root = tempfile.mkdtemp(prefix="procsched-bench-")
    service = start_service(root, args.workers, args.job_logs)
    results: dict[str, list[dict[str, float]]] = {"mp.Pool": [], "procsched.Pool": [], "Client (unix)": []}
    try:
        client = procsched.connect("unix://" + os.path.join(root, "s.sock"), progress=False)
        pool = procsched.Pool(args.workers)
        try:
            for _ in range(rounds):
                results["mp.Pool"].append(measure_executor(mp, n, rtt_n, mp=True))
                results["procsched.Pool"].append(measure_executor(pool, n, rtt_n))
                results["Client (unix)"].append(measure_executor(client, n, rtt_n))
        finally:
            client.close()
            pool.shutdown()
            mp.terminate()
            mp.join()
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
        shutil.rmtree(root, ignore_errors=True)
    cols = ["submit/s", "e2e/s", "map/s", "rtt p50", "rtt p99"]
    med = {k: {c: statistics.median(r[c] for r in v) for c in cols} for k, v in results.items()}
    print(f"{args.workers} workers, {n} jobs, {rounds} round(s), median; rtt in µs")
    print(f"{'':16}" + "".join(f"{c:>12}" for c in cols))
    for k, v in med.items():
        print(f"{k:16}" + "".join(f"{v[c]:>12,.0f}" for c in cols))
    c, e, m = med["Client (unix)"], med["procsched.Pool"], med["mp.Pool"]
    print(f"client submit/s vs mp.Pool apply_async: {c['submit/s'] / m['submit/s']:.2f}x (target >= 1)")
    print(f"client rtt p50 vs embedded pool:        {c['rtt p50'] / e['rtt p50']:.2f}x (target <= 2)")
    print(f"client e2e/s vs embedded pool:          {c['e2e/s'] / e['e2e/s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
