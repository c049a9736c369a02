"""Settings files: ``conf/procsched.toml`` decoded and checked once.

The ``[pool]`` table holds :class:`~procsched.model.PoolConfig` fields, the
``[journal]`` table :class:`~procsched.model.JournalConfig` fields and the
``[service]`` table (read by ``procsched serve`` alone) :class:`ServiceConfig`
fields. Each is validated against its Struct, so an unknown key or a value
of the wrong type is an error that names the key and the file. Range checks
(a negative grace, a ring too small) happen where the pool is built and name
the key too. Nothing here reads the environment; ``service.py`` applies the
environment and flag overrides on top.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Union

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
    max_frame: int = 64 << 20
    #: on SIGTERM, how long running jobs may go on before they are stopped (and re-queued in the journal)
    drain_timeout: float = 30.0
    #: journal every job under <state_dir>/journal (unless [journal] sets a path)
    journal: bool = True
    #: capture each job's stdout and stderr under <state_dir>/logs
    job_logs: bool = True
    #: outcomes kept for clients that disconnected, besides what the journal keeps
    keep_results: int = 100_000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: "auto": JSON under systemd, readable lines on a terminal
    log_format: Literal["auto", "console", "json"] = "auto"
    #: "host:port" of a Prometheus endpoint ("": off)
    metrics: str = ""
    #: seconds between STATUS= updates to systemd
    status_interval: float = 5.0


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
