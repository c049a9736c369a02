"""The Ray backend's connection to Ray: one per process, shared by its Ray pools.

A pool that finds this process not connected to Ray starts a Ray of its own
(no ``address``) or joins the cluster at ``address``; later Ray pools of the
process use that same connection, and the last of them to close ends it.
A connection the caller made with ``ray.init()`` is the caller's: pools use
it and leave it. ``ray.init`` installs SIGTERM and SIGINT handlers of its
own; the process's are put back, so ``procsched serve`` still drains on
SIGTERM. A ``host:port`` nobody listens on fails at once, naming it, where
``ray.init`` would retry for many minutes.

The flag actor (``raytask.Flags``) is one per process too, up before the
first job runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray
from ray import exceptions as rex

from .raytask import Flags

if TYPE_CHECKING:
    from . import Ray

_joined = threading.Lock()
_ours = {"users": 0}  # pools using the Ray connection a pool made (the last one closes it)


def join(spec: Ray) -> bool:
    """Make sure this process is connected to Ray; True if the connection is a pool's own."""
    with _joined:
        if not ray.is_initialized():
            _reachable(spec.address)
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True, **spec.init}
            if spec.address is not None:
                kwargs["address"] = spec.address
            with _own_signals():
                ray.init(**kwargs)
            _ours["users"] = 1
            return True
        if _ours["users"]:
            _ours["users"] += 1
            return True
        return False  # the caller's own ray.init(): theirs to end


def leave() -> None:
    with _joined:
        _ours["users"] -= 1
        if _ours["users"] == 0 and ray.is_initialized():
            _actor.clear()
            ray.shutdown()


def _reachable(address: str | None) -> None:
    """Fail at once, naming it, on a "host:port" nobody listens on (``ray.init`` would retry
    for many minutes)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address}: {e.strerror or e}") from None


_actor: dict[str, Any] = {}  # the flag actor of this process's current Ray connection: connection, name, handle


def flag_actor() -> tuple[str, Any]:
    """This process's flag actor, up before any job runs (so no streamed checkpoint can reach it
    after the supervisor took the last one); restarted by Ray if its process dies.

    Held here for as long as the connection lasts: a named actor nobody holds a handle to is
    ended by Ray, even while the next pool is asking for it by name.
    """
    with _joined:
        context = ray.get_runtime_context()
        connection = (context.gcs_address, context.get_job_id())  # (job ids restart at 1 per cluster)
        if _actor.get("connection") != connection:  # the old handle belongs to a gone connection
            _new_flag_actor(connection, "")
        try:
            ray.get(_actor["handle"].__ray_ready__.remote(), timeout=120)
        except (rex.GetTimeoutError, rex.ActorUnavailableError):
            raise
        except Exception:  # noqa: BLE001 - gone after all (ray.kill, or a cluster of the same address)
            _new_flag_actor(connection, _actor["name"], patience=5.0)  # the same name: running tasks look it up again
            ray.get(_actor["handle"].__ray_ready__.remote(), timeout=120)
        return _actor["name"], _actor["handle"]


def replace_flag_actor(dead: Any) -> tuple[str, Any]:
    """The flag actor after ``dead`` was found ended (``ray.kill``): made again under the same
    name, unless another pool of this process has done so already. It does not wait for the
    new actor to be up (calls to it queue until it is); ``ValueError`` while Ray still holds
    the dead actor's name."""
    with _joined:
        if _actor.get("handle") is dead:
            _new_flag_actor(_actor["connection"], _actor["name"])
        return _actor["name"], _actor["handle"]


def _new_flag_actor(connection: tuple[str, str], name: str, patience: float = 0.0) -> None:
    """Make the flag actor (a fresh name if ``name`` is empty); a name Ray still holds for a dead
    actor is tried again for ``patience`` seconds, then ``ValueError``."""
    name = name or f"procsched-flags-{os.getpid()}-{os.urandom(4).hex()}"
    actor = ray.remote(Flags).options(name=name, num_cpus=0, max_concurrency=64, max_restarts=-1)
    give_up = time.monotonic() + patience
    while True:
        try:
            handle = actor.remote()
            break
        except ValueError:  # "the name is already taken": the dead one's, for a moment
            if time.monotonic() >= give_up:
                raise
            time.sleep(0.1)
    _actor.update(connection=connection, name=name, handle=handle)


@contextlib.contextmanager
def _own_signals() -> Iterator[None]:
    """Keep the process's SIGTERM and SIGINT handlers: ``ray.init`` installs its own, which would
    end the process on SIGTERM before ``procsched serve`` can drain (or a caller's handler runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)
