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
  to respawn, memory to sample, and jobs prefetched behind a long one to take
  back while a worker idles (``_steal``);
* ``lend(lent)``: which supervisor doorbell the workers ring (``lending.py``).

With the pool's ``log_dir`` set, it makes the directory, tells each worker
where jobs' output goes (the worker redirects it, see ``joblog.py``), and caps
the log of a job whose worker died under it, which the worker could not.

It owns the processes too (spawn, reap, kill in steps, respawn with backoff,
retire; ``processes.py``, the same object's other half). It never decides
a job's fate: it reports, and the supervisor applies its policy.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Iterable
from typing import Any

from ..errors import rebuild
from ..futures import BrokenPool, EncodedError, describe
from ..ipc import frames, oob
from ..ipc.doorbell import Doorbell
from ..ipc.ring import W_OUT_BELL, W_RECALL, W_STARTED, W_YIELD, fence
from ..log import get_logger
from ..model import PoolConfig
from . import Event, JobLength, Result, Returned, Started
from .processes import BOOTING, DEAD, READY, RETIRING, Processes, _Slot, rss

log = get_logger("procsched.workers")
_NONE: list[memoryview] = []  # a result's out-of-band buffers when it has none (shared, never changed)
new, PREEMPTED = frames.new, frames.PREEMPTED  # (per outcome: a global, not an attribute)



class LocalBackend(Processes):
    lendable = True  # a waiting caller may run the supervisor's loop (``lending.py``)

    def __init__(self, config: PoolConfig, prefix: str, sup_bell: Doorbell, lent_bell: Doorbell, init: bytes = b"") -> None:
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
        self.length = JobLength()  # what the prefetch follows
        self.boot_failures = 0
        self.restarts = 0
        self.spills = 0
        self.closing = False
        self.next_memory_check = 0.0
        self.poller = select.poll()
        self.poller.register(sup_bell.read_fd, select.POLLIN)
        # While the loop is lent, its borrower sleeps in a poll of its own: the lent
        # doorbell and the same pidfds. ``lent`` is what each channel's W_OUT_BELL holds.
        self.lent_bell = lent_bell
        self.lend_poller = select.poll()
        self.lend_poller.register(lent_bell.read_fd, select.POLLIN)
        self.lent = 0
        self.by_sentinel: dict[int, _Slot] = {}
        # The initializer's pickle, in a segment each worker maps as it starts (the pool's
        # prefix: the loop's end sweeps it away with the rest).
        self.init = oob.write(f"{prefix}init", [init]) if init else b""

    @property
    def capacity(self) -> int:
        return self.config.max_workers

    # -- dispatch -------------------------------------------------------------
    def _limit(self) -> int:
        return 1 + self.length.ahead(self.config, self.config.max_prefetch)

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

    def coming_free(self) -> int:
        """Workers with nothing placed on them that are not idle yet: starting (again, after a
        kill or a crash; not while starts keep failing), or waiting for the end of a recall."""
        coming = (BOOTING, READY) if self.degraded else (BOOTING, READY, DEAD)
        return sum(1 for s in self.slots if not s.outstanding and not s.idle and s.state in coming and not s.surplus)

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
        if was_idle:
            slot.head_since = time.monotonic()
            if slot.state == READY and slot.outstanding[0] in slot.track:
                self.events.append(Started(slot.outstanding[0], slot.head_since))
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
        if slot is None or slot.ch is None:
            return False
        slot.ch.words[W_YIELD] = job_id
        slot.yield_job = job_id
        slot.yield_deadline = now + kill_after if kill_after is not None else 0.0
        if not slot.recalling:  # (its prefetch goes elsewhere; a recall already asked for does that)
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

        True: it comes back unrun, reported returned at once with every job queued
        behind the one its worker is inside (``_steal``). None: its worker may be
        between jobs and begin it first; its run's end (``Returned`` or an outcome)
        tells. False: it has begun.
        """
        slot = self.by_job.get(job_id)
        if slot is None:  # taken back from behind a long job: reported returned already
            return any(job_id in s.stolen for s in self.slots)
        if slot.ch is None or slot.bell is None or slot.ch.words[W_STARTED] == job_id:
            return False
        return True if self._steal(slot) and job_id in slot.stolen else None

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

    def spin_for(self) -> float:
        """How long a borrower of the loop may watch the rings before it sleeps: ``idle_spin``
        while jobs are known to take less than that, else nothing (a long job's outcome is
        not worth the CPU, nor the GIL held meanwhile)."""
        length = self.length.seconds
        spin = self.config.idle_spin
        return spin if length is not None and length < spin else 0.0

    def watch(self, until: float, intake: Any, poller: Any = None) -> list[tuple[int, int]] | None:
        """Watch the rings of the busy workers until ``until`` (monotonic), or until one has
        an outcome or ``intake`` has a post; with a ``poller``, also until it reports an fd
        ready (a client's socket). None if nothing came, else what the poller saw. A worker
        whose job has run longer than the watch will last is not worth watching."""
        since = time.monotonic() - self.config.idle_spin
        rings = [s.ch.outbound for s in self.slots if s.outstanding and s.ch is not None and s.head_since >= since]
        if not rings and poller is None:
            return None
        clock = time.monotonic
        while clock() < until:
            for ring in rings:
                if ring.has_data():
                    return []
            if intake:
                return []
            if poller is not None:
                ready = poller.poll(0)
                if ready:
                    return ready  # type: ignore[no-any-return]
        return None

    def lend(self, lent: bool) -> None:
        """Have workers ring the lent doorbell (``True``) or the loop thread's."""
        self.lent = int(lent)
        for slot in self.slots:
            if slot.ch is not None:
                slot.ch.words[W_OUT_BELL] = self.lent

    def _drain(self, slot: _Slot, now: float) -> None:
        """What the worker wrote since the last look: its hello (its first frame), and its
        outcomes, in one ``_outcomes`` call however many frames they came in (a worker
        writes a frame per job, and the call's own cost is most of a small job's)."""
        assert slot.ch is not None
        chunk, spans = slot.ch.outbound.read()
        batch: list[frames.Outcome] = []
        error: Exception | None = None
        try:
            for start, end in spans:
                frame, start, end, k = frames.unspill(chunk, start, end)
                if k == frames.OUTCOMES:
                    batch += frames.decode_outcomes(frame, start, end)
                elif k == frames.HELLO:
                    self._hello(slot, frames.decode_hello(frame[start:end]))
                elif k == frames.INIT_FAILED:
                    self._init_failed(slot, frame[start + 1 : end])
                else:
                    raise ValueError(f"unknown frame kind {k}")
        except (ValueError, OSError) as e:
            error = e
        try:
            if batch:  # (the outcomes before a bad frame count all the same)
                self._outcomes(slot, batch, now)
        except ValueError as e:
            error = error or e
        if error is not None:  # a worker that writes garbage is broken
            log.error("worker_protocol_error", worker=slot.index, pid=slot.pid, error=str(error))
            self._kill_slot(slot, "protocol", now, sig=signal.SIGKILL)

    def _hello(self, slot: _Slot, pid: int) -> None:
        if slot.state == BOOTING:
            slot.state = READY
            if self.boot_failures >= 3:
                log.info("pool_recovered", worker=slot.index)
            self.boot_failures = 0
            log.debug("worker_ready", worker=slot.index, pid=pid, boot_ms=round((time.monotonic() - slot.booted_at) * 1e3, 1))
            slot.head_since = time.monotonic()
            if slot.outstanding and slot.outstanding[0] in slot.track:  # its clock starts now, not at dispatch
                self.events.append(Started(slot.outstanding[0], slot.head_since))

    def _init_failed(self, slot: _Slot, error: bytes) -> None:
        """The worker's initializer raised: every worker would fail the same way, so no job can
        run (the supervisor fails them all, as a broken ``ProcessPoolExecutor`` does)."""
        try:
            what, tb = describe(EncodedError(error)), frames.decode_error(error)[2]
        except Exception:  # (struct.error, UnicodeDecodeError ...): broken all the same
            what, tb = "an error that could not be read", ""
        log.error("initializer_failed", worker=slot.index, pid=slot.pid, error=what)
        self._broken(rebuild(BrokenPool(f"a worker's initializer raised {what}"), tb))

    def _outcomes(self, slot: _Slot, outcomes: list[frames.Outcome], now: float) -> None:
        events = self.events
        out = slot.outstanding
        logs = self.log_jobs
        ran = ended = 0
        for o in outcomes:
            status = o.status
            if status <= PREEMPTED:  # OK, ERROR, PREEMPTED: the job left this worker
                if not out or out[0] != o.job_id:
                    raise ValueError(f"outcome for job {o.job_id} out of order")
                out.popleft()
                self.by_job.pop(o.job_id, None)  # (_forget, inline: this runs once per job)
                if logs is not None:
                    logs.pop(o.job_id, None)
                ran += o.run_us
                ended += 1
                buffers = oob.read(o.oob, unlink_now=True) if o.oob else _NONE
                # A job that finished before our kill landed is reported all the
                # same: the supervisor knows whether it still wants the outcome.
                if slot.killing:
                    slot.killing.pop(o.job_id, None)
                events.append(new(Result, (o.job_id, status, o.run_us, o.payload, buffers)))
                if status == PREEMPTED:
                    slot.yield_job, slot.yield_deadline = 0, 0.0
                if slot.track:  # (runs with a timeout: the next one's clock starts now)
                    slot.track.discard(o.job_id)
                    if out and out[0] in slot.track:
                        events.append(Started(out[0], now))
            elif status == frames.RETURNED:
                if o.job_id in slot.stolen:  # reported returned when it was taken back
                    slot.stolen.discard(o.job_id)
                elif o.job_id:
                    out.remove(o.job_id)
                    self._forget(slot, o.job_id)
                    events.append(Returned(o.job_id))
                else:
                    slot.recalling = False
                    assert slot.ch is not None
                    if slot.yield_job and slot.yield_job not in out:
                        slot.yield_job, slot.yield_deadline = 0, 0.0
            elif status == frames.CHECKPOINT:
                buffers = oob.read(o.oob, unlink_now=True) if o.oob else _NONE
                events.append(Result(o.job_id, status, 0, o.payload, buffers))
            elif status == frames.RECYCLE:
                log.info("worker_recycle", worker=slot.index, pid=slot.pid, reason="memory")
                self.retire(slot)
        if ended:
            slot.done += ended
            slot.head_since = now
            self.length.observe(ran // ended, ended)
        if slot.state == RETIRING and not out and slot.ch is not None and not slot.killing:
            self._stop(slot)
        elif self.config.max_tasks_per_child and slot.done >= self.config.max_tasks_per_child and slot.state == READY:
            self.retire(slot)

    # -- jobs stuck behind a long one ----------------------------------------------
    def _steal_after(self) -> float:
        """How long a job may run before the jobs queued behind it go to an idle worker: the
        prefetch's horizon, or a few times what a job takes."""
        return max(self.config.prefetch_s, 4 * (self.length.seconds or 0.0))

    def _stuck(self, slot: _Slot) -> bool:
        return len(slot.outstanding) > 1 and slot.state == READY

    def _steal(self, slot: _Slot) -> bool:
        """Take back the jobs queued behind the one ``slot`` runs; whether they are back.

        A recall (made here unless one is pending) has the worker return every
        job it has not begun once its current one ends. If it is inside the
        job at the head now (its ``W_STARTED`` word, read after the recall is
        written), none of the others can begin first, so they are reported
        returned at once and run elsewhere; the worker's own returns of them
        are ignored later (``stolen``). Otherwise it may be between jobs, and
        its answer to the recall brings them back, as for a retirement.
        """
        assert slot.ch is not None
        if not slot.outstanding:
            return False
        head = slot.outstanding[0]
        if not slot.recalling:
            self._recall(slot)
        fence()  # (the recall visible before W_STARTED is read; the worker fences the other way)
        if slot.ch.words[W_STARTED] != head:
            return False
        slot.outstanding.popleft()
        behind = list(slot.outstanding)
        slot.outstanding.clear()
        slot.outstanding.append(head)
        for rid in behind:
            self._forget(slot, rid)
            slot.stolen.add(rid)
        self.events += [Returned(rid) for rid in behind]
        if behind:
            log.debug("prefetch_taken_back", worker=slot.index, runs=len(behind))
        return True

    def _forget(self, slot: _Slot, rid: int) -> None:
        """A run that has left ``slot`` (returned, taken back, or its worker gone)."""
        self.by_job.pop(rid, None)
        if self.log_jobs is not None:
            self.log_jobs.pop(rid, None)
        slot.track.discard(rid)

    # -- time -----------------------------------------------------------------
    def next_deadline(self) -> float:
        best = float("inf")
        idle = False
        for s in self.slots:
            if s.kill_at:
                best = min(best, s.kill_at)
            if s.yield_deadline:
                best = min(best, s.yield_deadline)
            if s.state == DEAD and not self.closing:
                best = min(best, s.respawn_at)
            idle = idle or s.idle
        if idle:  # when a job queued behind a long one should move to an idle worker
            after = self._steal_after()
            for s in self.slots:
                if self._stuck(s):
                    best = min(best, s.head_since + after)
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
        if any(s.idle for s in self.slots):  # (dispatch has run: the queue has nothing for them)
            after = self._steal_after()
            for s in self.slots:
                if self._stuck(s) and now - s.head_since >= after:
                    self._steal(s)
        if self.config.max_memory_hard and now >= self.next_memory_check:
            self.next_memory_check = now + self.config.memory_check_interval
            self._check_memory(now)

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

