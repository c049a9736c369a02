"""The Prometheus endpoint: a real pool, real jobs, a real HTTP scrape.

Given a pool that ran known jobs (some succeed, one raises, one kills its
worker; some held running, queued, delayed or waiting), when
``/metrics`` is fetched over HTTP and parsed with prometheus_client's own
parser, then every count says what happened, the wait and run histograms
count each placement and each measured run, and with a journal the fsync
histogram counts the writer's fsyncs (inline under "always", from the
flusher thread under "interval"). Closing the endpoint ends its threads
and frees its port. The histograms behind it are tested directly first.

Jobs are builtins (``abs``, ``time.sleep``, ``int``, ``os._exit``) or
``jobfns.gated``, so a worker never imports this module.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import await_file, wait_for
from jobfns import gated
from prometheus_client.parser import text_string_to_metric_families

import procsched
from procsched import JournalConfig
from procsched.ledger import BOUNDS, Histogram, Samples, Timings
from procsched.metrics import MetricsServer, serve_metrics

RESULT = 20.0  # how long a test waits for a future
NAP = 0.03  # seconds each "nap" job sleeps: its run time is at least this

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -------------------------------------------------------------------


@contextmanager
def endpoint(pool: procsched.Pool, port: int = 0) -> Iterator[MetricsServer]:
    """``serve_metrics`` (on a free port by default); on the way out, closed, with every thread it started gone."""
    before = set(threading.enumerate())
    server = serve_metrics(pool, port=port)
    try:
        yield server
    finally:
        server.close()
        wait_for(lambda: set(threading.enumerate()) <= before, 10.0, "the endpoint's threads to end")


def scrape(server: MetricsServer) -> Scrape:
    """GET /metrics and parse it: value by (sample name, labels)."""
    with urllib.request.urlopen(server.url, timeout=10.0) as response:
        assert response.status == 200
        text = response.read().decode()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Scrape, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def histogram(samples: Scrape, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets by bound, +Inf last), count and sum of one histogram; its shape checked."""
    buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items() if n == name + "_bucket")
    assert buckets and buckets[-1][0] == float("inf")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name}: buckets must be cumulative"
    count = value(samples, name + "_count")
    assert buckets[-1][1] == count
    return buckets, count, value(samples, name + "_sum")


def fsynced(server: MetricsServer) -> Scrape | None:
    """A scrape, once it counts an fsync of the journal."""
    got = scrape(server)
    return got if histogram(got, "procsched_journal_fsync_seconds")[1] > 0 else None


def at_most(buckets: list[tuple[float, float]], bound: float) -> float:
    """How many samples were <= ``bound`` (a bucket's bound)."""
    return dict(buckets)[bound]


# -- the histograms behind the endpoint -----------------------------------------


def test_a_histogram_counts_each_sample_once_in_the_first_bucket_that_holds_it() -> None:
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 1.0, 20.0):  # a bound is inclusive (Prometheus' "le")
        h.observe(v)
    assert h.snapshot() == {"buckets": [[0.1, 2], [1.0, 4], [10.0, 4]], "count": 5, "sum": pytest.approx(21.65)}
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))


def test_samples_keep_a_window_and_count_every_append_into_the_histogram() -> None:
    s = Samples(maxlen=3)
    for v in (0.0001, 0.002, 0.3, 4.0, 100.0):
        s.append(v)
    assert s.recent() == [0.3, 4.0, 100.0]  # the window, for percentiles
    snap = s.snapshot()
    assert snap["count"] == 5 and snap["sum"] == pytest.approx(104.3021)
    assert dict((b, n) for b, n in snap["buckets"])[0.0005] == 1 and dict((b, n) for b, n in snap["buckets"])[BOUNDS[-1]] == 4
    for v in (0.0005, 0.0004, 61.0):  # a second batch adds to the first; a bound is inclusive
        s.append(v)
    snap = s.snapshot()
    assert snap["count"] == 8 and dict((b, n) for b, n in snap["buckets"])[0.0005] == 3
    assert s.recent() == [0.0005, 0.0004, 61.0]


def test_timings_summary_carries_the_histograms() -> None:
    t = Timings()
    t.waits.append(0.01)
    t.runs.append(2.0)
    t.runs.append(3.0)
    out = t.summary(time.monotonic())
    assert out["wait_histogram"]["count"] == 1 and out["run_histogram"]["count"] == 2
    assert out["run_histogram"]["sum"] == 5.0 and out["run_s"] is not None


# -- a pool, scraped --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_counts_and_histograms_match_the_jobs_that_ran() -> None:
    with procsched.Pool(2) as pool:
        naps = [pool.submit(time.sleep, NAP) for _ in range(4)]
        bad = pool.submit(int, "not a number")
        for f in naps:
            assert f.result(timeout=RESULT) is None
        with pytest.raises(ValueError):
            bad.result(timeout=RESULT)
        crash = pool.submit(os._exit, 3)  # alone: no other job sits behind it on its worker
        with pytest.raises(procsched.WorkerCrashed):
            crash.result(timeout=RESULT)
        wait_for(lambda: all(w["state"] == "ready" for w in pool.stats()["workers"]), RESULT, "the crashed worker's replacement")
        with endpoint(pool) as server:
            got = scrape(server)
        expected = {"submitted": 6, "succeeded": 4, "failed": 2, "crashed": 1, "cancelled": 0, "retried": 0, "timed_out": 0, "preempted": 0}
        assert {k: value(got, f"procsched_jobs_{k}_total") for k in expected} == expected
        assert all(value(got, "procsched_jobs", state=s) == 0 for s in ("queued", "pending", "waiting", "running"))
        assert value(got, "procsched_queue_depth", lane="hot") == value(got, "procsched_queue_depth", lane="cold") == 0
        assert value(got, "procsched_dead_letters") == 1  # the crash, out of attempts
        assert value(got, "procsched_worker_restarts_total") == 1
        assert value(got, "procsched_workers_alive") == 2 and value(got, "procsched_workers_busy") == 0
        assert value(got, "procsched_degraded") == 0
        _, waits, _ = histogram(got, "procsched_job_wait_seconds")
        assert waits == 6  # every job was placed once
        runs, count, total = histogram(got, "procsched_job_run_seconds")
        assert count == 5  # the crash has no measured run
        assert at_most(runs, 0.025) <= 1 and total >= 4 * NAP  # only the raising job can be under NAP
        assert not any(name.startswith("procsched_journal") for name, _ in got)  # no journal


@pytest.mark.timeout(60)
def test_jobs_by_state_queue_depth_and_busy_workers_while_jobs_are_held(tmp_path: Path) -> None:
    gates = [tmp_path / "a", tmp_path / "b"]
    for g in gates:
        g.mkdir()
    with procsched.Pool(2) as pool:
        running = [pool.submit(gated, str(g), i) for i, g in enumerate(gates)]
        for g in gates:
            await_file(g / "started", RESULT)
        queued = pool.submit(abs, -1)  # both workers are busy, and none has prefetched yet
        hot = pool.options(hot=True).submit(abs, -2)  # waits: gated jobs never yield
        delayed = pool.options(delay=600).submit(abs, -3)
        waiting = pool.options(depends_on=[queued]).submit(abs, -4)
        with endpoint(pool) as server:
            got = scrape(server)
            by_state = {s: value(got, "procsched_jobs", state=s) for s in ("queued", "pending", "waiting", "running")}
            assert by_state == {"queued": 2, "pending": 1, "waiting": 1, "running": 2}
            assert value(got, "procsched_queue_depth", lane="hot") == 1 and value(got, "procsched_queue_depth", lane="cold") == 1
            assert value(got, "procsched_workers_busy") == 2
            assert histogram(got, "procsched_job_wait_seconds")[1] == 2  # only the gated two were placed
            for g in gates:
                (g / "go").touch()
            assert pool.cancel(delayed)
            assert [f.result(timeout=RESULT) for f in (*running, queued, hot, waiting)] == [0, 1, 1, 2, 4]
            got = scrape(server)  # the same endpoint, scraped again
        assert value(got, "procsched_jobs_succeeded_total") == 5 and value(got, "procsched_jobs_cancelled_total") == 1
        assert all(value(got, "procsched_jobs", state=s) == 0 for s in ("queued", "pending", "waiting", "running"))
        assert histogram(got, "procsched_job_wait_seconds")[1] == 5 and histogram(got, "procsched_job_run_seconds")[1] == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["always", "interval"])
def test_journal_fsync_latency_is_a_histogram(tmp_path: Path, policy: str) -> None:
    journal = JournalConfig(path=str(tmp_path / "journal"), fsync=policy, fsync_interval=0.01)
    with procsched.Pool(2, journal=journal) as pool:
        assert [f.result(timeout=RESULT) for f in [pool.submit(abs, -i) for i in range(5)]] == list(range(5))
        with endpoint(pool) as server:
            # "always" fsyncs before a future settles; "interval" in the flusher, soon after
            got = wait_for(lambda: fsynced(server), RESULT, "an fsync to be counted")
        assert isinstance(got, dict)
        _, count, total = histogram(got, "procsched_journal_fsync_seconds")
        assert count > 0 and total > 0
        writer = pool._sup.rec.journal.writer if pool._sup.rec is not None else None
        assert writer is not None and writer.fsync_times.snapshot()["count"] >= count


# -- the endpoint itself ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_close_stops_serving_and_frees_the_port() -> None:
    with procsched.Pool(1) as pool:
        with endpoint(pool) as server:
            assert server.port > 0 and server.url.endswith(f":{server.port}/metrics")
            assert value(scrape(server), "procsched_workers_alive") >= 0
            with pytest.raises(OSError):  # the port is taken: said at once, nothing left running
                serve_metrics(pool, port=server.port)
        server.close()  # again: nothing happens
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(server.url, timeout=5.0)
        with endpoint(pool, server.port) as again:  # the port is free again at once
            assert value(scrape(again), "procsched_workers_alive") >= 0


@pytest.mark.timeout(30)
def test_without_prometheus_client_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "prometheus_client" or m.startswith("prometheus_client.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what an interpreter without the package sees
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with procsched.Pool(1) as pool:
        before = set(threading.enumerate())
        with pytest.raises(ImportError, match=r"procsched\[metrics\]"):
            serve_metrics(pool, port=0)
        assert set(threading.enumerate()) <= before
