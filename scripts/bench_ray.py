"""procsched on Ray beside raw Ray tasks, on the same local Ray, in one run.

    python scripts/bench_ray.py            # 3 rounds
    python scripts/bench_ray.py --quick    # smaller, 1 round

Needs ``pip install -e '.[ray]'``. It starts one Ray of this machine's own
(``ray.init(num_cpus=2)``) and measures, interleaved round by round so a
noisy machine hurts both columns alike:

  batch of CPU jobs   N jobs that each keep a CPU busy for L ms: raw Ray
                      submits them all at once (Ray's queue decides the
                      order); procsched hands Ray only what its CPUs can
                      run, plus its window (so its priorities decide), at
                      L = 0 (per-job overhead), 20 ms and 100 ms. A third
                      column, raw Ray held to the same rule (CPUs + window
                      in flight, a future per task), separates what the
                      rule costs in Ray from what procsched itself adds
  round trip          sequential single no-op jobs: p50 and p99 (ms)
  crash reported      a job SIGKILLs itself: from its death to the error
  timeout reported    a job past its 0.5 s timeout: from the deadline to
                      the error (raw Ray: ``ray.wait(timeout=)`` then
                      ``ray.cancel(force=True)``, the way one kills a task)

and prints medians with the ratio procsched / raw Ray (the issue's target:
throughput >= 0.9x for the job length stated, reporting no slower).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchjobs  # noqa: E402

import procsched  # noqa: E402
from procsched import backends  # noqa: E402
from procsched.backends.ray import _PER_CPU  # noqa: E402


def batch_raw(ray: Any, burn: Any, n: int, seconds: float) -> float:
    t0 = time.perf_counter()
    ray.get([burn.remote(seconds) for _ in range(n)])
    return n / (time.perf_counter() - t0)


def batch_windowed(ray: Any, burn: Any, n: int, seconds: float, limit: int) -> float:
    """Raw Ray held to procsched's rule: at most ``limit`` tasks given to Ray at once, one more
    as each ends (each end learned from its ``ObjectRef.future()``, as the backend does)."""
    import threading

    ended: list[Any] = []
    cv = threading.Condition()

    def on_end(fut: Any) -> None:
        with cv:
            ended.append(fut)
            cv.notify()

    t0 = time.perf_counter()
    given = left = n
    running = 0
    while left:
        while running < limit and given:
            burn.remote(seconds).future().add_done_callback(on_end)
            given -= 1
            running += 1
        with cv:
            while not ended:
                cv.wait()
            batch = ended[:]
            ended.clear()
        for fut in batch:
            fut.result()
        running -= len(batch)
        left -= len(batch)
    return n / (time.perf_counter() - t0)


def batch_pool(pool: procsched.Pool, n: int, seconds: float) -> float:
    t0 = time.perf_counter()
    for f in [pool.submit(benchjobs.burn, seconds) for _ in range(n)]:
        f.result()
    return n / (time.perf_counter() - t0)


def rtt_raw(ray: Any, noop: Any, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(noop.remote())
        samples.append(time.perf_counter() - t0)
    return _p(samples, 50), _p(samples, 99)


def rtt_pool(pool: procsched.Pool, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        pool.submit(benchjobs.noop).result()
        samples.append(time.perf_counter() - t0)
    return _p(samples, 50), _p(samples, 99)


def crash_raw(ray: Any, crash: Any, tmp: str) -> float:
    note = os.path.join(tmp, "raw-crash")
    ref = crash.remote(note)
    try:
        ray.get(ref)
    except Exception:  # noqa: BLE001 - WorkerCrashedError, whatever Ray calls it
        seen = time.time()
    return seen - _noted(note)


def crash_pool(pool: procsched.Pool, tmp: str) -> float:
    note = os.path.join(tmp, "pool-crash")
    try:
        pool.submit(benchjobs.crash_noted, note).result()
    except procsched.WorkerCrashed:
        seen = time.time()
    return seen - _noted(note)


def timeout_raw(ray: Any, pause: Any, limit: float) -> float:
    t0 = time.monotonic()
    ref = pause.remote(30)
    ready, _ = ray.wait([ref], timeout=limit)
    if not ready:
        ray.cancel(ref, force=True)
    try:
        ray.get(ref)
    except Exception:  # noqa: BLE001 - TaskCancelledError
        pass
    return time.monotonic() - (t0 + limit)


def timeout_pool(pool: procsched.Pool, limit: float) -> float:
    t0 = time.monotonic()
    try:
        pool.options(timeout=limit).submit(benchjobs.pause, 30).result()
    except procsched.JobTimeout:
        pass
    return time.monotonic() - (t0 + limit)


def _noted(path: str) -> float:
    with open(path) as f:
        return float(f.read())


def _p(samples: list[float], pct: int) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * pct / 100))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, one round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=None, help="procsched's tasks beyond the free CPUs (default: adaptive)")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    scale = 0.25 if args.quick else 1.0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    tmp = tempfile.mkdtemp(prefix="psbr")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    print(f"ray {ray.__version__}: ray.init took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    opts = {"max_retries": 0}
    burn = ray.remote(**opts)(benchjobs.burn)
    noop = ray.remote(**opts)(benchjobs.noop)
    crash = ray.remote(**opts)(benchjobs.crash_noted)
    pause = ray.remote(**opts)(benchjobs.pause)
    pool = procsched.Pool(backend=backends.Ray(window=args.window))
    batches = [(0.0, int(1000 * scale)), (0.02, int(300 * scale)), (0.1, int(60 * scale))]
    rows: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, raw: float, ours: float, windowed: float = float("nan")) -> None:
        rows.setdefault(name, []).append((raw, ours, windowed))

    # procsched's tasks in flight (adaptive: what its window reaches for tiny jobs)
    cpus = int(ray.cluster_resources()["CPU"])
    limit = cpus + (args.window if args.window is not None else cpus * _PER_CPU)

    try:
        for _ in range(2):  # warm both: Ray starts its workers, imports the job module
            ray.get([burn.remote(0.001) for _ in range(4)])
            batch_pool(pool, 4, 0.001)
        for r in range(rounds):
            for seconds, n in batches:
                name = f"{n} x {seconds * 1e3:g} ms jobs (jobs/s)"
                add(name, batch_raw(ray, burn, n, seconds), batch_pool(pool, n, seconds), batch_windowed(ray, burn, n, seconds, limit))
            raw_rtt, our_rtt = rtt_raw(ray, noop, int(200 * scale)), rtt_pool(pool, int(200 * scale))
            add("round trip p50 (ms)", raw_rtt[0] * 1e3, our_rtt[0] * 1e3)
            add("round trip p99 (ms)", raw_rtt[1] * 1e3, our_rtt[1] * 1e3)
            for _ in range(5):  # a single death's timing swings by milliseconds: five per round
                add("crash reported after (ms)", crash_raw(ray, crash, tmp) * 1e3, crash_pool(pool, tmp) * 1e3)
            add("timeout reported past the deadline (ms)", timeout_raw(ray, pause, 0.5) * 1e3, timeout_pool(pool, 0.5) * 1e3)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        pool.shutdown()
        ray.shutdown()
    print(f"\nprocsched on Ray vs raw Ray tasks, one local Ray (num_cpus=2), window={'adaptive' if args.window is None else args.window}, median of {rounds}\n")
    print(f"| measure | raw Ray | procsched on Ray | ratio | raw Ray, {limit} in flight | its ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, trios in rows.items():
        raw, ours, windowed = (statistics.median(t[i] for t in trios) for i in range(3))
        held = "" if math.isnan(windowed) else f" {windowed:,.1f} | {windowed / raw:.2f}x |"
        print(f"| {name} | {raw:,.1f} | {ours:,.1f} | {ours / raw:.2f}x |{held or ' | |'}")


if __name__ == "__main__":
    main()
