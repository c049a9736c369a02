"""``procsched serve``: the supervisor as a long-lived daemon.

Start-up, in order (a failure anywhere exits non-zero, so systemd's
``Restart=on-failure`` applies):

1. settings: ``--config`` (or ``$PROCSCHED_CONFIG``), then ``PROCSCHED_*``
   environment variables, then flags (see :func:`settings`);
2. the pool: its journal under the state directory is replayed first (a
   locked or damaged journal stops us here), then the workers start;
3. the listeners: the Unix socket (mode 0660, peers checked by their
   credentials), TCP if configured, or the sockets systemd passed
   (socket activation);
4. ``READY=1`` once every worker is up, then ``STATUS=`` every few
   seconds and ``WATCHDOG=1`` from the supervisor's own loop (a hung loop
   stops the pings and systemd restarts the service).

SIGTERM (or Ctrl-C) drains: ``STOPPING=1``, the listeners close, no new
job starts, running jobs get ``drain_timeout`` seconds to finish, then the
rest are stopped without a journal record, so the next start runs them
again (they were at-least-once anyway), and the process exits 0. SIGHUP
reloads what can change live: the log level and the pool's limits.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import sys
import threading
import time
import uuid
from typing import Any

import msgspec

from . import log as logs
from . import protocol as p
from .config import ConfigError, ServiceConfig, load_service_settings
from .errors import PoolError
from .log import get_logger
from .model import JournalConfig

log = get_logger("procsched.service")

#: environment overrides: variable -> [service] key
_ENV = {
    "PROCSCHED_STATE_DIR": "state_dir",
    "PROCSCHED_SOCKET": "socket",
    "PROCSCHED_TCP": "tcp",
    "PROCSCHED_LOG_LEVEL": "log_level",
    "PROCSCHED_LOG_FORMAT": "log_format",
    "PROCSCHED_METRICS": "metrics",
}


def settings(config: str | None, flags: dict[str, Any]) -> tuple[dict[str, Any], JournalConfig | None, ServiceConfig]:
    """The pool's keywords, the journal and the service's settings: file, then environment, then flags."""
    path = config or os.environ.get("PROCSCHED_CONFIG") or None
    pool, journal, service = load_service_settings(path)
    changes = {key: os.environ[var] for var, key in _ENV.items() if os.environ.get(var)}
    changes.update({k: v for k, v in flags.items() if v is not None and k in ServiceConfig.__struct_fields__})
    try:
        service = msgspec.convert({**msgspec.structs.asdict(service), **changes}, ServiceConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"service settings (environment or flags): {e}") from None
    workers = flags.get("workers") or os.environ.get("PROCSCHED_WORKERS")
    if workers is not None:
        try:
            pool["max_workers"] = int(workers)
        except ValueError:
            raise ConfigError(f"--workers / PROCSCHED_WORKERS must be an int, not {workers!r}") from None
    state = state_dir(service)
    if service.job_logs and not pool.get("log_dir"):
        pool["log_dir"] = os.path.join(state, "logs")
    if not journal.get("path") and service.journal:
        journal["path"] = os.path.join(state, "journal")
    return pool, (JournalConfig(**journal) if journal.get("path") else None), service


def state_dir(service: ServiceConfig) -> str:
    if service.state_dir:
        return os.path.abspath(service.state_dir)
    given = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    if given:
        return given.split(":")[0]
    return os.path.join(os.path.expanduser("~"), ".local", "state", "procsched")


def socket_path(service: ServiceConfig) -> str:
    if service.socket:
        return p.parse_address(service.socket)[1]  # type: ignore[no-any-return]
    return os.path.join(p.runtime_dir(), "procsched.sock")


def _ids(names: list[str | int], lookup: Any, what: str) -> tuple[int, ...]:
    out = []
    for n in names:
        if isinstance(n, int):
            out.append(n)
            continue
        try:
            out.append(lookup(n))
        except KeyError:
            raise ConfigError(f"[service] allow_{what}s: no {what} named {n!r}") from None
    return tuple(out)


def _token(service: ServiceConfig) -> str:
    if service.token_file:
        try:
            with open(service.token_file) as f:
                return f.read().strip()
        except OSError as e:
            raise ConfigError(f"[service] token_file: cannot read {service.token_file}: {e.strerror}") from None
    return os.environ.get("PROCSCHED_TOKEN", "")


def _epoch(journal: JournalConfig | None) -> str:
    """The job-id space's name: kept beside the journal, so it lives exactly as long as its ids."""
    if journal is None:
        return uuid.uuid4().hex
    path = os.path.join(journal.path, "epoch")
    try:
        with open(path) as f:
            value = f.read().strip()
            if value:
                return value
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return value


def serve(config: str | None = None, **flags: Any) -> int:
    """Run the service until SIGTERM; the process's exit code."""
    try:
        pool_settings, journal, service = settings(config, flags)
    except (ConfigError, ValueError, TypeError) as e:
        print(f"procsched serve: {e}", file=sys.stderr)
        return 2
    from .systemd import Notifier, under_systemd

    json_logs = service.log_format == "json" or (service.log_format == "auto" and under_systemd())
    logs.configure(service.log_level, json_logs)
    notifier = Notifier.from_env()
    try:
        return _run(pool_settings, journal, service, notifier, config, flags)
    except ConfigError as e:  # settings a restart cannot fix: exit 2 (the unit does not restart on it)
        log.error("serve_failed", error=str(e))
        print(f"procsched serve: {e}", file=sys.stderr)
        return 2
    except (PoolError, OSError, ValueError, TypeError) as e:
        log.error("serve_failed", error=str(e))
        print(f"procsched serve: {e}", file=sys.stderr)
        return 1
    finally:
        if notifier is not None:
            notifier.close()


class _Signals:
    """What the signal handlers record; the main thread acts on it (handlers do nothing else)."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop = False
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)

    def _stop(self, signum: int, frame: Any) -> None:
        self.stop = True
        self.wake.set()

    def _reload(self, signum: int, frame: Any) -> None:
        self.reload = True
        self.wake.set()


def _run(pool_settings: dict[str, Any], journal: JournalConfig | None, service: ServiceConfig, notifier: Any, config: str | None, flags: dict[str, Any]) -> int:
    from .executor import Pool
    from .server import Front, bind_tcp, bind_unix
    from .systemd import listen_fds, watchdog_interval

    signals = _Signals()
    signals.install()  # first: a SIGTERM during start-up drains as soon as we are up
    allow_users = _ids(service.allow_users, lambda n: pwd.getpwnam(n).pw_uid, "user")
    allow_groups = _ids(service.allow_groups, lambda n: grp.getgrnam(n).gr_gid, "group")
    token = _token(service)
    tcp = None
    if service.tcp:
        tcp = p.parse_address("tcp://" + service.tcp)[1]
        if not token:
            raise ConfigError(f"[service] tcp = {service.tcp!r} needs a token (token_file, or $PROCSCHED_TOKEN)")
    state = state_dir(service)
    os.makedirs(state, mode=0o750, exist_ok=True)
    started = time.monotonic()
    log_dir = pool_settings.get("log_dir", "")
    pool = Pool(pool_settings.pop("max_workers", None), journal=journal, **pool_settings)  # replays the journal
    front = None
    metrics = None
    try:
        front = Front(pool, epoch=_epoch(journal), token=token, max_frame=service.max_frame,
                      allow_users=allow_users, allow_groups=allow_groups,
                      log_dir=log_dir, keep_results=service.keep_results)  # fmt: skip
        inherited = listen_fds()
        for sock in inherited:
            front.add_listener(sock)
        if not inherited:
            path = socket_path(service)
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            front.add_listener(bind_unix(path))
            log.info("listening", socket=path)
        if tcp is not None:
            sock = bind_tcp(*tcp)
            front.add_listener(sock)
            log.info("listening", tcp="{}:{}".format(*sock.getsockname()[:2]))
        if service.metrics:
            from .metrics import serve_metrics

            host, _, mport = service.metrics.rpartition(":")
            metrics = serve_metrics(pool, host or "127.0.0.1", int(mport))
            log.info("metrics", address=f"{host or '127.0.0.1'}:{metrics.port}")
        _workers_up(pool, signals)
        front.start()
        interval = watchdog_interval()
        if notifier is not None:
            if interval:
                pool.set_heartbeat(interval, notifier.watchdog)
            notifier.ready(_status(pool))
        log.info("ready", workers=pool.max_workers, recovered=len(pool.recovered) or None, seconds=round(time.monotonic() - started, 2))
        while not signals.stop:
            signals.wake.wait(service.status_interval)
            signals.wake.clear()
            if signals.reload and not signals.stop:
                signals.reload = False
                _reload(pool, config, flags, notifier)
            elif notifier is not None:
                notifier.status(_status(pool))
        _drain(pool, front, service, notifier, journal is not None)
        return 0
    finally:
        if metrics is not None:
            metrics.close()
        if not pool._closed:
            pool.terminate()
        if front is not None:
            front.close()


def _workers_up(pool: Any, signals: _Signals, limit: float = 60.0) -> None:
    """Wait until every worker has booted (or the pool reports itself degraded, or we are stopped)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and not signals.stop:
        st = pool.stats()
        if st["degraded"] or all(w["state"] == "ready" for w in st["workers"]):
            return
        signals.wake.wait(0.02)


def _status(pool: Any) -> str:
    st = pool.stats()
    busy = pool.running()
    text = f"{st['queued']} queued ({st['queued_hot']} hot), {busy} running, {len(st['workers'])} workers"
    return text + (", DEGRADED: workers keep dying at start" if st["degraded"] else "")


def _drain(pool: Any, front: Any, service: ServiceConfig, notifier: Any, journaled: bool) -> None:
    """Accept nothing new, start nothing new, give running jobs until the deadline, stop."""
    running = pool.running()
    if notifier is not None:
        notifier.stopping(f"draining: {running} running")
    front.draining = True
    front.stop_listening()
    pool.drain()
    log.info("draining", running=pool.running(), queued=pool.stats()["queued"], deadline_s=service.drain_timeout)
    end = time.monotonic() + service.drain_timeout
    while pool.running() and time.monotonic() < end:
        time.sleep(0.01)  # (the loop owns the jobs; a turn-old count is all this needs)
    left = pool.running()
    if left:
        log.warning("drain_deadline", still_running=left, requeued=journaled)
    # With a journal, what the stop interrupts runs again at the next start: not a failure to report.
    front.call(lambda: setattr(front, "mute", journaled))
    pool.terminate()
    log.info("stopped")


def _reload(pool: Any, config: str | None, flags: dict[str, Any], notifier: Any) -> None:
    """SIGHUP: the log level, the worker count and the pool's limits, from the settings
    file again (the environment and the command line still override it)."""
    if notifier is not None:
        notifier.reloading()
    try:
        pool_settings, _, service = settings(config, flags)
        logs.configure(service.log_level, logs.json_enabled())
        changed = pool.reconfigure(pool_settings)
        log.info("reloaded", changed=",".join(changed) or None)
    except Exception as e:  # a bad file: keep running as we were
        log.error("reload_failed", error=str(e))
    if notifier is not None:
        notifier.reloaded(_status(pool))
