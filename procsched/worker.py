"""The worker process: take a job from the inbound ring, run it, report.

Started by ``backends/local.py`` as ``python -c "...; from procsched.worker import main; main()" CONFIG ROOT``
with its channel, doorbells and death pipe as inherited fds. It is dumb on
purpose: no journal, no heap, no options, no logging. It knows only the
frames of ``ipc/frames.py`` and three words of its control block:

* ``W_STARTED``: written before each job, so that after a crash the
  supervisor knows which job was running and which were never begun;
* ``W_YIELD``: read by ``JobContext.should_yield()``;
* ``W_RECALL``: when it changes, every job not yet begun goes back
  (``RETURNED``), followed by a marker with job id 0.

A pool made with an ``initializer`` gives each worker it starts the
pickled ``(initializer, initargs)`` in a shared-memory segment; the worker
calls it before it says HELLO, and if it raises, it reports the error
(``INIT_FAILED``) and exits.

With the pool's ``log_dir`` set, each job's stdout and stderr go to the
job's own file for the job's duration (``joblog.py``); without it, nothing
is done and the output goes wherever the worker's does.

It boots in a few milliseconds because it imports only the stdlib and the
stdlib-only parts of procsched. It dies with its supervisor: on Linux by
``PR_SET_PDEATHSIG``, elsewhere when the death pipe reports a hang-up.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections import deque

from . import codec, context
from . import fastpickle as pickle  # (pickle.py itself costs a worker's boot ~10 ms)
from .errors import Preempted, SerializationError
from .ipc import frames, oob
from .ipc.doorbell import Doorbell
from .ipc.ring import IN_INITIALIZER, W_OUT_BELL, W_RECALL, W_STARTED, W_STOP, W_YIELD, Channel, fence

TYPE_CHECKING = False  # typing costs a worker ~8 ms at boot; annotations are strings anyway
if TYPE_CHECKING:
    import signal as _signal
    from typing import Any

    from .joblog import JobLog
else:
    import _signal  # the C module under signal.py, whose enums would cost a boot ~5 ms

_BACKSTOP_MS = 1000  # see ring.py: a lost wakeup costs at most this


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies.

    Called right after HELLO, so the few milliseconds of loading ctypes
    overlap the supervisor's first dispatch, and before any job runs: while a
    job runs nothing reads the death pipe, so it would outlive a killed
    supervisor. With an initializer to run, before it, for the same reason.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before we could ask
        os._exit(1)


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.ch = Channel(cfg["channel"], cfg["size"])
        self.bell = Doorbell.from_fds(*cfg["bell"])
        # the supervisor's doorbells: its loop thread's, and the one a caller that has
        # borrowed the loop sleeps on (``W_OUT_BELL`` says which is in use; ``lending.py``)
        self.sup_bells = [Doorbell.from_fds(fd, fd) for fd in cfg["sup_bells"]]
        self.death_fd: int = cfg["death"]
        self.init: bytes = cfg["init"]  # the pool's initializer: a segment's descriptor (b"": none)
        self.prefix = f'{cfg["prefix"]}w{cfg["index"]}_{os.getpid()}_'
        self.soft_rss: int = cfg["soft_rss"]
        self.spin_s: float = cfg["spin_s"]
        self.pending: deque[frames.Dispatch] = deque()
        self.recall_seen = self.ch.words[W_RECALL]
        self.seq = 0
        self.recycling = False
        self.parent: int = cfg["parent"]
        self.log: JobLog | None = None
        if cfg["log_dir"]:
            from .joblog import JobLog  # here: a pool that captures nothing does not load it

            self.log = JobLog(cfg["log_dir"], cfg["log_bytes"])

    # -- sending ------------------------------------------------------------
    def send(self, outcomes: list[frames.Outcome]) -> None:
        self.send_frame(frames.encode_outcomes(outcomes))

    def send_frame(self, frame: bytes) -> None:
        ring = self.ch.outbound
        if len(frame) > ring.max_frame:
            self.seq += 1
            frame = frames.encode_spill(oob.write(f"{self.prefix}f{self.seq}", [frame]))
        while not ring.put(frame):  # rare: the supervisor is behind; let it drain
            self.sup_bells[self.ch.words[W_OUT_BELL]].ring()
            select.select([self.bell.read_fd], [], [], 0.005)
            self.bell.drain()
        if ring.publish():
            self.sup_bells[self.ch.words[W_OUT_BELL]].ring()

    def place(self, buffers: list[Any]) -> bytes:
        if not buffers:
            return b""
        self.seq += 1
        return oob.write(f"{self.prefix}{self.seq}", buffers)

    def send_checkpoint(self, job_id: int, state: Any) -> None:
        try:
            payload = codec.dump_state(state)  # in band: it comes back as a resume, bytes alone
        except SerializationError:
            return  # an unpicklable checkpoint is kept only in the job itself
        self.send([frames.Outcome(job_id, frames.CHECKPOINT, 0, payload, b"")])

    # -- the loop -------------------------------------------------------------
    def initialize(self) -> bool:
        """Run the pool's initializer; if it raises, tell the supervisor why (False). Meanwhile
        ``W_STARTED`` says so: a death inside it (``os._exit``, a segfault) breaks the pool too."""
        self.ch.words[W_STARTED] = IN_INITIALIZER
        try:
            initializer, initargs = pickle.loads(oob.read(self.init, unlink_now=False)[0])
            initializer(*initargs)
        except BaseException as e:  # noqa: BLE001 - SystemExit too: the pool is broken either way
            self.send_frame(frames.encode_init_failed(codec.dump_error(e)))
            return False
        self.ch.words[W_STARTED] = 0
        return True

    def serve(self) -> None:
        if self.init:  # ready only once initialized; bound to the supervisor's life meanwhile
            _die_with_parent(self.parent)
            if not self.initialize():
                return
        self.send_frame(frames.encode_hello(os.getpid()))
        if not self.init:
            _die_with_parent(self.parent)
        poller = select.poll()
        poller.register(self.bell.read_fd, select.POLLIN)
        poller.register(self.death_fd, select.POLLIN)
        words = self.ch.words
        inbound = self.ch.inbound
        log = self.log
        spin = self.spin_s
        while True:
            if words[W_STOP]:
                return
            if words[W_RECALL] != self.recall_seen:
                self.recall()
                continue
            if not self.pending:
                chunk, spans = inbound.read()
                if spans:
                    if not self.accept(chunk, spans):
                        return
                    continue
                if spin and self.spin(spin):
                    continue
                if inbound.prepare_sleep():
                    events = poller.poll(_BACKSTOP_MS)
                    self.bell.drain()
                    inbound.woke()
                    for fd, _ in events:
                        if fd == self.death_fd:
                            return
                continue
            job = self.pending.popleft()
            words[W_STARTED] = job.job_id
            outcomes = [self.run(job) if log is None else self.run_logged(job, log)]
            if self.soft_rss and not self.recycling and _rss() > self.soft_rss:
                # In the outcome's frame: the supervisor retires us before the
                # job's caller hears of it, so a job it submits next goes elsewhere.
                self.recycling = True
                outcomes.append(frames.Outcome(0, frames.RECYCLE, 0, b"", b""))
            self.send(outcomes)
            words[W_STARTED] = 0  # between jobs: a death now costs no job
            fence()  # visible before we look for a recall: withdraw() reads the two the other way

    def spin(self, seconds: float) -> bool:
        """Watch the inbound ring for up to ``seconds`` before going to sleep; True if a frame
        or a word of the supervisor's came meanwhile. A job that comes while we watch is
        begun without a wake, and its sender rings nobody (each wake costs the waker an
        interrupt to another CPU and the sleeper its wake-up: 10-20 µs on a small VM).
        The CPU is yielded each time round, so watching takes only time nobody else wants."""
        words = self.ch.words
        inbound = self.ch.inbound
        recall = self.recall_seen
        clock, pause = time.perf_counter, getattr(os, "sched_yield", _nap)
        end = clock() + seconds
        while clock() < end:
            if inbound.has_data() or words[W_STOP] or words[W_RECALL] != recall:
                return True
            pause()
        return False

    def accept(self, chunk: bytes, spans: list[tuple[int, int]]) -> bool:
        """Queue the jobs of the frames read (``Ring.read``); ``False`` on STOP."""
        for start, end in spans:
            frame, start, end, k = frames.unspill(chunk, start, end)
            if k == frames.RUN:
                self.pending.extend(frames.decode_run(frame, start))
            elif k == frames.STOP:
                return False
        return True

    def recall(self) -> None:
        self.recall_seen = self.ch.words[W_RECALL]
        if self.accept(*self.ch.inbound.read()) is False:
            self.ch.words[W_STOP] = 1
        back = [frames.Outcome(d.job_id, frames.RETURNED, 0, b"", b"") for d in self.pending]
        self.pending.clear()
        back.append(frames.Outcome(0, frames.RETURNED, 0, b"", b""))
        self.send(back)

    def run_logged(self, job: frames.Dispatch, log: JobLog) -> frames.Outcome:
        log.begin(job.job, job.attempt)
        try:
            return self.run(job)
        finally:
            log.end()

    def run(self, job: frames.Dispatch) -> frames.Outcome:
        live = self.send_checkpoint if job.flags & frames.F_CHECKPOINT_LIVE else None
        words = self.ch.words
        status, run_us, payload, bufs = execute(job, _arg_buffers, lambda: words[W_YIELD], live)
        return frames.Outcome(job.job_id, status, run_us, payload, self.place(bufs))


def function_of(job: frames.Dispatch) -> Any:
    """A job's function: unpickled once per worker when it is cacheable (see ``CallEncoder``)."""
    return codec.load_function(job.fn) if job.flags & frames.F_FN_CACHEABLE else pickle.loads(job.fn)


def _arg_buffers(job: frames.Dispatch) -> Any:
    """The arguments' out-of-band buffers, mapped from their segment (the supervisor unlinks it)."""
    return oob.read(job.oob, unlink_now=False) if job.oob else ()


def execute(
    job: frames.Dispatch, buffers_of: Any, yield_word: Any, live: Any
) -> tuple[int, int, bytes, list[pickle.PickleBuffer]]:
    """Run one job as ``current_job()``: (status, run µs, payload, the result's out-of-band buffers).

    Shared by the local worker and the Ray backend's task: ``buffers_of(job)``
    gives the arguments' out-of-band buffers, ``yield_word()`` the run id asked
    to yield (0: none), ``live(run, state)`` streams a checkpoint (None: it is
    not streamed). Whatever fails to load fails the job, not the worker.
    """
    t0 = time.perf_counter()
    try:
        fn = function_of(job)
        buffers = buffers_of(job)
        args, kwargs = pickle.loads(job.args, buffers=buffers)
        resume = pickle.loads(job.resume) if job.resume else None
    except BaseException as e:  # noqa: BLE001 - any failure to load is this job's error
        err = SerializationError(f"cannot unpickle the job in the worker: {type(e).__name__}: {e}")
        return frames.ERROR, 0, codec.dump_error(err), []
    context._enter(context.JobContext(job.job_id, job.attempt, resume, yield_word, live))
    status = frames.OK
    try:
        value = fn(*args, **kwargs)
    except Preempted as p:
        status, value = frames.PREEMPTED, p.state
    except BaseException as e:  # noqa: BLE001 - SystemExit too: it fails the job, not the worker
        return frames.ERROR, _us(t0), codec.dump_error(e), []
    finally:
        context._enter(None)
        del args, kwargs, buffers
    try:
        payload, bufs = codec.dump_outcome(fn, value, status == frames.PREEMPTED)
    except SerializationError as e:
        return frames.ERROR, _us(t0), codec.dump_error(e), []
    return status, _us(t0), payload, bufs


def _nap() -> None:
    time.sleep(0)  # where os.sched_yield is missing


def _us(t0: float) -> int:
    return min(int((time.perf_counter() - t0) * 1e6), 0xFFFFFFFF)


class _Authkey:
    """Gives ``multiprocessing.process`` the supervisor's authkey as a job imports it.

    A ``Manager``'s proxy (a queue, a dict) passed to a job authenticates with
    the process's authkey, which ``multiprocessing``'s own children inherit;
    ours get the supervisor's down the death pipe. Importing ``multiprocessing``
    at boot would cost every worker ~4 ms, so this meta path finder waits for
    the first import, sets the key once the module has run, and steps aside.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "multiprocessing.process":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            loader, key = spec.loader, self.key
            run = loader.exec_module

            def exec_module(module: Any) -> None:
                if module.__name__ != name:  # (a zip's loader serves its other modules too)
                    run(module)
                    return
                del loader.exec_module  # once: the loader is itself again
                run(module)
                module.current_process().authkey = key

            loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _take_authkey(key: bytes) -> None:
    """The supervisor's authkey: set now if something (a ``.pth`` file, sitecustomize) imported
    ``multiprocessing`` already, else when a job first does."""
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        process.current_process().authkey = key
    else:
        sys.meta_path.insert(0, _Authkey(key))


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:  # the supervisor is gone already
            os._exit(1)
        data += more
    return data


def main() -> None:
    cfg = pickle.loads(bytes.fromhex(sys.argv[1]))  # not json: it would load re (~5 ms)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    if os.getppid() != cfg["parent"]:  # the supervisor died while we started
        os._exit(1)
    key = _read_exactly(cfg["death"], int.from_bytes(_read_exactly(cfg["death"], 2), "little"))
    if key:
        _take_authkey(key)
    sys.path[:] = cfg["path"]
    Worker(cfg).serve()
