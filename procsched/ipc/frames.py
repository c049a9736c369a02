"""The frames that cross a channel, one typed record per stage of a job.

Supervisor to worker:

* ``RUN``: a batch of :class:`Dispatch` records (run id, attempt, flags, the
  pickled function, the pickled arguments, an optional checkpoint to resume
  from, an optional out-of-band descriptor, the job's own id);
* ``STOP``: finish the current job, return nothing more, exit 0.

Worker to supervisor:

* ``HELLO``: the worker has mapped its channel and is ready (after running
  the pool's initializer, if it has one);
* ``INIT_FAILED``: the pool's initializer raised (an error payload); the
  worker exits, and the pool is broken;
* ``OUTCOMES``: a batch of :class:`Outcome` records (job id, status, run
  time, payload, out-of-band descriptor).

Either way, ``SPILL`` says "the real frame is in this shared-memory
segment", for frames too large for the ring.

These are ``struct``-packed rather than msgspec-encoded on purpose: a
worker must boot in a few milliseconds (importing msgspec alone costs about
20 ms) and the supervisor must decode outcomes without ever unpickling
anything a job produced. The supervisor reads only the fixed headers and the
plain-text part of an error (:func:`error_types`); the pickled parts are
opaque bytes it hands to the future.

Stdlib only: workers import this module.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from . import oob

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple

RUN, STOP, SPILL = 1, 2, 3
HELLO, OUTCOMES, INIT_FAILED = 10, 11, 12

# Outcome statuses.
OK, ERROR, PREEMPTED, RETURNED, CHECKPOINT, RECYCLE = range(6)

# Dispatch flags.
F_FN_CACHEABLE = 1  # the function is pickled by reference: the worker may cache it
F_CHECKPOINT_LIVE = 2  # stream checkpoints to the supervisor (preempt="kill")
F_THEN = 4  # a continuation: the supervisor adds its prerequisite's result to the arguments

_KIND = struct.Struct("<B")
_COUNT = struct.Struct("<BI")
_DISPATCH = struct.Struct("<QIIIIIIQ")
_OUTCOME = struct.Struct("<QBxxxIIII")
_ERROR = struct.Struct("<III")
_PID = struct.Struct("<BQ")


if TYPE_CHECKING:  # the typed view, for the checker

    class Dispatch(NamedTuple):
        job_id: int  # the run's id: the backend and the worker's outcomes name a run by it
        attempt: int
        flags: int
        fn: bytes
        args: bytes
        resume: bytes
        oob: bytes
        job: int  # the job's own id, the same for every run of it (it names the job's log)

    class Outcome(NamedTuple):
        job_id: int
        status: int
        run_us: int
        payload: bytes
        oob: bytes

else:  # the same tuples at run time, without importing typing (~8 ms of a worker's boot)
    Dispatch = namedtuple("Dispatch", "job_id attempt flags fn args resume oob job")
    Outcome = namedtuple("Outcome", "job_id status run_us payload oob")

#: ``new(Dispatch, (fields...))``: a record made without the named tuple's
#: Python-level ``__new__`` (half the cost; the decoders and the supervisor
#: make one per job)
new = tuple.__new__


def kind(frame: bytes) -> int:
    return frame[0]


def encode_run(jobs: list[Dispatch]) -> bytes:
    parts = [_COUNT.pack(RUN, len(jobs))]
    for j in jobs:
        parts.append(_DISPATCH.pack(j.job_id, j.attempt, j.flags, len(j.fn), len(j.args), len(j.resume), len(j.oob), j.job))
        parts += (j.fn, j.args, j.resume, j.oob)
    return b"".join(parts)


def decode_run(frame: bytes, start: int = 0) -> list[Dispatch]:
    """The dispatches of the RUN frame at ``frame[start:]``."""
    n = _COUNT.unpack_from(frame, start)[1]
    pos = start + _COUNT.size
    out = []
    for _ in range(n):
        job_id, attempt, flags, lf, la, lr, lo, job = _DISPATCH.unpack_from(frame, pos)
        pos += _DISPATCH.size
        fn = frame[pos : pos + lf]
        pos += lf
        args = frame[pos : pos + la]
        pos += la
        resume = frame[pos : pos + lr]
        pos += lr
        oob = frame[pos : pos + lo]
        pos += lo
        out.append(new(Dispatch, (job_id, attempt, flags, fn, args, resume, oob, job)))
    return out


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    parts = [_COUNT.pack(OUTCOMES, len(outcomes))]
    for o in outcomes:
        parts.append(_OUTCOME.pack(o.job_id, o.status, o.run_us, len(o.payload), len(o.oob), 0))
        parts += (o.payload, o.oob)
    return b"".join(parts)


def decode_outcomes(frame: bytes, start: int = 0, end: int = -1) -> list[Outcome]:
    """Parse an outcome batch (the one at ``frame[start:end]``); raises ``ValueError`` on a
    malformed frame."""
    if end < 0:
        end = len(frame)
    try:
        n = _COUNT.unpack_from(frame, start)[1]
        pos = start + _COUNT.size
        out = []
        for _ in range(n):
            job_id, status, run_us, lp, lo, _r = _OUTCOME.unpack_from(frame, pos)
            pos += _OUTCOME.size
            payload = frame[pos : pos + lp]
            pos += lp
            oob = frame[pos : pos + lo]
            pos += lo
            out.append(new(Outcome, (job_id, status, run_us, payload, oob)))
    except struct.error as e:
        raise ValueError(f"malformed outcome frame: {e}") from None
    if pos != end:
        raise ValueError("malformed outcome frame: trailing bytes" if pos < end else "malformed outcome frame: too short")
    return out


STOP_FRAME = _KIND.pack(STOP)


def encode_hello(pid: int) -> bytes:
    return _PID.pack(HELLO, pid)


def decode_hello(frame: bytes) -> int:
    return int(_PID.unpack(frame)[1])


def encode_init_failed(error: bytes) -> bytes:
    return _KIND.pack(INIT_FAILED) + error


def encode_spill(descriptor: bytes) -> bytes:
    return _KIND.pack(SPILL) + descriptor


def unspill(chunk: bytes, start: int, end: int) -> tuple[bytes, int, int, int]:
    """The frame at ``chunk[start:end]`` (what ``Ring.read`` gives) as ``(buffer, start, end,
    kind)``; a SPILL frame there is replaced by the frame its segment holds (read, and unlinked)."""
    kind = chunk[start]
    if kind != SPILL:
        return chunk, start, end, kind
    frame = bytes(oob.read(spill_descriptor(chunk[start:end]), unlink_now=True)[0])
    return frame, 0, len(frame), frame[0]


def spill_descriptor(frame: bytes) -> bytes:
    return frame[1:]


def encode_error(type_names: list[str], message: str, tb: str, pickled: bytes) -> bytes:
    """An error payload: the exception's MRO names, message, traceback, and pickle."""
    names = "\n".join(type_names).encode()
    msg = message.encode("utf-8", "replace")
    tbb = tb.encode("utf-8", "replace")
    return _ERROR.pack(len(names), len(msg), len(tbb)) + names + msg + tbb + pickled


def decode_error(payload: bytes) -> tuple[list[str], str, str, bytes]:
    ln, lm, lt = _ERROR.unpack_from(payload)
    p = _ERROR.size
    names = payload[p : p + ln].decode().split("\n")
    p += ln
    msg = payload[p : p + lm].decode("utf-8", "replace")
    p += lm
    tb = payload[p : p + lt].decode("utf-8", "replace")
    return names, msg, tb, payload[p + lt :]


def error_types(payload: bytes) -> list[str]:
    """The qualified names of the error's class and its bases (no unpickling)."""
    try:
        ln = _ERROR.unpack_from(payload)[0]
        return payload[_ERROR.size : _ERROR.size + ln].decode().split("\n")
    except (struct.error, UnicodeDecodeError):
        return []
