"""An opt-in Prometheus endpoint for a running pool (the ``procsched[metrics]`` extra).

::

    serve_metrics(pool)  ──►  MetricsServer: prometheus_client's HTTP server, a daemon thread,
                              │               with a registry of its own (never the global one)
                              │ GET /metrics
                              ▼
                            PoolCollector.collect()   one pool.stats() per scrape
                              │                       (+ the journal writer's fsync histogram)
                              ▼
                            procsched_* gauges, counters and histograms, as text

Everything is read at scrape time from what the supervisor keeps anyway:
the outcome counters (``jobs.Stats``), the job table by state, the ready
queue's lanes, the workers (``LocalBackend.stats``), the dead letters,
and the cumulative wait and run histograms of ``ledger.Timings``. So the
only per-job cost of metrics is that histogram (see ``ledger.Samples``),
paid whether or not an endpoint runs. Journal fsync latency comes from
``SegmentWriter.fsync_times`` (``journal.store``).

The scrape thread reads without a lock: a value may be a loop turn old,
and two values of one scrape may come from different turns.

This module owns the server and its registry; it never changes the pool.
It is the only one that imports ``prometheus_client``, and only when
:func:`serve_metrics` is called, so the package works without the extra.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .model import PENDING, QUEUED, RUNNING
from .requests import WAITING

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

    from .executor import Pool
    from .ledger import Histogram

__all__ = ["MetricsServer", "PoolCollector", "serve_metrics"]

PREFIX = "procsched_"
#: states a live job can be in; each gets a sample (0 when no job is in it) so a series never vanishes
JOB_STATES = (QUEUED, PENDING, WAITING, RUNNING)
#: the outcome counters of ``pool.stats()``, each a ``procsched_jobs_<name>_total`` counter
OUTCOMES: dict[str, str] = {
    "submitted": "Jobs the pool accepted.",
    "succeeded": "Jobs that returned a result.",
    "failed": "Jobs that ended in failure (raised, crashed or timed out, after their retries).",
    "cancelled": "Jobs that were cancelled.",
    "retried": "Failed attempts that were run again.",
    "crashed": "Jobs that ended because their worker died (after their retries).",
    "timed_out": "Jobs that ended because they ran past their timeout (after their retries).",
    "preempted": "Runs stopped to make room for a hot job (the job ran again).",
}


class PoolCollector:
    """A prometheus_client collector: the pool's state as metric families, read when scraped."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        stats = self.pool.stats()
        yield from job_families(stats)
        yield from worker_families(stats)
        fsyncs = fsync_times(self.pool)
        if fsyncs is not None:
            yield histogram_family("journal_fsync_seconds", "How long each fsync of the journal took.", fsyncs.snapshot())


def job_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """Jobs by state, outcome counters, queue depth by lane, dead letters, wait and run time."""
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    by_state: dict[str, int] = stats["by_state"]
    jobs = GaugeMetricFamily(PREFIX + "jobs", "Jobs the pool holds, by state.", labels=["state"])
    for state in (*JOB_STATES, *sorted(set(by_state) - set(JOB_STATES))):
        jobs.add_metric([state], by_state.get(state, 0))
    yield jobs
    for name, doc in OUTCOMES.items():
        yield CounterMetricFamily(f"{PREFIX}jobs_{name}", doc, value=stats[name])
    depth = GaugeMetricFamily(PREFIX + "queue_depth", "Jobs waiting in the ready queue, by lane.", labels=["lane"])
    depth.add_metric(["hot"], stats["queued_hot"])
    depth.add_metric(["cold"], stats["queued_cold"])
    yield depth
    yield GaugeMetricFamily(PREFIX + "dead_letters", "Jobs kept after running out of attempts (crash or timeout).", value=stats["dead_letters"])
    yield histogram_family("job_wait_seconds", "Time from queued to placed on a worker, per placement.", stats["wait_histogram"])
    yield histogram_family("job_run_seconds", "Run time the worker measured, per attempt that returned or raised.", stats["run_histogram"])


def worker_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """Workers alive and busy, restarts, and whether the pool is degraded."""
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    workers: list[dict[str, Any]] = stats["workers"]
    alive = [w for w in workers if w["state"] != "dead"]
    yield GaugeMetricFamily(PREFIX + "workers_alive", "Worker processes running (booting, ready or retiring).", value=len(alive))
    yield GaugeMetricFamily(PREFIX + "workers_busy", "Worker processes with a job placed on them.", value=sum(1 for w in alive if w["queued"]))
    yield CounterMetricFamily(PREFIX + "worker_restarts", "Workers replaced after they died.", value=stats["restarts"])
    yield GaugeMetricFamily(PREFIX + "degraded", "1 while workers keep dying at boot (respawns back off), else 0.", value=int(bool(stats["degraded"])))


def histogram_family(name: str, doc: str, snap: dict[str, Any]) -> Metric:
    """A histogram family from a ``ledger.Histogram`` snapshot (cumulative buckets, count, sum)."""
    from prometheus_client.metrics_core import HistogramMetricFamily

    buckets = [(repr(float(bound)), float(n)) for bound, n in snap["buckets"]]
    buckets.append(("+Inf", float(snap["count"])))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=snap["sum"])


def fsync_times(pool: Pool) -> Histogram | None:
    """The journal writer's fsync histogram; None without a journal, or once it is closed."""
    rec = pool._sup.rec
    writer = None if rec is None else rec.journal.writer
    return None if writer is None else writer.fsync_times


class MetricsServer:
    """The running endpoint: ``port`` (the one bound, also when 0 was asked), ``url``, ``close()``."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_address[1]
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (waits for the serving thread; idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<procsched.MetricsServer {self.url}{' closed' if self._closed else ''}>"


def serve_metrics(pool: Pool, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
    """Serve ``pool``'s metrics at ``http://host:port/metrics`` until ``close()``; port 0 picks a free one.

    Needs ``prometheus_client`` (``pip install 'procsched[metrics]'``):
    ``ImportError`` saying so without it.
    """
    _require_client()
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=True)  # (names known up front: name[] filters work)
    registry.register(PoolCollector(pool))
    server, thread = start_http_server(port, addr=host, registry=registry)
    thread.name = "procsched-metrics"
    return MetricsServer(server, thread, host)


def _require_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "procsched.metrics needs prometheus_client, an optional extra: pip install 'procsched[metrics]'",
            name="prometheus_client",
        ) from e
