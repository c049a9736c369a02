"""The local backend's processes: spawning, stopping, reaping, respawning.

``Processes`` is a part of :class:`~procsched.backends.local.LocalBackend`
kept in a module of its own (a mixin: the same object, the supervisor's
loop thread). It owns each worker's life: spawn (fork+exec of a fresh
interpreter that imports only what a worker needs, with its fds passed
explicitly, rather than ``multiprocessing``'s or loky's start, which cannot
pass them and cost an import of their own), the death sentinel (a pidfd),
reaping (the runs a dead worker held come back as ``Lost`` or
``Returned``), kill in steps (SIGTERM, a bounded grace, SIGKILL), respawn
with backoff and the degraded flag when workers keep dying at boot,
retirement (``max_tasks_per_child``, memory caps, a smaller pool) and the
pool's stop.

A worker is given this process's ``multiprocessing`` authkey, as
``multiprocessing``'s own children inherit it, so that a ``Manager``'s
queue or dict passed to a job connects back (see ``worker._Authkey``).
"""

from __future__ import annotations

import multiprocessing.process
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import joblog
from ..errors import MemoryLimitExceeded, WorkerCrashed, describe_exit
from ..ipc.doorbell import Doorbell
from ..futures import BrokenPool
from ..ipc.ring import IN_INITIALIZER, W_OUT_BELL, W_STARTED, W_STOP, Channel
from ..log import get_logger
from . import Broken, Event, Lost, Returned

if TYPE_CHECKING:
    from ..model import PoolConfig

log = get_logger("procsched.workers")

BOOTING, READY, RETIRING, DEAD = "booting", "ready", "retiring", "dead"
# argv[1] is the boot config, argv[2] the directory procsched is imported from
# here, so the worker finds the same package whatever its default path holds.
_BOOT_CMD = "import sys; sys.path.insert(0, sys.argv[2]); from procsched.worker import main; main()"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Slot:
    """One worker position; its process comes and goes."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = DEAD
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.ch: Channel | None = None
        self.bell: Doorbell | None = None
        self.sentinel = -1
        self.death_w = -1
        self.outstanding: deque[int] = deque()  # dispatched, no outcome yet, in run order
        self.head_since = 0.0  # when the first of them began (about: when the one before it ended)
        self.stolen: set[int] = set()  # taken back from behind a long job; the worker returns them unrun
        self.track: set[int] = set()  # jobs whose start the supervisor wants to hear of
        self.done = 0  # jobs finished by this process
        self.booted_at = 0.0
        self.kill_at = 0.0  # SIGKILL after this (0: none pending)
        self.killing: dict[int, str] = {}  # job id -> why we are killing its worker
        self.recalling = False
        self.yield_deadline = 0.0
        self.yield_job = 0
        self.respawn_at = 0.0
        self.last_rss = 0
        self.surplus = False  # the pool shrank: retire it, and do not replace it

    @property
    def idle(self) -> bool:
        return self.state == READY and not self.outstanding and not self.recalling


class Processes:
    # the backend's, declared for the type checker
    config: PoolConfig
    prefix: str
    sup_bell: Doorbell
    lent_bell: Doorbell
    lend_poller: Any
    lent: int
    slots: list[_Slot]
    by_job: dict[int, _Slot]
    by_sentinel: dict[int, _Slot]
    events: list[Event]
    poller: Any
    log_dir: str
    log_jobs: dict[int, int] | None
    boot_failures: int
    init: bytes
    restarts: int
    closing: bool
    next_memory_check: float

    if TYPE_CHECKING:

        def _drain(self, slot: _Slot, now: float) -> None: ...
        def _recall(self, slot: _Slot) -> None: ...

    def spawn_all(self, now: float) -> None:
        for slot in self.slots:
            self.spawn(slot, now)

    def spawn(self, slot: _Slot, now: float) -> None:
        cfg = self.config
        ch = Channel.create(cfg.ring_bytes)
        bell = Doorbell.create()
        death_r, death_w = os.pipe()
        # This process's multiprocessing authkey, down the death pipe before anything else (not
        # in argv, which anyone may read): a Manager's proxy passed to a job authenticates with it.
        key = bytes(multiprocessing.process.current_process().authkey)
        if len(key) > 4096:  # (32 bytes unless someone set one: past a pipe's atomic write, none)
            key = b""
        os.write(death_w, struct.pack("<H", len(key)) + key)
        boot = {
            "channel": ch.fd,
            "size": ch.size,
            "bell": [bell.read_fd, bell.write_fd],
            "sup_bells": [self.sup_bell.write_fd, self.lent_bell.write_fd],
            "death": death_r,
            "parent": os.getpid(),
            "index": slot.index,
            "prefix": self.prefix,
            "path": sys.path,
            "soft_rss": cfg.max_memory or 0,
            "spin_s": cfg.idle_spin,
            "log_dir": self.log_dir,
            "log_bytes": cfg.log_bytes,
            "init": self.init,
        }
        ch.words[W_OUT_BELL] = self.lent
        fds = (ch.fd, *bell.fds(), self.sup_bell.write_fd, self.lent_bell.write_fd, death_r)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT_CMD, pickle.dumps(boot).hex(), _ROOT],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a kill reaches what the job started
            )
        except OSError as e:
            os.close(death_r)
            os.close(death_w)
            ch.close()
            bell.close()
            log.error("worker_spawn_failed", worker=slot.index, error=str(e))
            self._boot_failed(slot, now)
            return
        os.close(death_r)
        previous = slot.pid
        slot.proc, slot.pid, slot.ch, slot.bell, slot.death_w = proc, proc.pid, ch, bell, death_w
        slot.state, slot.booted_at, slot.done = BOOTING, now, 0
        slot.kill_at, slot.killing, slot.recalling, slot.yield_job = 0.0, {}, False, 0
        slot.stolen = set()
        slot.sentinel = os.pidfd_open(proc.pid)
        self.by_sentinel[slot.sentinel] = slot
        self.poller.register(slot.sentinel, select.POLLIN)
        self.lend_poller.register(slot.sentinel, select.POLLIN)
        if previous:
            log.info("worker_respawned", worker=slot.index, pid=proc.pid, previous=previous)
        else:
            log.debug("worker_spawned", worker=slot.index, pid=proc.pid)

    def _boot_failed(self, slot: _Slot, now: float) -> None:
        self.boot_failures += 1
        delay = min(self.config.respawn_backoff * 2 ** (self.boot_failures - 1), self.config.respawn_backoff_max)
        slot.state, slot.respawn_at = DEAD, now + delay
        if self.boot_failures >= 3:
            log.warning("pool_degraded", worker=slot.index, boot_failures=self.boot_failures, retry_in=round(delay, 3))

    @property
    def degraded(self) -> bool:
        return self.boot_failures >= 3

    def _reap(self, slot: _Slot, now: float) -> None:
        """The worker's process has exited: settle its jobs, then respawn."""
        assert slot.proc is not None and slot.ch is not None
        self._drain(slot, now)  # outcomes it published before dying still count
        self._signal(slot, signal.SIGKILL)  # what its jobs started goes with it (not yet reaped: safe)
        code = slot.proc.wait()
        started = slot.ch.words[W_STARTED]
        booting = slot.state == BOOTING
        stopped = slot.state == RETIRING and not slot.outstanding and code == 0
        if stopped:
            log.debug("worker_exited", worker=slot.index, pid=slot.pid, exitcode=code)
        else:  # runs are the backend's ids; the supervisor logs each job's fate by job id
            killed_for = sorted(set(slot.killing.values()))
            (log.info if killed_for else log.warning)(
                "worker_killed" if killed_for else "worker_died",
                worker=slot.index,
                pid=slot.pid,
                exit=describe_exit(code),
                killed_for=killed_for or None,
                runs=list(slot.outstanding)[:3] or None,
            )
        logs = self.log_jobs
        for job_id in slot.outstanding:
            self.by_job.pop(job_id, None)
            job = logs.pop(job_id, 0) if logs is not None else 0
            if job_id == started:
                if job:  # its worker died before it could cap the job's log
                    joblog.cap_path(joblog.log_path(self.log_dir, job), self.config.log_bytes)
                why = slot.killing.get(job_id, "")
                err = self._crash_error(slot, code, why)
                self.events.append(Lost(job_id, err, why))
            else:
                self.events.append(Returned(job_id))
        slot.outstanding.clear()
        slot.track.clear()
        slot.stolen.clear()
        self._close(slot)
        if self.closing:
            slot.state = DEAD
            return
        if slot.surplus:  # the pool shrank: this one leaves
            slot.state = DEAD
            self.slots.remove(slot)
            return
        if booting and started == IN_INITIALIZER:  # died in the pool's initializer: as if it raised
            log.error("worker_died_in_initializer", worker=slot.index, pid=slot.pid, exit=describe_exit(code))
            slot.state = DEAD
            self._broken(BrokenPool(f"a worker died in the pool's initializer with {describe_exit(code)}"))
        elif booting:
            log.error("worker_boot_failed", worker=slot.index, pid=slot.pid, exitcode=code)
            self._boot_failed(slot, now)
        else:
            if not stopped:
                self.restarts += 1
            slot.state, slot.respawn_at = DEAD, now

    def _broken(self, error: BaseException) -> None:
        """No run can ever start (the pool's initializer raised, or a worker died in it): said
        once, and no worker starts again (the supervisor fails every job, then closes)."""
        if not self.closing:
            self.closing = True
            self.events.append(Broken(error))

    def _crash_error(self, slot: _Slot, code: int | None, why: str) -> WorkerCrashed:
        limit = self.config.max_memory_hard or 0
        if why == "memory":
            return MemoryLimitExceeded(slot.last_rss, limit, slot.pid)
        return WorkerCrashed(code, slot.pid)

    def _close(self, slot: _Slot) -> None:
        if slot.sentinel >= 0:
            self.poller.unregister(slot.sentinel)
            self.lend_poller.unregister(slot.sentinel)
            self.by_sentinel.pop(slot.sentinel, None)
            os.close(slot.sentinel)
            slot.sentinel = -1
        for fd in (slot.death_w,):
            if fd >= 0:
                os.close(fd)
        slot.death_w = -1
        if slot.ch is not None:
            slot.ch.close()
            slot.ch = None
        if slot.bell is not None:
            slot.bell.close()
            slot.bell = None
        slot.proc = None

    def _signal(self, slot: _Slot, sig: int) -> None:
        """Signal the worker and every process its job started (its process group).

        Only while the worker is unreaped, so its pid (the group's id) cannot
        have been reused by anyone else.
        """
        if slot.proc is not None and slot.proc.returncode is None:
            try:
                os.killpg(slot.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, job_id: int, reason: str, now: float) -> bool:
        """Stop the worker that runs ``job_id``: SIGTERM now, SIGKILL after the grace."""
        slot = self.by_job.get(job_id)
        if slot is None or slot.proc is None:
            return False
        self._kill_slot(slot, reason, now, job_id)
        return True

    def _kill_slot(self, slot: _Slot, reason: str, now: float, job_id: int = 0, sig: int = signal.SIGTERM) -> None:
        if job_id:
            slot.killing[job_id] = reason
        if slot.state != DEAD:
            slot.state = RETIRING
        log.info("worker_kill", worker=slot.index, pid=slot.pid, run=job_id or None, reason=reason)
        assert slot.ch is not None
        slot.ch.words[W_STOP] = 1
        self._signal(slot, sig)
        if sig != signal.SIGKILL and not slot.kill_at:
            slot.kill_at = now + self.config.kill_grace

    def resize(self, workers: int, now: float) -> None:
        """Grow at once; shrink by retiring the surplus workers (the job each runs finishes,
        the ones queued on it go elsewhere), which then leave the pool."""
        live = [s for s in self.slots if not s.surplus]
        for slot in live[workers:]:
            slot.surplus = True
            self.retire(slot)  # (a booting one is retired by tick() once it is ready)
        for slot in [s for s in self.slots if s.surplus][: max(0, workers - len(live))]:
            slot.surplus = False  # shrunk, then grown again before it left: replaced as a recycled worker is
        while sum(1 for s in self.slots if not s.surplus) < workers:
            slot = _Slot(max((s.index for s in self.slots), default=-1) + 1)
            self.slots.append(slot)
            self.spawn(slot, now)

    def retire(self, slot: _Slot) -> None:
        """Take no more jobs on this worker; stop it once its queue is empty."""
        if slot.state != READY:
            return
        slot.state = RETIRING
        if slot.outstanding:
            self._recall(slot)  # its unbegun jobs go elsewhere
        else:
            self._stop(slot)

    def _stop(self, slot: _Slot) -> None:
        assert slot.ch is not None and slot.bell is not None
        slot.ch.words[W_STOP] = 1
        slot.bell.ring()
        if not slot.kill_at:
            slot.kill_at = time.monotonic() + self.config.kill_grace + 1.0

    def _check_memory(self, now: float) -> None:
        limit = self.config.max_memory_hard
        assert limit
        for s in self.slots:
            if s.state in (READY, RETIRING) and s.pid and not s.killing:
                used = rss(s.pid)
                if used > limit:
                    s.last_rss = used
                    job = s.outstanding[0] if s.outstanding else 0
                    log.warning("worker_memory_exceeded", worker=s.index, pid=s.pid, run=job or None, rss=used, limit=limit)
                    self._kill_slot(s, "memory", now, job, sig=signal.SIGKILL)

    def close(self, deadline: float) -> None:
        """Stop every worker: ask, wait until ``deadline``, then SIGKILL; reap all."""
        self.closing = True
        for s in self.slots:
            if s.ch is not None and s.bell is not None:
                s.ch.words[W_STOP] = 1
                s.bell.ring()
        for s in self.slots:
            if s.proc is None:
                continue
            ms = max(0, int((deadline - time.monotonic()) * 1000))
            exited: list[tuple[int, int]] = []
            if s.sentinel >= 0:  # poll, not select: a pidfd may be numbered past FD_SETSIZE
                waiter = select.poll()
                waiter.register(s.sentinel, select.POLLIN)
                exited = waiter.poll(ms)
            # SIGKILL to the group either way: a worker past the deadline, and
            # whatever its jobs started. It is still unreaped, so the id is ours.
            self._signal(s, signal.SIGKILL)
            if not exited:
                log.warning("worker_kill_at_shutdown", worker=s.index, pid=s.pid)
            s.proc.wait()
            self._close(s)
            s.state = DEAD
        self.poller.unregister(self.sup_bell.read_fd)
        self.lend_poller.unregister(self.lent_bell.read_fd)


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
