"""``procsched serve``: the supervisor as a long-lived daemon.

Start-up, in order (a failure anywhere exits non-zero, so systemd's
``Restart=on-failure`` applies; settings a restart cannot fix exit 2, which
the unit does not restart on):

1. settings: ``--config`` (or ``$PROCSCHED_CONFIG``), then ``PROCSCHED_*``
   environment variables, then flags (``config.service_settings``);
2. the sockets systemd passed, if any (taken first, so workers do not
   inherit ``LISTEN_*``);
3. the pool: its journal under the state directory is replayed first (a
   locked or damaged journal stops us here), then the workers start;
4. the listeners: the Unix socket (mode 0660 in a directory no other user
   can write to; peers checked by their credentials) and TCP if configured,
   handed to the supervisor's loop, which serves them (``server.py``);
5. ``READY=1`` once every worker is up, then ``STATUS=`` every
   ``status_interval`` and ``WATCHDOG=1`` from the supervisor's own loop
   (a hung loop stops the pings and systemd restarts the service).

The main thread then only waits: for a signal (its handlers just record
it), or for the supervisor's loop to end, which is fatal (exit 1).

SIGTERM (or Ctrl-C) drains: ``STOPPING=1``, the listeners close, no new
job starts, running jobs get ``drain_timeout`` seconds to finish, then the
rest are stopped without a journal record, so the next start runs them
again (they were at-least-once anyway), and the process exits 0. SIGHUP
reloads what can change live: the log level, the worker count and the
pool's limits, who may connect, the status interval; other changes are
logged as needing a restart.

With ``backend = "ray"`` (``--backend ray --ray-address ADDR``) the same
supervisor, journal and clients drive a Ray cluster (``backends/ray.py``);
a job's output then goes to Ray's worker logs, not to a file of its own.

Each job's output goes to ``<state_dir>/logs/<epoch>/<job>.log``: the
epoch names the job-id space (``server.py``), so a new space (no journal,
or a new one) never appends to an old job's log. Logs of other epochs and
logs older than the journal's ``result_ttl`` are deleted at start and
hourly.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import sys
import threading
import time
import uuid
from typing import Any

import msgspec

from . import backends
from . import log as logs
from . import protocol as p
from .config import ConfigError, ServiceConfig, service_settings, state_dir
from .errors import PoolError
from .log import get_logger
from .model import JournalConfig

log = get_logger("procsched.service")

_PRUNE_EVERY = 3600.0  # seconds between sweeps of old job logs
#: [service] keys SIGHUP applies; a change to any other is logged as needing a restart
_LIVE = frozenset({"allow_users", "allow_groups", "log_level", "status_interval", "drain_timeout"})


def serve(config: str | None = None, **flags: Any) -> int:
    """Run the service until SIGTERM; the process's exit code."""
    try:
        pool_settings, journal, service = service_settings(config, flags)
    except ConfigError as e:
        print(f"procsched serve: {e}", file=sys.stderr)
        return 2
    from .systemd import Notifier, under_systemd

    json_logs = service.log_format == "json" or (service.log_format == "auto" and under_systemd())
    logs.configure(service.log_level, json_logs)
    notifier = Notifier.from_env()
    try:
        return _Service(pool_settings, journal, service, notifier, config, flags).run()
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


class _Service:
    def __init__(self, pool_settings: dict[str, Any], journal: JournalConfig | None, service: ServiceConfig,
                 notifier: Any, config: str | None, flags: dict[str, Any]) -> None:  # fmt: skip
        self.pool_settings = pool_settings
        self.journal = journal
        self.service = service
        self.notifier = notifier
        self.config = config
        self.flags = flags
        self.signals = _Signals()
        self.pool: Any = None
        self.front: Any = None

    def run(self) -> int:
        from .executor import Pool
        from .server import Front, bind_tcp, bind_unix
        from .systemd import listen_fds, watchdog_interval

        service, signals = self.service, self.signals
        signals.install()  # first: a SIGTERM during start-up drains as soon as we are up
        inherited = listen_fds()  # before any worker starts: they must not inherit LISTEN_*
        allow = _allowed(service)
        token = _token(service)
        tcp = None
        if service.tcp:
            tcp = p.parse_address("tcp://" + service.tcp)[1]
            if not token:
                raise ConfigError(f"[service] tcp = {service.tcp!r} needs a token (token_file, or $PROCSCHED_TOKEN)")
        state = state_dir(service)
        os.makedirs(state, mode=0o750, exist_ok=True)
        started = time.monotonic()
        epoch = _epoch(self.journal)
        settings = dict(self.pool_settings)
        log_root = ""
        backend: backends.Spec = backends.Local()
        if service.backend == "ray":  # a job's output goes to Ray's worker logs: no per-job files
            backend = backends.Ray(address=service.ray_address or None)
        elif service.job_logs and not settings.get("log_dir"):
            log_root = os.path.join(state, "logs")
            settings["log_dir"] = os.path.join(log_root, epoch)
        try:
            self.pool = pool = Pool(settings.pop("max_workers", None), journal=self.journal, backend=backend, **settings)  # replays the journal
        except (ValueError, TypeError) as e:  # a setting out of range
            raise ConfigError(f"{self.config or 'settings'}: {e}") from None
        except ImportError as e:  # backend = "ray" without Ray installed
            raise ConfigError(str(e)) from None
        metrics = None
        try:
            pool._sup.on_end = signals.wake.set  # the loop ending is fatal: wake the main thread
            self.front = front = Front(pool, epoch=epoch, token=token, max_frame=service.max_frame,
                                       allow_users=allow[0], allow_groups=allow[1], log_dir=settings.get("log_dir", ""),
                                       keep_results=service.keep_results)  # fmt: skip
            for sock in inherited:
                front.add_listener(sock)
            if not inherited:
                path = _socket_path(service)
                _private_dir(os.path.dirname(path))
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
            self._workers_up()
            front.start()
            interval = watchdog_interval()
            if self.notifier is not None:
                if interval:
                    pool.set_heartbeat(interval, self.notifier.watchdog)
                self.notifier.ready(self._status())
            log.info("ready", workers=pool.max_workers, recovered=len(pool.recovered) or None, seconds=round(time.monotonic() - started, 2))
            return self._serve(log_root, epoch)
        finally:
            if metrics is not None:
                metrics.close()
            if not pool._closed:
                pool.terminate()
            if self.front is not None:
                self.front.close()

    def _serve(self, log_root: str, epoch: str) -> int:
        """Wait for signals (and the loop's end), keep systemd's STATUS= fresh, prune old logs."""
        signals, pool = self.signals, self.pool
        ttl = self.journal.result_ttl if self.journal is not None else 0.0
        next_prune = 0.0
        while not signals.stop:
            if pool._sup.ended:
                log.error("supervisor_ended", error=repr(pool._sup.crashed))
                return 1
            now = time.monotonic()
            if log_root and now >= next_prune:
                next_prune = now + _PRUNE_EVERY
                _prune_logs(log_root, epoch, ttl)
            signals.wake.wait(self.service.status_interval)
            signals.wake.clear()
            if signals.reload and not signals.stop:
                signals.reload = False
                self._reload()
            elif self.notifier is not None and not pool._sup.ended:
                self.notifier.status(self._status())
        self._drain()
        return 0 if pool._sup.crashed is None else 1

    def _workers_up(self, limit: float = 60.0) -> None:
        """Wait until every worker has booted (or the pool is degraded, stopped, or broken)."""
        end = time.monotonic() + limit
        while time.monotonic() < end and not self.signals.stop and not self.pool._sup.ended:
            st = self.pool.stats()
            if st["degraded"] or all(w["state"] == "ready" for w in st["workers"]):
                return
            self.signals.wake.wait(0.02)

    def _status(self) -> str:
        st = self.pool.stats()
        text = f"{st['queued']} queued ({st['queued_hot']} hot), {self.pool.running()} running, {len(st['workers'])} workers"
        return text + (", DEGRADED: workers keep dying at start" if st["degraded"] else "")

    def _drain(self) -> None:
        """Accept nothing new, start nothing new, give running jobs until the deadline, stop."""
        pool, front, notifier = self.pool, self.front, self.notifier
        if notifier is not None:
            notifier.stopping(f"draining: {pool.running()} running")
        front.draining = True
        front.stop_listening()
        idle = pool.drain()
        deadline = self.service.drain_timeout
        log.info("draining", running=pool.running(), queued=pool.stats()["queued"], deadline_s=deadline)
        end = time.monotonic() + deadline
        while time.monotonic() < end and not pool._sup.ended:  # woken when the last running job ends
            if idle.wait(min(0.5, max(0.0, end - time.monotonic()))):
                break
        left = pool.running()
        journaled = self.journal is not None
        if left:
            log.warning("drain_deadline", still_running=left, requeued=journaled)
        # With a journal, what the stop interrupts runs again at the next start: not a failure to report.
        front.call(lambda: setattr(front, "mute", journaled))
        pool.terminate(grace=pool._config.kill_grace)  # idle workers stop cleanly, running ones are killed
        log.info("stopped")

    def _reload(self) -> None:
        """SIGHUP: the settings file again (the environment and the command line still override it)."""
        notifier = self.notifier
        if notifier is not None:
            notifier.reloading()
        try:
            pool_settings, _, service = service_settings(self.config, self.flags)
            allow = _allowed(service)
            old = self.service
            changed = [f for f in service.__struct_fields__ if getattr(service, f) != getattr(old, f)]
            pool_changed = self.pool.reconfigure(pool_settings)
        except Exception as e:  # a bad file: keep running as we were
            log.error("reload_failed", error=str(e))
        else:
            logs.configure(service.log_level, logs.json_enabled())
            self.front.call(lambda: self.front.allow(*allow))
            live = [f for f in changed if f in _LIVE]
            self.service = msgspec.structs.replace(old, **{f: getattr(service, f) for f in live})
            later = [f for f in changed if f not in _LIVE]
            if later:
                log.warning("reload_needs_restart", settings=",".join(later))
            log.info("reloaded", changed=",".join(pool_changed + live) or None)
        if notifier is not None:
            notifier.reloaded(self._status())


def _socket_path(service: ServiceConfig) -> str:
    if service.socket:
        return p.parse_address(service.socket)[1]  # type: ignore[no-any-return]
    return os.path.join(p.runtime_dir(), "procsched.sock")


def _private_dir(path: str) -> None:
    """Make the socket's directory (0750), and refuse one another user could plant a socket in."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    why = p.untrusted(path)
    if why:
        raise ConfigError(f"will not put the socket in {path}: {why} (another user could replace it)")


def _allowed(service: ServiceConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (
        _ids(service.allow_users, lambda n: pwd.getpwnam(n).pw_uid, "user"),
        _ids(service.allow_groups, lambda n: grp.getgrnam(n).gr_gid, "group"),
    )


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
    os.makedirs(journal.path, exist_ok=True)
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


def _prune_logs(root: str, epoch: str, ttl: float) -> None:
    """Delete job logs no one can ask for: other epochs' (their ids mean nothing now), and
    this epoch's older than ``ttl`` seconds (the journal has forgotten those jobs)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    cutoff = time.time() - ttl
    for entry in entries:
        if entry.name == epoch and entry.is_dir():
            if ttl <= 0:
                continue
            for f in os.scandir(entry.path):
                try:
                    if f.name.endswith(".log") and f.stat().st_mtime < cutoff:
                        os.unlink(f.path)
                except OSError:
                    pass
        elif len(entry.name) == 32 and entry.is_dir():  # another epoch's directory
            shutil.rmtree(entry.path, ignore_errors=True)
