"""The local backend: worker processes, their channels, and their deaths.

The supervisor talks to execution through a small seam (``backends.Backend``),
so that another engine can stand behind it. This module is the local
implementation:

* ``headroom()`` / ``start(dispatches)``: place jobs on workers, each up to
  its prefetch limit (adaptive: enough queued work to cover ``prefetch_s``
  at the measured job duration, never more than ``max_prefetch``);
* ``start_hot(dispatch)``: place a job only on a worker with nothing queued;
* ``request_yield(job_id, kill_after)``: cooperative preemption, and a kill
  if the job does not yield in time;
* ``kill(job_id, reason)``: stop the worker running a job (timeout, cancel);
* ``collect(now)``: outcomes, job starts, lost and returned jobs, since the
  last call; ``tick(now)`` / ``next_deadline()``: kills to escalate, workers
  to respawn, memory to sample.

With the pool's ``log_dir`` set, it makes the directory, tells each worker
where jobs' output goes (the worker redirects it, see ``joblog.py``), and caps
the log of a job whose worker died under it, which the worker could not.

It owns the processes: spawn (fork+exec of a fresh interpreter that imports
only what a worker needs, with its fds passed explicitly, rather than
``multiprocessing``'s or loky's start, which cannot pass them and cost an
import of their own), the death sentinel (a pidfd), reaping, kill in steps
(SIGTERM, a bounded grace, SIGKILL), respawn with backoff, and the
degraded flag when workers keep dying at boot. It never decides a job's
fate: it reports, and the supervisor applies its policy.
"""

from __future__ import annotations

import pickle
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .. import joblog
from ..errors import MemoryLimitExceeded, WorkerCrashed, describe_exit
from ..ipc import frames, oob
from ..ipc.doorbell import Doorbell
from ..ipc.ring import W_RECALL, W_STARTED, W_STOP, W_YIELD, Channel
from ..log import get_logger
from ..model import PoolConfig
from . import Event, Lost, Result, Returned, Started

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


class LocalBackend:
    def __init__(self, config: PoolConfig, prefix: str, sup_bell: Doorbell) -> None:
        # Absolute: a worker's directory is the caller's when it starts, not later.
        self.log_dir = os.path.abspath(config.log_dir) if config.log_dir else ""
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)  # first: a bad directory fails the pool's constructor
        #: run id -> job id, of the runs placed on a worker (only with a log_dir: they name the logs)
        self.log_jobs: dict[int, int] | None = {} if self.log_dir else None
        self.config = config
        self.prefix = prefix
        self.sup_bell = sup_bell
        self.slots = [_Slot(i) for i in range(config.max_workers)]
        self.by_job: dict[int, _Slot] = {}
        self.events: list[Event] = []
        # Running estimate of a job's duration, from the jobs seen to finish.
        # Until one has, nothing is prefetched: an unknown job may be long, and
        # a job queued behind it on one worker would wait while another is free.
        self.ewma_s: float | None = None
        self.boot_failures = 0
        self.restarts = 0
        self.spills = 0
        self.closing = False
        self.next_memory_check = 0.0
        self.poller = select.poll()
        self.poller.register(sup_bell.read_fd, select.POLLIN)
        self.by_sentinel: dict[int, _Slot] = {}

    # -- processes ------------------------------------------------------------
    def spawn_all(self, now: float) -> None:
        for slot in self.slots:
            self.spawn(slot, now)

    def spawn(self, slot: _Slot, now: float) -> None:
        cfg = self.config
        ch = Channel.create(cfg.ring_bytes)
        bell = Doorbell.create()
        death_r, death_w = os.pipe()
        boot = {
            "channel": ch.fd,
            "size": ch.size,
            "bell": [bell.read_fd, bell.write_fd],
            "sup_bell": self.sup_bell.write_fd,
            "death": death_r,
            "parent": os.getpid(),
            "index": slot.index,
            "prefix": self.prefix,
            "path": sys.path,
            "soft_rss": cfg.max_memory or 0,
            "log_dir": self.log_dir,
            "log_bytes": cfg.log_bytes,
        }
        fds = (ch.fd, *bell.fds(), self.sup_bell.write_fd, death_r)
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
        slot.sentinel = os.pidfd_open(proc.pid)
        self.by_sentinel[slot.sentinel] = slot
        self.poller.register(slot.sentinel, select.POLLIN)
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
        self._close(slot)
        if self.closing:
            slot.state = DEAD
            return
        if slot.surplus:  # the pool shrank: this one leaves
            slot.state = DEAD
            self.slots.remove(slot)
            return
        if booting:
            log.error("worker_boot_failed", worker=slot.index, pid=slot.pid, exitcode=code)
            self._boot_failed(slot, now)
        else:
            if not stopped:
                self.restarts += 1
            slot.state, slot.respawn_at = DEAD, now

    def _crash_error(self, slot: _Slot, code: int | None, why: str) -> WorkerCrashed:
        limit = self.config.max_memory_hard or 0
        if why == "memory":
            return MemoryLimitExceeded(slot.last_rss, limit, slot.pid)
        return WorkerCrashed(code, slot.pid)

    def _close(self, slot: _Slot) -> None:
        if slot.sentinel >= 0:
            self.poller.unregister(slot.sentinel)
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

    # -- dispatch -------------------------------------------------------------
    def _limit(self) -> int:
        cfg = self.config
        if self.ewma_s is None:
            return 1
        extra = int(cfg.prefetch_s / max(self.ewma_s, 1e-5))
        return 1 + max(0, min(extra, cfg.max_prefetch))

    def _room(self, slot: _Slot, limit: int) -> int:
        """Jobs ``slot`` may take now: its prefetch, within what is left of its task budget.

        A worker runs its prefetched jobs before the supervisor can retire it,
        so ``max_tasks_per_child`` is kept by never handing it more.
        """
        room = limit - len(slot.outstanding)
        if slot.ch is not None and slot.ch.inbound.free() < slot.ch.inbound.max_frame:
            return 0  # the ring is nearly full: more would not fit until the worker drains it
        if self.config.max_tasks_per_child:
            room = min(room, self.config.max_tasks_per_child - slot.done - len(slot.outstanding))
        return max(0, room)

    def headroom(self, booting: bool = False) -> int:
        limit = self._limit()
        return sum(self._room(s, limit) for s in self.slots if _accepting(s, booting))

    def idle_workers(self) -> int:
        return sum(1 for s in self.slots if s.idle)

    def start(self, dispatches: list[frames.Dispatch], track: Iterable[int] = (), booting: bool = False) -> None:
        """Place jobs, filling the emptiest workers first; ``len <= headroom()``."""
        limit = self._limit()
        ready = [s for s in self.slots if _accepting(s, booting)]
        ready.sort(key=lambda s: len(s.outstanding))
        tracked = set(track)
        i = 0
        n = len(dispatches)
        per = -(-n // max(1, len(ready)))
        for slot in ready:
            if i >= n:
                break
            take = min(per, self._room(slot, limit), n - i)
            if take <= 0:
                continue
            self._send(slot, dispatches[i : i + take], tracked)
            i += take
        for slot in ready:  # whatever the even split left over
            if i >= n:
                break
            take = min(self._room(slot, limit), n - i)
            if take > 0:
                self._send(slot, dispatches[i : i + take], tracked)
                i += take
        if i < n:  # rings filled as they were given jobs: the rest go back to the queue
            self._give_back(dispatches[i:])

    def _give_back(self, dispatches: list[frames.Dispatch]) -> None:
        """Jobs no worker could take: reported returned, so they go back to the queue untouched."""
        self.events += [Returned(d.job_id) for d in dispatches]

    def start_hot(self, d: frames.Dispatch, track: bool) -> bool:
        for slot in self.slots:
            if slot.idle:
                self._send(slot, [d], {d.job_id} if track else set())
                return True
        return False

    def _send(self, slot: _Slot, batch: list[frames.Dispatch], tracked: set[int]) -> None:
        assert slot.ch is not None and slot.bell is not None
        was_idle = not slot.outstanding
        ring = slot.ch.inbound
        frame = frames.encode_run(batch)
        if len(frame) > ring.max_frame or not ring.put(frame):
            if len(batch) > 1:
                half = len(batch) // 2
                self._send(slot, batch[:half], tracked)
                self._send(slot, batch[half:], tracked)
                return
            self.spills += 1
            name = f"{self.prefix}s{self.spills}"
            frame = frames.encode_spill(oob.write(name, [frame]))
            if not ring.put(frame):  # full even for a spill record: back to the queue, untouched
                oob.unlink(name)
                self._give_back(batch)
                return
        logs = self.log_jobs
        for d in batch:
            slot.outstanding.append(d.job_id)
            self.by_job[d.job_id] = slot
            if logs is not None:
                logs[d.job_id] = d.job
            if d.job_id in tracked:
                slot.track.add(d.job_id)
        if was_idle and slot.state == READY and slot.outstanding[0] in slot.track:
            self.events.append(Started(slot.outstanding[0], time.monotonic()))
        if ring.publish():
            slot.bell.ring()

    def worker_of(self, job_id: int) -> int:
        """The index of the worker a job was placed on (-1: none)."""
        slot = self.by_job.get(job_id)
        return -1 if slot is None else slot.index

    def running(self) -> dict[int, int]:
        """job id -> worker index, for the job at the head of each worker's queue."""
        return {s.outstanding[0]: s.index for s in self.slots if s.outstanding and s.state == READY}

    def request_yield(self, job_id: int, kill_after: float | None, now: float) -> bool:
        slot = self.by_job.get(job_id)
        if slot is None or slot.ch is None or slot.recalling:
            return False
        slot.ch.words[W_YIELD] = job_id
        slot.yield_job = job_id
        slot.yield_deadline = now + kill_after if kill_after is not None else 0.0
        self._recall(slot)
        log.info("preempt_requested", worker=slot.index, run=job_id, kill_after=kill_after)
        return True

    def cancel_yield(self, job_id: int) -> None:
        """The hot job found another worker: the run need not yield after all."""
        slot = self.by_job.get(job_id)
        if slot is not None and slot.ch is not None and slot.yield_job == job_id:
            slot.ch.words[W_YIELD] = 0
            slot.yield_job, slot.yield_deadline = 0, 0.0

    def withdraw(self, job_id: int) -> bool | None:
        """Take back a job placed on a worker that has not begun it (it returns as ``Returned``).

        True: it will come back unrun (the worker is inside an earlier job, and checks
        the recall before it starts the next). None: the worker is between jobs, so it
        may begin this one first; its run's end (``Returned`` or an outcome) tells.
        False: it has begun.
        """
        slot = self.by_job.get(job_id)
        if slot is None or slot.ch is None or slot.bell is None or slot.ch.words[W_STARTED] == job_id:
            return False
        self._recall(slot)
        started = slot.ch.words[W_STARTED]  # read after the recall is written
        return True if started and started != job_id else None

    def _recall(self, slot: _Slot) -> None:
        assert slot.ch is not None and slot.bell is not None
        slot.recalling = True
        slot.ch.words[W_RECALL] = slot.ch.words[W_RECALL] + 1
        slot.bell.ring()

    # -- events ---------------------------------------------------------------
    def collect(self, now: float, ready: list[tuple[int, int]]) -> list[Event]:
        """Everything that happened since the last call; ``ready`` is the loop's poll result."""
        for slot in self.slots:
            if slot.ch is not None and slot.ch.outbound.has_data():
                self._drain(slot, now)
        for fd, _ in ready:
            dead = self.by_sentinel.get(fd)
            if dead is not None:
                self._reap(dead, now)
        events, self.events = self.events, []
        return events

    def prepare_sleep(self) -> bool:
        """Announce the supervisor's sleep on every ring; ``False`` if one has data."""
        for slot in self.slots:
            if slot.ch is not None and not slot.ch.outbound.prepare_sleep():
                return False
        return not self.events

    def woke(self) -> None:
        for slot in self.slots:
            if slot.ch is not None:
                slot.ch.outbound.woke()

    def _drain(self, slot: _Slot, now: float) -> None:
        assert slot.ch is not None
        for frame in slot.ch.outbound.take():
            try:
                k = frames.kind(frame)
                if k == frames.SPILL:
                    frame = bytes(oob.read(frames.spill_descriptor(frame), unlink_now=True)[0])
                    k = frames.kind(frame)
                if k == frames.HELLO:
                    self._hello(slot, frames.decode_hello(frame))
                elif k == frames.OUTCOMES:
                    self._outcomes(slot, frames.decode_outcomes(frame), now)
                else:
                    raise ValueError(f"unknown frame kind {k}")
            except (ValueError, OSError) as e:  # a worker that writes garbage is broken
                log.error("worker_protocol_error", worker=slot.index, pid=slot.pid, error=str(e))
                self._kill_slot(slot, "protocol", now, sig=signal.SIGKILL)

    def _hello(self, slot: _Slot, pid: int) -> None:
        if slot.state == BOOTING:
            slot.state = READY
            if self.boot_failures >= 3:
                log.info("pool_recovered", worker=slot.index)
            self.boot_failures = 0
            log.debug("worker_ready", worker=slot.index, pid=pid, boot_ms=round((time.monotonic() - slot.booted_at) * 1e3, 1))
            if slot.outstanding and slot.outstanding[0] in slot.track:  # its clock starts now, not at dispatch
                self.events.append(Started(slot.outstanding[0], time.monotonic()))

    def _outcomes(self, slot: _Slot, outcomes: list[frames.Outcome], now: float) -> None:
        events = self.events
        out = slot.outstanding
        logs = self.log_jobs
        for o in outcomes:
            status = o.status
            if status <= frames.PREEMPTED:  # OK, ERROR, PREEMPTED: the job left this worker
                if not out or out[0] != o.job_id:
                    raise ValueError(f"outcome for job {o.job_id} out of order")
                out.popleft()
                self.by_job.pop(o.job_id, None)
                if logs is not None:
                    logs.pop(o.job_id, None)
                slot.track.discard(o.job_id)
                slot.done += 1
                took = max(o.run_us, 10) * 1e-6
                self.ewma_s = took if self.ewma_s is None else self.ewma_s + 0.2 * (took - self.ewma_s)
                buffers = oob.read(o.oob, unlink_now=True) if o.oob else []
                # A job that finished before our kill landed is reported all the
                # same: the supervisor knows whether it still wants the outcome.
                slot.killing.pop(o.job_id, None)
                events.append(Result(o.job_id, status, o.run_us, o.payload, buffers))
                if status == frames.PREEMPTED:
                    slot.yield_job, slot.yield_deadline = 0, 0.0
                if out and out[0] in slot.track:
                    events.append(Started(out[0], now))
            elif status == frames.RETURNED:
                if o.job_id:
                    out.remove(o.job_id)
                    self.by_job.pop(o.job_id, None)
                    if logs is not None:
                        logs.pop(o.job_id, None)
                    slot.track.discard(o.job_id)
                    events.append(Returned(o.job_id))
                else:
                    slot.recalling = False
                    assert slot.ch is not None
                    if slot.yield_job and slot.yield_job not in out:
                        slot.yield_job, slot.yield_deadline = 0, 0.0
            elif status == frames.CHECKPOINT:
                buffers = oob.read(o.oob, unlink_now=True) if o.oob else []
                events.append(Result(o.job_id, status, 0, o.payload, buffers))
            elif status == frames.RECYCLE:
                log.info("worker_recycle", worker=slot.index, pid=slot.pid, reason="memory")
                self.retire(slot)
        if slot.state == RETIRING and not out and slot.ch is not None and not slot.killing:
            self._stop(slot)
        elif self.config.max_tasks_per_child and slot.done >= self.config.max_tasks_per_child and slot.state == READY:
            self.retire(slot)

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

    # -- time -----------------------------------------------------------------
    def next_deadline(self) -> float:
        best = float("inf")
        for s in self.slots:
            if s.kill_at:
                best = min(best, s.kill_at)
            if s.yield_deadline:
                best = min(best, s.yield_deadline)
            if s.state == DEAD and not self.closing:
                best = min(best, s.respawn_at)
        if self.config.max_memory_hard:
            best = min(best, self.next_memory_check)
        return best

    def tick(self, now: float) -> None:
        for s in self.slots:
            if s.kill_at and now >= s.kill_at and s.proc is not None:
                s.kill_at = 0.0
                log.warning("worker_kill_escalated", worker=s.index, pid=s.pid)
                self._signal(s, signal.SIGKILL)
            if s.yield_deadline and now >= s.yield_deadline:
                job, s.yield_deadline = s.yield_job, 0.0
                if job in s.outstanding and s.outstanding[0] == job:
                    self._kill_slot(s, "preempt", now, job, sig=signal.SIGKILL)
            if s.state == DEAD and not self.closing and now >= s.respawn_at:
                self.spawn(s, now)
            elif s.surplus and s.state == READY:
                self.retire(s)
        if self.config.max_memory_hard and now >= self.next_memory_check:
            self.next_memory_check = now + self.config.memory_check_interval
            self._check_memory(now)

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

    # -- shutdown -------------------------------------------------------------
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

    def workers_status(self, now: float, job_of: Any) -> list[dict[str, Any]]:
        """Each worker: pid, RSS, the job it runs (``job_of(run)``: (id, name) or None), uptime."""
        out = []
        for slot in self.slots:
            current = job_of(slot.outstanding[0]) if slot.outstanding else None
            out.append({
                "index": slot.index, "pid": slot.pid or None, "state": slot.state, "rss": rss(slot.pid) if slot.pid else 0,
                "job": current[0] if current else None, "name": current[1] if current else None,
                "uptime_s": round(now - slot.booted_at, 1) if slot.pid and slot.booted_at else None, "jobs_done": slot.done,
            })  # fmt: skip
        return out

    def stats(self) -> dict[str, object]:
        return {
            "workers": [
                {"index": s.index, "pid": s.pid, "state": s.state, "queued": len(s.outstanding), "done": s.done}
                for s in self.slots
            ],
            "restarts": self.restarts,
            "degraded": self.degraded,
        }


def _accepting(slot: _Slot, booting: bool) -> bool:
    """Whether jobs may be placed on the worker now.

    Normally only on a ready one: a job placed on a booting worker would wait
    for that worker even when another one comes up first. ``booting`` also
    allows booting workers (they find the jobs in their ring when they start);
    the supervisor asks for it once, at shutdown, for the jobs submitted
    before it, as the stdlib's pool has already queued them by then.
    """
    return (slot.state == READY or (booting and slot.state == BOOTING)) and not slot.recalling


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
