"""Settings files: ``conf/procsched.toml`` decoded and checked once.

The ``[pool]`` table holds :class:`~procsched.model.PoolConfig` fields; it is
validated against that Struct, so an unknown key or a value of the wrong type
is an error that names the key and the file. Range checks (a negative grace,
a ring too small) happen where the pool is built and name the key too.
Nothing here reads the environment; the caller passes the path.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from .errors import PoolError
from .model import JournalConfig, PoolConfig

_TABLES = ("pool", "journal")


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
