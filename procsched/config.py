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
from .model import PoolConfig

_TABLES = ("pool",)


class ConfigError(PoolError, ValueError):
    """A settings file is missing, is not TOML, or holds an unknown or mistyped key."""


def load_pool_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``[pool]`` table of a settings file, checked against :class:`PoolConfig`."""
    name = os.fspath(path)
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
    pool = raw.get("pool", {})
    if not isinstance(pool, dict):
        raise ConfigError(f"{name}: 'pool' must be a table")
    try:
        msgspec.convert(pool, PoolConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{name}: [pool] {e}") from None
    return dict(pool)
