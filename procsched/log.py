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


def get_logger(name: str) -> Logger:
    """The logger of a procsched module: structlog over ``logging.getLogger(name)``."""
    return Logger(name)


class Logger:
    """Checks the level with ``logging`` first, and makes its structlog logger on the first event
    that passes: importing structlog costs ~80 ms (asyncio among its imports), which a pool
    whose events are all below the level never pays."""

    __slots__ = ("_std", "_bound")

    def __init__(self, name: str) -> None:
        self._std = logging.getLogger(name)
        self._bound: Any = None

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if not self._std.isEnabledFor(level):
            return
        if self._bound is None:
            import structlog

            self._bound = structlog.wrap_logger(
                self._std,
                processors=[structlog.stdlib.filter_by_level, _render],
                wrapper_class=structlog.stdlib.BoundLogger,
            )
        getattr(self._bound, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """``error`` with the exception being handled (call it in an ``except`` block)."""
        self._log(logging.ERROR, "exception", event, fields)
