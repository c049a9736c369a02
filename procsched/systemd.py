"""systemd integration without libsystemd: readiness, watchdog, socket activation.

This module owns the three small protocols a service speaks with its
service manager, each implemented directly on the OS:

* **notify** (``sd_notify``): the service sends datagrams of newline
  separated ``KEY=value`` assignments to the ``AF_UNIX`` ``SOCK_DGRAM``
  socket named by ``NOTIFY_SOCKET`` (a filesystem path, or an abstract
  socket written with a leading ``@``)::

      serve ── READY=1 / MAINPID ──────────────▶ manager  (start-up done)
            ── WATCHDOG=1, every interval ─────▶          (the loop is alive)
            ── RELOADING=1 + MONOTONIC_USEC ───▶          (SIGHUP received)
            ── READY=1 ────────────────────────▶          (reload done)
            ── STOPPING=1 ─────────────────────▶          (draining)

  :class:`Notifier` sends them. A send never raises and never blocks (the
  socket is non-blocking; a full queue drops the message): a service must
  not fail, or stall its loop, because its manager is slow or gone. The
  first failure is logged, later ones are dropped silently.
* **watchdog**: :func:`watchdog_interval` reads ``WATCHDOG_USEC`` (and
  ``WATCHDOG_PID``) and says how often to ping: half the timeout. The ping
  belongs in the supervisor's loop, so that a stuck loop stops pinging.
* **socket activation** (``sd_listen_fds``): :func:`listen_fds` adopts the
  listening sockets passed from fd 3 on (``LISTEN_PID``, ``LISTEN_FDS``,
  ``LISTEN_FDNAMES``), marks them close-on-exec and removes the variables,
  so that workers inherit neither the sockets nor the claim to them.

:func:`under_systemd` tells ``serve`` whether its stderr goes to the
journal (to pick JSON logs).

Nothing here reads the environment at import or keeps module state; each
function reads ``os.environ`` when called (or the mapping it is given, for
tests and for callers that carry their own environment). This module never
touches the job table, workers or sockets other than the ones it is given:
it only reports to the manager.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from types import TracebackType

from .log import get_logger

log = get_logger("procsched.systemd")

LISTEN_FDS_START = 3  # the first passed fd (SD_LISTEN_FDS_START)
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux
_UNNAMED = "unknown"  # the name sd_listen_fds_with_names gives when LISTEN_FDNAMES is absent


class Notifier:
    """Sends notify messages to one socket; never raises, never blocks.

    ``address`` is written as in ``NOTIFY_SOCKET``: an absolute path, or
    ``@name`` for an abstract socket; the constructor raises ValueError for
    any other form (``from_env`` returns None instead). Each method returns
    whether the datagram was handed to the kernel (not whether the manager
    acted on it).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._target = _socket_address(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec, as Python makes every fd
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._warned = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or None when it is unset or unusable.

        With ``unset``, the variable is removed so that children do not
        inherit it (with ``NotifyAccess=main`` the manager ignores them anyway).
        """
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "") if unset else env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            return cls(address)
        except (ValueError, OSError) as e:
            log.warning("systemd_notify_unusable", socket=address, error=str(e))
            return None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments as one datagram; False if it could not be sent.

        A newline inside an assignment is replaced by a space: it would
        otherwise start a new assignment.
        """
        sock = self._sock
        if sock is None:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments)
        try:
            sock.sendto(message.encode("utf-8", "replace"), self._target)
        except OSError as e:  # missing socket, refused, full queue (EAGAIN), ...
            self._failed(e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Start-up is complete: ``READY=1`` with our pid as ``MAINPID``."""
        return self.notify("READY=1", f"MAINPID={os.getpid()}", *_status(status))

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Keep-alive ping; send at least every :func:`watchdog_interval` seconds."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """Shutdown has begun (draining)."""
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self, status: str = "") -> bool:
        """A reload has begun; the manager considers it done at :meth:`reloaded`.

        ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` in µs) lets a manager that
        sent the reload signal itself (``Type=notify-reload``) match this
        message to its request.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *_status(status))

    def reloaded(self, status: str = "") -> bool:
        """The reload is complete: ``READY=1`` again."""
        return self.notify("READY=1", *_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start or stop timeout (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def close(self) -> None:
        """Close the socket; later sends do nothing and return False."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _failed(self, error: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("systemd_notify_failed", socket=self.address, error=str(error), later="not logged")


def _status(text: str) -> tuple[str, ...]:
    return (f"STATUS={text}",) if text else ()


def _socket_address(address: str) -> bytes:
    """``NOTIFY_SOCKET``'s value as an ``AF_UNIX`` address; ValueError if unsupported."""
    if address.startswith("@"):
        raw = b"\0" + address[1:].encode()
    elif address.startswith("/"):
        raw = os.fsencode(address)
    else:  # relative paths are refused by systemd too; vsock: addresses are not supported here
        raise ValueError(f"unsupported notify socket address {address!r}")
    if not 2 <= len(raw) <= _SUN_PATH_MAX:
        raise ValueError(f"notify socket address {address!r} has an invalid length")
    return raw


def watchdog_interval(environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when off.

    None as well when ``WATCHDOG_PID`` is set to another process: the
    watchdog is then someone else's (we inherited the variables).
    """
    env = os.environ if environ is None else environ
    usec = _positive_int(env.get("WATCHDOG_USEC", ""))
    if usec is None:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and _positive_int(owner) != (os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000


def listen_fds(environ: MutableMapping[str, str] | None = None, *, pid: int | None = None) -> list[socket.socket]:
    """The sockets passed by socket activation, in order (see :func:`listen_fds_with_names`)."""
    return [sock for _, sock in listen_fds_with_names(environ, pid=pid)]


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
) -> list[tuple[str, socket.socket]]:
    """Adopt the passed sockets as ``(name, socket)`` pairs; [] when none are for us.

    The fds ``3 .. 3 + LISTEN_FDS - 1`` are ours only when ``LISTEN_PID`` is
    our pid. Each becomes a ``socket.socket`` whose family and type are read
    from the fd, set close-on-exec, blocking mode as passed. Names come from
    ``LISTEN_FDNAMES`` (``unknown`` when absent). An fd that is not a socket
    (a FIFO, say) is skipped with a warning. The ``LISTEN_*`` variables are
    removed in every case, so children neither see nor claim the fds.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, "") for name in LISTEN_VARS}
    if _positive_int(values["LISTEN_PID"]) != (os.getpid() if pid is None else pid):
        return []
    count = _positive_int(values["LISTEN_FDS"]) or 0
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    if len(names) != count:
        names = [_UNNAMED] * count
    adopted = []
    for offset, name in enumerate(names):
        sock = _adopt(LISTEN_FDS_START + offset, name)
        if sock is not None:
            adopted.append((name, sock))
    return adopted


def _adopt(fd: int, name: str) -> socket.socket | None:
    try:
        os.set_inheritable(fd, False)  # FD_CLOEXEC: workers must not hold the listening socket
        sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
    except OSError as e:
        log.warning("systemd_listen_fd_skipped", fd=fd, name=name, error=str(e))
        return None
    sock.setblocking(os.get_blocking(fd))  # keep the fd's mode, and make Python's view agree
    return sock


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """Whether we were started by systemd (``INVOCATION_ID`` or ``JOURNAL_STREAM`` set)."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


def _positive_int(text: str) -> int | None:
    """A decimal ``text`` greater than 0, strictly (no sign, spaces or underscores), else None."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None
