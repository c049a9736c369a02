"""Structured logs: structlog events delivered through stdlib ``logging``.

A library must not configure its host's logging, so procsched's loggers are
structlog loggers wrapped around ``logging.getLogger("procsched....")``: the
application decides levels and handlers (by default only warnings reach
stderr). Each event renders as ``event key=value ...`` for a terminal;
``procsched serve`` installs JSON rendering under systemd.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog


_json = False


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    if _json:  # one object per line: the event, its fields (job, attempt, pid ...), level and logger
        event["level"] = method
        event["logger"] = getattr(logger, "name", "")
        event["ts"] = round(time.time(), 6)
        return msgspec.json.encode({k: v for k, v in event.items() if v is not None}, enc_hook=str).decode()
    name = event.pop("event", "")
    parts = [str(name)]
    parts += [f"{k}={v}" for k, v in event.items() if v is not None]
    return " ".join(parts)


def json_enabled() -> bool:
    return _json


def configure(level: str = "info", json: bool = False) -> None:
    """Set up logging for a process procsched owns (``procsched serve``): procsched's events
    at ``level`` and above to stderr, as JSON lines or as readable ``event key=value`` lines."""
    global _json
    _json = json
    handler = logging.StreamHandler()
    fmt = "%(message)s" if json else "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("procsched")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def get_logger(name: str) -> Any:
    """A structlog logger that writes through ``logging.getLogger(name)``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, _render],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
