"""Structured logs: structlog events delivered through stdlib ``logging``.

A library must not configure its host's logging, so procsched's loggers are
structlog loggers wrapped around ``logging.getLogger("procsched....")``: the
application decides levels and handlers (by default only warnings reach
stderr). Each event renders as ``event key=value ...`` for a terminal;
``procsched serve`` installs JSON rendering under systemd.

structlog (with the asyncio it pulls in, ~60 ms) is imported when the first
event is actually emitted, not when procsched is: an event below the
logger's level costs one ``isEnabledFor`` call and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    name = event.pop("event", "")
    parts = [str(name)]
    parts += [f"{k}={v}" for k, v in event.items() if v is not None]
    return " ".join(parts)


class Logger:
    """A procsched logger: ``log.info("event", key=value, ...)``."""

    __slots__ = ("_std", "_bound")

    def __init__(self, name: str) -> None:
        self._std = logging.getLogger(name)
        self._bound: Any = None

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
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
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """``error`` with the exception being handled (call it in an ``except`` block)."""
        self._emit(logging.ERROR, "exception", event, fields)


def get_logger(name: str) -> Logger:
    """The logger that writes through ``logging.getLogger(name)``."""
    return Logger(name)
