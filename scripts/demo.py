"""A real batch on a procsched pool: count the primes below two million, in 2,000 jobs.

    python scripts/demo.py                 # every CPU, 2,000 jobs
    python scripts/demo.py --jobs 500 --workers 2

Each job is pure-Python CPU work of a few milliseconds. A few of them are
made to misbehave so that the summary has something to say: some kill
their own worker on their first attempt (they succeed on the retry), and
one hangs past its timeout on every attempt and ends as timed out. The
answer is checked against a single-process count of the same numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import as_completed

import procsched

SLICE = 1_000


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi), by trial division: deliberately CPU-bound."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            count += n == 2
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def sieve_count(hi: int) -> int:
    """The same answer another way, in this process, to check the pool's."""
    is_prime = bytearray([1]) * hi
    is_prime[:2] = b"\0\0"[: min(hi, 2)]
    for n in range(2, int(hi**0.5) + 1):
        if is_prime[n]:
            is_prime[n * n :: n] = bytes(len(range(n * n, hi, n)))
    return sum(is_prime)


def flaky_count(lo: int, hi: int) -> int:
    """Like ``count_primes``, but its worker dies on the first attempt."""
    if procsched.current_job().attempt == 1:
        os._exit(70)
    return count_primes(lo, hi)


def hang() -> None:
    time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2_000, help="slices to count (default 2000)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: every CPU)")
    args = ap.parse_args(argv)

    try:
        from tqdm import tqdm
    except ImportError:  # the demo extra installs it; run without a bar otherwise
        tqdm = None

    started = time.perf_counter()
    with procsched.Pool(args.workers) as pool:
        retrying = pool.options(retries=procsched.RetryPolicy.make(2, backoff=0.05), name="count")
        futures = {}
        for i in range(args.jobs):
            lo = i * SLICE
            fn = flaky_count if i % 250 == 125 else count_primes
            futures[retrying.submit(fn, lo, lo + SLICE)] = lo
        hung = pool.options(timeout=0.5, retries=1, name="hang").submit(hang)

        total = 0
        done = as_completed(futures)
        bar = tqdm(done, total=len(futures), unit="job", smoothing=0.1) if tqdm else done
        for fut in bar:
            total += fut.result()
        try:
            hung.result()
            hung_outcome = "finished?!"
        except procsched.JobTimeout as e:
            hung_outcome = f"JobTimeout ({e})"
        stats = pool.stats()
    elapsed = time.perf_counter() - started

    expected = sieve_count(args.jobs * SLICE)
    check = " (checked)" if expected == total else f" (WRONG: expected {expected})"
    print()
    print(f"primes below {args.jobs * SLICE:,}: {total:,}{check}")
    print(f"jobs        {stats['submitted']:,} submitted, {stats['succeeded']:,} succeeded, {stats['failed']} failed")
    print(f"time        {elapsed:.2f} s on {pool.max_workers} workers")
    print(f"throughput  {stats['succeeded'] / elapsed:,.0f} jobs/s")
    print(f"retries     {stats['retried']} (workers replaced: {stats['restarts']})")
    print(f"crashes     {stats['crashed']} jobs lost to a crash after their retries")
    print(f"timeouts    {stats['timed_out']}: the hanging job ended with {hung_outcome}")
    return 0 if expected == total else 1


if __name__ == "__main__":
    sys.exit(main())
