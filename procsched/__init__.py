"""procsched: a worker-pool service for CPU-bound Python jobs.

The public face; it only re-exports. Names are loaded on first use (PEP 562)
so that a worker process, which imports ``procsched.worker`` and therefore
this package, boots without loading the supervisor's dependencies.
"""

from __future__ import annotations

TYPE_CHECKING = False  # importing typing would slow every worker's boot
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pool": "executor",
    "PoolView": "executor",
    "connect": "client",
    "Client": "client",
    "JobFuture": "futures",
    "JobOptions": "model",
    "PoolConfig": "model",
    "JournalConfig": "model",
    "JournalError": "journal",
    "JournalLocked": "journal",
    "JournalCorrupt": "journal",
    "RetryPolicy": "model",
    "current_job": "context",
    "cancel_requested": "context",
    "checkpoint": "context",
    "JobContext": "context",
    "ProcschedError": "errors",
    "PoolError": "errors",
    "BrokenPool": "futures",
    "ConfigError": "config",
    "SerializationError": "errors",
    "JobFailed": "errors",
    "RemoteError": "errors",
    "RemoteTraceback": "errors",
    "WorkerCrashed": "errors",
    "WorkerLost": "errors",
    "MemoryLimitExceeded": "errors",
    "JobTimeout": "errors",
    "Preempted": "errors",
}

__all__ = sorted(_EXPORTS)

#: subpackages reachable as attributes (``procsched.backends.Ray``) without an import of their own
_SUBPACKAGES = ("backends",)

if TYPE_CHECKING:  # "X as X": explicit re-exports, so strict type checkers see them
    from . import backends as backends
    from .client import Client as Client
    from .client import connect as connect
    from .config import ConfigError as ConfigError
    from .context import JobContext as JobContext
    from .context import cancel_requested as cancel_requested
    from .context import checkpoint as checkpoint
    from .context import current_job as current_job
    from .errors import JobFailed as JobFailed
    from .errors import JobTimeout as JobTimeout
    from .errors import MemoryLimitExceeded as MemoryLimitExceeded
    from .errors import PoolError as PoolError
    from .errors import Preempted as Preempted
    from .errors import ProcschedError as ProcschedError
    from .errors import RemoteError as RemoteError
    from .errors import RemoteTraceback as RemoteTraceback
    from .errors import SerializationError as SerializationError
    from .errors import WorkerCrashed as WorkerCrashed
    from .errors import WorkerLost as WorkerLost
    from .executor import Pool as Pool
    from .executor import PoolView as PoolView
    from .futures import BrokenPool as BrokenPool
    from .futures import JobFuture as JobFuture
    from .journal import JournalCorrupt as JournalCorrupt
    from .journal import JournalError as JournalError
    from .journal import JournalLocked as JournalLocked
    from .model import JobOptions as JobOptions
    from .model import JournalConfig as JournalConfig
    from .model import PoolConfig as PoolConfig
    from .model import RetryPolicy as RetryPolicy


def __getattr__(name: str) -> Any:
    import importlib  # here: a worker, which never asks, does not load it

    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'procsched' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
