"""Structured logs: structlog events delivered through stdlib ``logging``.

A library must not configure its host's logging, so procsched's loggers are
structlog loggers wrapped around ``logging.getLogger("procsched....")``: the
application decides levels and handlers (by default only warnings reach
stderr). Each event renders as ``event key=value ...`` for a terminal;
``procsched serve`` installs JSON rendering under systemd.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    name = event.pop("event", "")
    parts = [str(name)]
    parts += [f"{k}={v}" for k, v in event.items() if v is not None]
    return " ".join(parts)


def get_logger(name: str) -> Any:
    """A structlog logger that writes through ``logging.getLogger(name)``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, _render],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
