"""Settings files: ``conf/procsched.toml`` decoded and checked once.

The ``[pool]`` table holds :class:`~procsched.model.PoolConfig` fields, the
``[journal]`` table :class:`~procsched.model.JournalConfig` fields and the
``[service]`` table (read by ``procsched serve`` alone) :class:`ServiceConfig`
fields. Each is validated against its Struct, so an unknown key or a value
of the wrong type is an error that names the key and the file. Range checks
(a negative grace, a ring too small) happen where the pool is built and name
the key too. :func:`service_settings` adds what ``procsched serve`` takes
from the environment and its flags, which override the file.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

import msgspec

from .errors import PoolError
from .model import JournalConfig, PoolConfig

_TABLES = ("pool", "journal", "service")


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``procsched serve``'s own settings (the ``[service]`` table)."""

    #: journal, spilled results and per-job logs ("": $STATE_DIRECTORY, else ~/.local/state/procsched)
    state_dir: str = ""
    #: the Unix socket ("": <runtime directory>/procsched.sock)
    socket: str = ""
    #: "host:port" to also listen on TCP ("": off); needs a token
    tcp: str = ""
    #: a file holding the TCP token ("": $PROCSCHED_TOKEN)
    token_file: str = ""
    #: users and groups (names or ids) besides the service's own user (and root) allowed on the socket
    allow_users: list[Union[str, int]] = []
    allow_groups: list[Union[str, int]] = []
    #: the largest frame a client may send, bytes
    max_frame: Annotated[int, msgspec.Meta(ge=1 << 16)] = 64 << 20
    #: on SIGTERM, how long running jobs may go on before they are stopped (and re-queued in the journal)
    drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: journal every job under <state_dir>/journal (unless [journal] sets a path)
    journal: bool = True
    #: capture each job's stdout and stderr under <state_dir>/logs
    job_logs: bool = True
    #: outcomes kept for clients that disconnected, besides what the journal keeps
    keep_results: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: "auto": JSON under systemd, readable lines on a terminal
    log_format: Literal["auto", "console", "json"] = "auto"
    #: "host:port" of a Prometheus endpoint ("": off)
    metrics: str = ""
    #: seconds between STATUS= updates to systemd
    status_interval: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: what runs the jobs: "local" worker processes, or "ray" (a Ray cluster; needs procsched[ray])
    backend: Literal["local", "ray"] = "local"
    #: with backend = "ray": the cluster ("auto": the one this machine belongs to, "host:port",
    #: "ray://head:10001"; "": a Ray of the service's own)
    ray_address: str = "auto"


class ConfigError(PoolError, ValueError):
    """A settings file is missing, is not TOML, or holds an unknown or mistyped key."""


def _read(name: str) -> dict[str, Any]:
    try:
        with open(name, "rb") as f:
            raw = msgspec.toml.decode(f.read())
    except OSError as e:
        raise ConfigError(f"cannot read settings file {name}: {e.strerror or e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: {e}") from None
    unknown = sorted(set(raw) - set(_TABLES))
    if unknown:
        raise ConfigError(f"{name}: unknown table(s) {', '.join(unknown)} (known: {', '.join(_TABLES)})")
    if not isinstance(raw, dict):  # pragma: no cover - TOML documents are tables
        raise ConfigError(f"{name}: not a TOML table")
    return dict(raw)


def _table(name: str, raw: dict[str, Any], table: str, struct: type, **required: Any) -> dict[str, Any]:
    """A table of the file, checked against ``struct`` (``required``: stand-ins for fields it may omit)."""
    values = raw.get(table, {})
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: '{table}' must be a table")
    try:
        msgspec.convert({**required, **values}, struct)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{name}: [{table}] {e}") from None
    return dict(values)


def load_pool_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``[pool]`` table of a settings file, checked against :class:`PoolConfig`."""
    name = os.fspath(path)
    return _table(name, _read(name), "pool", PoolConfig)


def load_settings(path: str | os.PathLike[str]) -> tuple[dict[str, Any], JournalConfig | None]:
    """The ``[pool]`` settings and the journal (None unless ``[journal]`` sets a ``path``)."""
    name = os.fspath(path)
    raw = _read(name)
    pool = _table(name, raw, "pool", PoolConfig)
    journal = _table(name, raw, "journal", JournalConfig, path="")
    return pool, (JournalConfig(**journal) if journal.get("path") else None)


def load_service_settings(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], dict[str, Any], ServiceConfig]:
    """The ``[pool]``, ``[journal]`` (unchecked for ``path``) and ``[service]`` tables of a settings
    file; all defaults without a file."""
    if path is None:
        return {}, {}, ServiceConfig()
    name = os.fspath(path)
    raw = _read(name)
    pool = _table(name, raw, "pool", PoolConfig)
    journal = _table(name, raw, "journal", JournalConfig, path="")
    service = _table(name, raw, "service", ServiceConfig)
    return pool, journal, msgspec.convert(service, ServiceConfig)


#: environment overrides of ``procsched serve``: variable -> [service] key
_ENV = {
    "PROCSCHED_STATE_DIR": "state_dir",
    "PROCSCHED_SOCKET": "socket",
    "PROCSCHED_TCP": "tcp",
    "PROCSCHED_LOG_LEVEL": "log_level",
    "PROCSCHED_LOG_FORMAT": "log_format",
    "PROCSCHED_METRICS": "metrics",
    "PROCSCHED_BACKEND": "backend",
    "PROCSCHED_RAY_ADDRESS": "ray_address",
}


def service_settings(config: str | None, flags: dict[str, Any]) -> tuple[dict[str, Any], JournalConfig | None, ServiceConfig]:
    """``procsched serve``'s pool keywords, journal and own settings: the file (``config`` or
    ``$PROCSCHED_CONFIG``), then ``PROCSCHED_*`` variables, then flags. The journal defaults
    to ``<state_dir>/journal``. Every mistake is a :class:`ConfigError` naming its source."""
    path = config or os.environ.get("PROCSCHED_CONFIG") or None
    pool, journal, service = load_service_settings(path)
    where = path or "settings"
    changes = {key: os.environ[var] for var, key in _ENV.items() if os.environ.get(var)}
    changes.update({k: v for k, v in flags.items() if v is not None and k in ServiceConfig.__struct_fields__})
    try:
        service = msgspec.convert({**msgspec.structs.asdict(service), **changes}, ServiceConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"service settings (environment or flags): {e}") from None
    workers = flags.get("workers")
    if workers is None:
        workers = os.environ.get("PROCSCHED_WORKERS")
    if workers is not None:
        try:
            pool["max_workers"] = int(workers)
        except ValueError:
            raise ConfigError(f"--workers / PROCSCHED_WORKERS must be an int, not {workers!r}") from None
        if pool["max_workers"] <= 0:
            raise ConfigError(f"--workers / PROCSCHED_WORKERS must be at least 1, not {workers!r}")
    for key in ("tcp", "metrics"):
        value = getattr(service, key)
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"{where}: [service] {key} = {value!r}: expected 'host:port'")
    if not journal.get("path") and service.journal:
        journal["path"] = os.path.join(state_dir(service), "journal")
    try:
        return pool, (JournalConfig(**journal) if journal.get("path") else None), service
    except TypeError as e:
        raise ConfigError(f"{where}: [journal] {e}") from None


def state_dir(service: ServiceConfig) -> str:
    """Where the service keeps its journal, spilled results and job logs."""
    if service.state_dir:
        return os.path.abspath(service.state_dir)
    given = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    if given:
        return given.split(":")[0]
    return os.path.join(os.path.expanduser("~"), ".local", "state", "procsched")
