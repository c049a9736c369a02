"""The pure parts, tested directly: no pool, no worker processes.

Time is a parameter (the ready queue takes ``queued_at``; backoff takes the
random draw), so every branch is pinned without a clock. The IPC pieces are
exercised for real: a channel in anonymous shared memory, a forked peer
that echoes frames through it under the doorbell/sleep protocol, real
segments in shared memory, a real eventfd.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import procsched
from procsched import codec, policy
from procsched.errors import (
    JobTimeout,
    MemoryLimitExceeded,
    Preempted,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)
from procsched.heap import ReadyQueue
from procsched.ipc import frames, oob
from procsched.ipc.doorbell import Doorbell
from procsched.ipc.ring import Channel
from procsched.model import DEFAULT_OPTIONS, JobOptions, RetryPolicy, make_options

# ---------------------------------------------------------------------------
# ReadyQueue
# ---------------------------------------------------------------------------


def drain_cold(q: ReadyQueue) -> list[int]:
    return [q.pop_cold() for _ in range(q.cold)]


def drain_hot(q: ReadyQueue) -> list[int]:
    return [q.pop_hot() for _ in range(q.hot)]


@pytest.mark.timeout(10)
def test_queue_higher_priority_first() -> None:
    q = ReadyQueue(aging_rate=0.0)
    for job_id, prio in [(1, 0), (2, 5), (3, -3), (4, 10), (5, 1)]:
        q.push(job_id, prio, hot=False, queued_at=0.0)
    assert len(q) == 5 and q.cold == 5 and q.hot == 0
    assert drain_cold(q) == [4, 2, 5, 1, 3]
    assert len(q) == 0


@pytest.mark.timeout(10)
def test_queue_fifo_among_equal_priorities() -> None:
    q = ReadyQueue(aging_rate=0.1)
    for job_id in range(1, 51):
        q.push(job_id, 7 if job_id % 2 else 3, hot=False, queued_at=42.0)  # one turn: equal times
    assert drain_cold(q) == list(range(1, 51, 2)) + list(range(2, 51, 2))


@pytest.mark.timeout(10)
def test_queue_hot_lane_before_cold_lane() -> None:
    q = ReadyQueue(aging_rate=0.1)
    q.push(1, 100, hot=False, queued_at=0.0)
    q.push(2, -100, hot=True, queued_at=50.0)
    q.push(3, 0, hot=True, queued_at=50.0)
    assert q.hot == 2 and q.cold == 1 and len(q) == 3
    assert q.peek_hot() == 3  # higher priority within the hot lane
    assert drain_hot(q) == [3, 2]
    assert q.peek_hot() is None
    assert drain_cold(q) == [1]


@pytest.mark.timeout(10)
def test_queue_front_goes_before_equal_ones_only() -> None:
    q = ReadyQueue(aging_rate=0.0)
    q.push(1, 0, hot=False, queued_at=0.0)
    q.push(2, 0, hot=False, queued_at=0.0)
    q.push(3, 1, hot=False, queued_at=0.0)
    q.push(9, 0, hot=False, queued_at=0.0, front=True)  # e.g. a preempted job
    # before the jobs it ties with, never before a higher priority
    assert drain_cold(q) == [3, 9, 1, 2]


@pytest.mark.timeout(10)
def test_queue_front_pushes_keep_their_order() -> None:
    """Jobs put back together (a preempted job, then the prefetch recalled behind it) keep FIFO."""
    q = ReadyQueue(aging_rate=0.1)
    for job_id in (1, 2, 3, 4):
        q.push(job_id, 0, hot=False, queued_at=5.0)  # admitted in one turn
    taken = [q.pop_cold(), q.pop_cold(), q.pop_cold()]  # dispatched: 1 runs, 2 and 3 prefetched
    assert taken == [1, 2, 3]
    for job_id in taken:  # preempted 1, then returned 2 and 3, in that order
        q.push(job_id, 0, hot=False, queued_at=5.0, front=True)
    assert drain_cold(q) == [1, 2, 3, 4]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(20))
def test_queue_matches_a_sorted_model(seed: int) -> None:
    """Mixed pushes (in order, out of order, to the front), pops and removes: the order is the
    model's, whichever of the lane's sorted run and heap an entry went to."""
    rng = random.Random(seed)
    rate = rng.choice([0.0, 0.1])
    q = ReadyQueue(aging_rate=rate)
    model: dict[int, tuple[float, int]] = {}  # job id -> (key, rank among equal keys)
    front, seq, now = -(10**9), 0, 0.0
    for job_id in range(1, 400):
        op = rng.random()
        if op < 0.55 or not model:
            now += rng.choice([0.0, 0.0, 0.5])
            priority = rng.choice([0, 0, 0, 1, 5, -2])
            to_front = rng.random() < 0.1
            q.push(job_id, priority, hot=False, queued_at=now, front=to_front)
            front, seq = (front + 1, seq) if to_front else (front, seq + 1)
            model[job_id] = (rate * now - priority, front if to_front else seq)  # the module doc's key
        elif op < 0.75:
            expected = min(model, key=model.__getitem__)
            assert q.pop_cold() == expected
            del model[expected]
        elif op < 0.9:  # several at once, as a dispatch takes them
            n = rng.choice([1, 3, 8])
            expected_many = sorted(model, key=model.__getitem__)[:n]
            assert q.take_cold(n) == expected_many
            for job_id_taken in expected_many:
                del model[job_id_taken]
        else:
            victim = rng.choice(sorted(model))
            assert q.remove(victim)
            del model[victim]
        assert q.cold == len(model)
    assert drain_cold(q) == sorted(model, key=model.__getitem__)


@pytest.mark.timeout(10)
def test_queue_aging_old_low_priority_wins() -> None:
    q = ReadyQueue(aging_rate=0.1)
    q.push(1, 0, hot=False, queued_at=0.0)  # waited 100 s longer: +10 points
    q.push(2, 5, hot=False, queued_at=100.0)
    assert drain_cold(q) == [1, 2]


@pytest.mark.timeout(10)
def test_queue_no_aging_high_priority_wins() -> None:
    q = ReadyQueue(aging_rate=0.0)
    q.push(1, 0, hot=False, queued_at=0.0)
    q.push(2, 5, hot=False, queued_at=100.0)
    assert drain_cold(q) == [2, 1]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("waited", "expected"),
    [(49.0, [2, 1]), (51.0, [1, 2])],  # 5 points at 0.1/s is 50 s of waiting
)
def test_queue_aging_threshold(waited: float, expected: list[int]) -> None:
    q = ReadyQueue(aging_rate=0.1)
    q.push(1, 0, hot=False, queued_at=1000.0)
    q.push(2, 5, hot=False, queued_at=1000.0 + waited)
    assert drain_cold(q) == expected


@pytest.mark.timeout(10)
def test_queue_rank_matches_order() -> None:
    q = ReadyQueue(aging_rate=0.5)
    assert q.rank(5, 10.0) == pytest.approx(0.5 * 10.0 - 5)
    assert q.rank(0, 0.0) < q.rank(0, 1.0)  # waited longer: ranked better (lower)
    assert q.rank(1, 0.0) < q.rank(0, 0.0)


# ---------------------------------------------------------------------------
# policy: should_retry, backoff
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_should_retry_out_of_attempts() -> None:
    p = RetryPolicy.make(2)
    assert policy.should_retry(p, 1, policy.ERROR, ["builtins.ValueError", "builtins.Exception"])
    assert policy.should_retry(p, 2, policy.CRASH)
    assert not policy.should_retry(p, 3, policy.CRASH)
    assert not policy.should_retry(p, 3, policy.TIMEOUT)
    assert not policy.should_retry(p, 3, policy.ERROR, ["builtins.Exception"])
    assert not policy.should_retry(RetryPolicy.make(0), 1, policy.CRASH)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("crashes", [True, False])
def test_should_retry_crash(crashes: bool) -> None:
    p = RetryPolicy.make(3, crashes=crashes)
    assert policy.should_retry(p, 1, policy.CRASH) is crashes


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeouts", [True, False])
def test_should_retry_timeout(timeouts: bool) -> None:
    p = RetryPolicy.make(3, timeouts=timeouts)
    assert policy.should_retry(p, 1, policy.TIMEOUT) is timeouts


@pytest.mark.timeout(10)
def test_should_retry_error_matches_class_or_base_names() -> None:
    p = RetryPolicy.make(3, on=[KeyError, "mypkg.Flaky"])
    assert p.on == ("builtins.KeyError", "mypkg.Flaky")
    assert policy.should_retry(p, 1, policy.ERROR, ["builtins.KeyError", "builtins.LookupError"])
    assert policy.should_retry(p, 1, policy.ERROR, ["mypkg.Sub", "mypkg.Flaky", "builtins.Exception"])
    assert not policy.should_retry(p, 1, policy.ERROR, ["builtins.ValueError", "builtins.Exception"])
    assert not policy.should_retry(p, 1, policy.ERROR, [])
    default = RetryPolicy.make(1)  # on=(Exception,): every ordinary error
    assert policy.should_retry(default, 1, policy.ERROR, ["builtins.ValueError", "builtins.Exception"])
    assert not policy.should_retry(default, 1, policy.ERROR, ["builtins.KeyboardInterrupt", "builtins.BaseException"])


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("draw", "factor"),
    [(0.0, 0.9), (0.5, 1.0), (0.999, 1.0 + 0.1 * 0.998)],
)
def test_backoff_draws(draw: float, factor: float) -> None:
    p = RetryPolicy.make(5, backoff=0.5, factor=3.0, max_backoff=100.0, jitter=0.1)
    for retry, base in [(1, 0.5), (2, 1.5), (3, 4.5)]:
        assert policy.backoff(p, retry, draw) == pytest.approx(base * factor)


@pytest.mark.timeout(10)
def test_backoff_capped_at_max_backoff() -> None:
    p = RetryPolicy.make(5, backoff=1.0, factor=10.0, max_backoff=30.0, jitter=0.0)
    assert [policy.backoff(p, r, 0.5) for r in (1, 2, 3, 4)] == [1.0, 10.0, 30.0, 30.0]
    jittered = RetryPolicy.make(5, backoff=1.0, factor=10.0, max_backoff=30.0, jitter=0.2)
    assert policy.backoff(jittered, 9, 0.5) == pytest.approx(30.0)
    assert policy.backoff(jittered, 9, 0.0) == pytest.approx(24.0)


@pytest.mark.timeout(10)
def test_backoff_does_not_overflow_on_a_long_retry_series() -> None:
    """``factor ** n`` overflows a float after ~1000 retries; the cap must still hold."""
    p = RetryPolicy.make(100_000, backoff=0.1, factor=2.0, max_backoff=60.0, jitter=0.0)
    assert policy.backoff(p, 5000, 0.5) == 60.0
    steep = RetryPolicy.make(100_000, backoff=0.1, factor=10.0, max_backoff=5.0, jitter=0.1)
    assert 4.5 <= policy.backoff(steep, 400, 0.3) <= 5.5
    never = RetryPolicy.make(100_000, backoff=0.0, factor=10.0, max_backoff=5.0, jitter=0.1)
    assert policy.backoff(never, 400, 0.3) == 0.0


@pytest.mark.timeout(10)
def test_backoff_jitter_bounds() -> None:
    rng = random.Random(1234)
    p = RetryPolicy.make(9, backoff=2.0, factor=2.0, max_backoff=10.0, jitter=0.25)
    for retry in range(1, 8):
        base = min(2.0 * 2.0 ** (retry - 1), 10.0)
        for _ in range(200):
            d = policy.backoff(p, retry, rng.random())
            assert base * 0.75 <= d < base * 1.25
    no_jitter = RetryPolicy.make(1, backoff=2.0, jitter=0.0)
    assert {policy.backoff(no_jitter, 1, x) for x in (0.0, 0.5, 0.999)} == {2.0}
    full = RetryPolicy.make(1, backoff=2.0, jitter=1.0)  # never negative
    assert policy.backoff(full, 1, 0.0) == 0.0


# ---------------------------------------------------------------------------
# model: make_options, RetryPolicy.make
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_make_options_applies_changes() -> None:
    o = make_options(DEFAULT_OPTIONS, {"priority": 3, "hot": True, "timeout": 2, "retries": 2, "preempt": "kill", "name": "n", "tags": ["a", "b"]})
    assert isinstance(o, JobOptions)
    assert (o.priority, o.hot, o.timeout, o.preempt, o.name, o.tags) == (3, True, 2.0, "kill", "n", ("a", "b"))
    assert isinstance(o.timeout, float)
    assert o.retries == RetryPolicy.make(2)
    assert DEFAULT_OPTIONS.priority == 0 and DEFAULT_OPTIONS.retries.retries == 0  # base untouched
    policy_in = RetryPolicy.make(4, backoff=1.0)
    assert make_options(o, {"retries": policy_in, "timeout": None}).retries is policy_in
    assert make_options(o, {"timeout": None}).timeout is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("changes", "error", "named"),
    [
        ({"priorty": 1}, TypeError, "priorty"),
        ({"priority": 1.5}, TypeError, "'priority'"),
        ({"priority": True}, TypeError, "'priority'"),
        ({"hot": 1}, TypeError, "'hot'"),
        ({"timeout": 0}, ValueError, "'timeout'"),
        ({"timeout": -1.0}, ValueError, "'timeout'"),
        ({"timeout": math.inf}, ValueError, "'timeout'"),
        ({"timeout": math.nan}, ValueError, "'timeout'"),
        ({"timeout": "5"}, TypeError, "'timeout'"),
        ({"retries": -1}, ValueError, "'retries'"),
        ({"retries": 1.0}, TypeError, "'retries'"),
        ({"retries": True}, TypeError, "'retries'"),
        ({"preempt": "never"}, ValueError, "'preempt'"),
        ({"name": 3}, TypeError, "'name'"),
        ({"tags": "abc"}, TypeError, "'tags'"),
        ({"tags": ["a", 1]}, TypeError, "'tags'"),
    ],
)
def test_make_options_errors_name_the_option(changes: dict[str, Any], error: type[Exception], named: str) -> None:
    with pytest.raises(error, match=named):
        make_options(DEFAULT_OPTIONS, changes)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"retries": -1}, ValueError, "'retries'"),
        ({"retries": 2.0}, TypeError, "'retries'"),
        ({"backoff": -0.1}, ValueError, "'backoff'"),
        ({"backoff": math.nan}, ValueError, "'backoff'"),
        ({"factor": 0.5}, ValueError, "'factor'"),
        ({"max_backoff": -1}, ValueError, "'max_backoff'"),
        ({"jitter": 1.5}, ValueError, "'jitter'"),
        ({"jitter": -0.1}, ValueError, "'jitter'"),
        ({"jitter": "x"}, TypeError, "'jitter'"),
        ({"on": [int]}, TypeError, "'on'"),
        ({"on": [3]}, TypeError, "'on'"),
    ],
)
def test_retry_policy_make_errors_name_the_option(kwargs: dict[str, Any], error: type[Exception], named: str) -> None:
    with pytest.raises(error, match=named):
        RetryPolicy.make(**kwargs)


@pytest.mark.timeout(10)
def test_retry_policy_make_accepts_one_class_or_name() -> None:
    assert RetryPolicy.make(1, on=OSError).on == ("builtins.OSError",)
    assert RetryPolicy.make(1, on="pkg.mod.Err").on == ("pkg.mod.Err",)
    p = RetryPolicy.make(3, backoff=1, factor=1, max_backoff=2, jitter=0)
    assert (p.retries, p.backoff, p.factor, p.max_backoff, p.jitter) == (3, 1.0, 1.0, 2.0, 0.0)
    assert isinstance(p.backoff, float)


# ---------------------------------------------------------------------------
# ipc.ring.Channel
# ---------------------------------------------------------------------------


@pytest.fixture
def channel() -> Iterator[Channel]:
    ch = Channel.create(4096)
    try:
        yield ch
    finally:
        ch.close()


def _frame(seq: int, n: int, rng: random.Random) -> bytes:
    """A frame of exactly ``n`` bytes (n >= 0) whose content depends on seq and rng."""
    body = struct.pack("<I", seq) + rng.randbytes(max(0, n - 4))
    return body[:n]


def _read(ring: Any) -> list[bytes]:
    """What ``Ring.read`` gives, frame by frame."""
    chunk, spans = ring.read()
    return [chunk[start:end] for start, end in spans]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_ring_many_sizes_with_wrap_around(channel: Channel, direction: str) -> None:
    ring = getattr(channel, direction)

    def take() -> list[bytes]:
        return _read(ring)
    assert ring.max_frame == 1024  # a quarter of the ring
    rng = random.Random(7 if direction == "inbound" else 8)
    sent: list[bytes] = []
    got: list[bytes] = []
    pending = 0
    for seq in range(5000):
        n = rng.choice([0, 1, 3, 4, 5, 7, 8, 9, rng.randrange(ring.max_frame + 1), ring.max_frame])
        frame = _frame(seq, n, rng)
        while not ring.put(frame):  # full: the consumer drains, then it fits
            assert pending, "an empty ring refused a frame no larger than max_frame"
            ring.publish()
            got += take()
            pending = 0
        sent.append(frame)
        pending += 1
        if rng.random() < 0.3:  # publish and take at irregular points
            ring.publish()
            if rng.random() < 0.5:
                got += take()
                pending = 0
    ring.publish()
    got += take()
    assert len(got) == len(sent)
    assert got == sent
    assert take() == []


@pytest.mark.timeout(10)
def test_ring_put_false_when_full_then_room_after_take(channel: Channel) -> None:
    ring = channel.inbound
    frame = b"x" * 1020  # 1024 bytes with its length: exactly four fill the ring
    for _ in range(4):
        assert ring.put(frame)
    assert not ring.put(b"")
    assert ring.free() == 0
    ring.publish()
    assert not ring.put(b"y")  # published but not taken: still full
    assert _read(ring) == [frame] * 4
    assert ring.free() == 4096
    assert ring.put(b"y")
    ring.publish()
    assert _read(ring) == [b"y"]


@pytest.mark.timeout(10)
def test_ring_frame_invisible_until_published(channel: Channel) -> None:
    ring = channel.outbound
    assert ring.put(b"abc")
    assert not ring.has_data()
    assert _read(ring) == []
    ring.publish()
    assert ring.has_data()
    assert _read(ring) == [b"abc"]
    assert not ring.has_data()


@pytest.mark.timeout(10)
def test_ring_sleep_handshake(channel: Channel) -> None:
    ring = channel.inbound
    assert ring.prepare_sleep() is True  # empty: the consumer may sleep
    assert ring.put(b"wake")
    assert ring.publish() is True  # it announced sleep: ring its doorbell
    assert ring.prepare_sleep() is False  # data pending: do not sleep
    assert ring.publish() is False  # it did not stay asleep
    assert _read(ring) == [b"wake"]
    assert ring.put(b"busy")
    assert ring.publish() is False  # the consumer never announced sleep
    _read(ring)
    assert ring.prepare_sleep() is True
    ring.woke()  # it woke on its own (backstop): no wakeup owed
    assert ring.put(b"x")
    assert ring.publish() is False


@pytest.mark.timeout(10)
def test_channel_directions_are_independent(channel: Channel) -> None:
    assert channel.inbound.put(b"to worker")
    channel.inbound.publish()
    assert _read(channel.outbound) == []
    assert channel.outbound.put(b"to supervisor")
    channel.outbound.publish()
    assert _read(channel.inbound) == [b"to worker"]
    assert _read(channel.outbound) == [b"to supervisor"]


_BACKSTOP_MS = 2000


def _echo_child(ch: Channel, my_bell: Doorbell, peer_bell: Doorbell) -> int:
    """The forked consumer: echo every inbound frame back; an empty frame ends it.

    Returns the number of wakeups it found lost (slept to the backstop with data waiting).
    """
    inbound, outbound = ch.inbound, ch.outbound
    lost = 0
    while True:
        got = _read(inbound)
        if not got:
            if inbound.prepare_sleep():
                r, _, _ = select.select([my_bell.read_fd], [], [], _BACKSTOP_MS / 1000)
                my_bell.drain()
                inbound.woke()
                if not r and inbound.has_data():
                    lost += 1
            continue
        for frame in got:
            if frame == b"":
                return lost
            while not outbound.put(frame):  # the parent is behind: let it drain
                if outbound.publish():
                    peer_bell.ring()
                select.select([], [], [], 0.0005)
        if outbound.publish():
            peer_bell.ring()


@pytest.mark.timeout(60)
def test_ring_two_processes_lose_no_wakeup() -> None:
    ch = Channel.create(16384)
    child_bell, parent_bell = Doorbell.create(), Doorbell.create()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = min(_echo_child(ch, child_bell, parent_bell), 90)
        finally:
            os._exit(code)
    try:
        rng = random.Random(99)
        max_frame = ch.inbound.max_frame
        frames_out = [_frame(i, rng.choice([4, 5, 8, 13, 64, rng.randrange(4, 300), rng.randrange(4, max_frame + 1)]), rng) for i in range(20_000)]
        inbound, outbound = ch.inbound, ch.outbound
        received: list[bytes] = []
        sent = 0
        lost = 0
        while len(received) < len(frames_out):
            pushed = False
            while sent < len(frames_out) and inbound.put(frames_out[sent]):
                sent += 1
                pushed = True
                if rng.random() < 0.05:  # sometimes publish mid-batch
                    break
            if pushed and inbound.publish():
                child_bell.ring()
            got = _read(outbound)
            if got:
                received += got
                continue
            if outbound.prepare_sleep():
                r, _, _ = select.select([parent_bell.read_fd], [], [], _BACKSTOP_MS / 1000)
                parent_bell.drain()
                outbound.woke()
                if not r and outbound.has_data():
                    lost += 1
        assert received == frames_out
        while not inbound.put(b""):  # the end marker
            select.select([], [], [], 0.001)
        if inbound.publish():
            child_bell.ring()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(status), status
        assert os.WEXITSTATUS(status) == 0, f"the child lost {os.WEXITSTATUS(status)} wakeup(s)"
        assert lost == 0, f"the parent lost {lost} wakeup(s)"
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        ch.close()
        child_bell.close()
        parent_bell.close()


# ---------------------------------------------------------------------------
# ipc.frames
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_frames_run_round_trip() -> None:
    batch = [
        frames.Dispatch(1, 1, 0, b"", b"", b"", b"", 1),
        frames.Dispatch(2**63 + 5, 7, frames.F_FN_CACHEABLE | frames.F_CHECKPOINT_LIVE, b"fn" * 100, b"\x00args", b"resume", b"seg\x00" + bytes(16), 2**64 - 1),
        frames.Dispatch(3, 2, frames.F_FN_CACHEABLE, os.urandom(70_000), os.urandom(3), b"", b"", 42),
    ]
    frame = frames.encode_run(batch)
    assert frames.kind(frame) == frames.RUN
    assert frames.decode_run(frame) == batch
    assert frames.decode_run(frames.encode_run([])) == []


@pytest.mark.timeout(10)
def test_frames_outcomes_round_trip() -> None:
    batch = [
        frames.Outcome(1, frames.OK, 12, b"payload", b""),
        frames.Outcome(2, frames.ERROR, 0xFFFFFFFF, os.urandom(5000), b""),
        frames.Outcome(3, frames.PREEMPTED, 0, b"", b"name\x00" + bytes(16)),
        frames.Outcome(0, frames.RETURNED, 0, b"", b""),
        frames.Outcome(4, frames.CHECKPOINT, 0, b"state", b""),
        frames.Outcome(0, frames.RECYCLE, 0, b"", b""),
    ]
    frame = frames.encode_outcomes(batch)
    assert frames.kind(frame) == frames.OUTCOMES
    assert frames.decode_outcomes(frame) == batch
    assert frames.decode_outcomes(frames.encode_outcomes([])) == []


@pytest.mark.timeout(10)
def test_frames_decode_outcomes_rejects_malformed() -> None:
    frame = frames.encode_outcomes([frames.Outcome(1, frames.OK, 5, b"payload", b"oob"), frames.Outcome(2, frames.OK, 5, b"x", b"")])
    for cut in (1, 3, 5, 20, len(frame) - 1):
        with pytest.raises(ValueError):
            frames.decode_outcomes(frame[:cut])
    with pytest.raises(ValueError):
        frames.decode_outcomes(frame + b"\x00")
    with pytest.raises(ValueError):
        frames.decode_outcomes(frame + b"garbage")
    with pytest.raises(ValueError):
        frames.decode_outcomes(b"")


@pytest.mark.timeout(10)
def test_frames_hello_spill_stop() -> None:
    hello = frames.encode_hello(4_000_000)
    assert frames.kind(hello) == frames.HELLO
    assert frames.decode_hello(hello) == 4_000_000
    desc = b"psm_1_x_s1\x00" + bytes(16)
    spill = frames.encode_spill(desc)
    assert frames.kind(spill) == frames.SPILL
    assert frames.spill_descriptor(spill) == desc
    assert frames.kind(frames.STOP_FRAME) == frames.STOP


@pytest.mark.timeout(10)
def test_frames_error_round_trip() -> None:
    names = ["mod.Err", "builtins.ValueError", "builtins.Exception"]
    payload = frames.encode_error(names, "bad \u00e9 thing", "Traceback ...\n  line\n", b"\x80pickled")
    assert frames.decode_error(payload) == (names, "bad \u00e9 thing", "Traceback ...\n  line\n", b"\x80pickled")
    assert frames.error_types(payload) == names
    assert frames.decode_error(frames.encode_error([], "", "", b""))[1:] == ("", "", b"")
    assert frames.error_types(b"\x01") == []  # garbage: no names, no exception


# ---------------------------------------------------------------------------
# ipc.oob
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_oob_write_read_unlink() -> None:
    prefix = oob.pool_prefix("unitrw")
    name = f"{prefix}a1"
    big = os.urandom(300_000)
    arr = bytearray(os.urandom(1000))
    buffers: list[Any] = [big, pickle.PickleBuffer(arr), memoryview(b"tiny"), b""]
    desc = oob.write(name, buffers)
    try:
        assert oob.segment_name(desc) == name
        assert os.path.exists(os.path.join(oob.SHM_DIR, name))
        views = oob.read(desc, unlink_now=False)
        assert [bytes(v) for v in views] == [big, bytes(arr), b"tiny", b""]
        assert os.path.exists(os.path.join(oob.SHM_DIR, name))
        again = oob.read(desc, unlink_now=True)
        assert bytes(again[0]) == big
        assert not os.path.exists(os.path.join(oob.SHM_DIR, name))
        assert bytes(views[1]) == bytes(arr)  # the mapping outlives the name
    finally:
        oob.unlink(name)
    oob.unlink(name)  # unlinking twice is harmless


@pytest.mark.timeout(10)
def test_oob_reader_mapping_is_private() -> None:
    name = f"{oob.pool_prefix('unitpriv')}a1"
    desc = oob.write(name, [b"original"])
    try:
        view = oob.read(desc, unlink_now=False)[0]
        view[:3] = b"NEW"  # a job writing into its argument buffer
        assert bytes(oob.read(desc, unlink_now=False)[0]) == b"original"
    finally:
        oob.unlink(name)


@pytest.mark.timeout(10)
def test_oob_sweep_removes_ours_only() -> None:
    mine, other = oob.pool_prefix("unitmine"), oob.pool_prefix("unitother")
    names = [f"{mine}a1", f"{mine}s2", f"{other}a1"]
    for n in names:
        oob.write(n, [b"x"])
    try:
        assert oob.sweep(mine) == 2
        left = set(os.listdir(oob.SHM_DIR))
        assert names[0] not in left and names[1] not in left
        assert names[2] in left
        assert oob.sweep(mine) == 0
    finally:
        for n in names:
            oob.unlink(n)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(10)
def test_oob_sweep_orphans() -> None:
    dead = f"{oob.PREFIX}{_dead_pid()}_unitorphan_a1"
    live = f"{oob.pool_prefix('unitlive')}a1"
    oob.write(dead, [b"left by a crashed pool"])
    oob.write(live, [b"ours"])
    try:
        oob.sweep_orphans()  # (a concurrent pool may sweep it first: check the names, not the count)
        left = set(os.listdir(oob.SHM_DIR))
        assert dead not in left
        assert live in left
    finally:
        oob.unlink(dead)
        oob.unlink(live)


# ---------------------------------------------------------------------------
# ipc.doorbell
# ---------------------------------------------------------------------------


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.timeout(10)
def test_doorbell_ring_and_drain() -> None:
    bell = Doorbell.create()
    try:
        assert bell.fileno() == bell.read_fd
        assert not _readable(bell.fileno())
        bell.ring()
        bell.ring()
        assert _readable(bell.fileno())
        bell.drain()
        assert not _readable(bell.fileno())
        bell.drain()  # nothing to drain: harmless
        assert not _readable(bell.fileno())
    finally:
        bell.close()


@pytest.mark.timeout(10)
def test_doorbell_pipe_flavour() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    bell = Doorbell(r, w, False)
    try:
        assert bell.fds() == (r, w)
        for _ in range(10_000):  # past a pipe's capacity: ringing never blocks
            bell.ring()
        assert _readable(r)
        bell.drain()
        assert not _readable(r)
        rebuilt = Doorbell.from_fds(r, w)
        rebuilt.ring()
        assert _readable(r)
        rebuilt.drain()
        assert not _readable(r)
    finally:
        bell.close()


# ---------------------------------------------------------------------------
# codec
# ---------------------------------------------------------------------------


def module_function(x: int) -> int:
    return x + 1


_OFFSET = 10
by_value = lambda x: x + _OFFSET  # a lambda has no importable name: pickled by value


@pytest.mark.timeout(10)
def test_codec_function_by_reference_is_cached() -> None:
    enc = codec.CallEncoder()
    data, flags = enc.function(module_function)
    again, flags2 = enc.function(module_function)
    assert again is data
    assert flags == flags2 == frames.F_FN_CACHEABLE
    assert pickle.loads(data) is module_function
    assert len(data) < 200  # by reference, not by value


@pytest.mark.timeout(10)
def test_codec_function_by_value_repickled_on_rebind() -> None:
    global _OFFSET
    enc = codec.CallEncoder()
    first, flags = enc.function(by_value)
    assert flags == frames.F_FN_CACHEABLE
    assert enc.function(by_value)[0] is first
    assert pickle.loads(first)(1) == 11
    try:
        _OFFSET = 20
        second = enc.function(by_value)[0]
        assert second is not first
        assert pickle.loads(second)(1) == 21
        assert enc.function(by_value)[0] is second
    finally:
        _OFFSET = 10


@pytest.mark.timeout(10)
def test_codec_arguments_big_buffers_out_of_band() -> None:
    enc = codec.CallEncoder()
    big = os.urandom(codec.OOB_MIN + 1)
    data, buffers = enc.arguments(module_function, (big, b"small"), {"k": 1})
    assert len(buffers) == 1 and len(data) < 1000
    args, kwargs = pickle.loads(data, buffers=[b.raw() for b in buffers])
    assert args == (big, b"small") and kwargs == {"k": 1}
    with pytest.raises(SerializationError, match="module_function"):
        enc.arguments(module_function, (threading.Lock(),), {})


def _raise_value_error() -> None:
    raise ValueError("boom 42")


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: ``__init__`` wants two arguments and args has one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


@pytest.mark.timeout(10)
def test_codec_error_round_trip_keeps_type_message_traceback() -> None:
    try:
        _raise_value_error()
    except ValueError as e:
        payload = codec.dump_error(e)
    assert frames.error_types(payload)[:2] == ["builtins.ValueError", "builtins.Exception"]
    err = codec.load_error(payload)
    assert type(err) is ValueError
    assert str(err) == "boom 42"
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "_raise_value_error" in err.__cause__.tb
    assert "ValueError: boom 42" in err.__cause__.tb


@pytest.mark.timeout(10)
def test_codec_unpicklable_error_becomes_remote_error() -> None:
    try:
        raise UnpicklableError("cannot pickle me")
    except UnpicklableError as e:
        payload = codec.dump_error(e)
    assert frames.decode_error(payload)[3] == b""  # no pickle
    err = codec.load_error(payload)
    assert isinstance(err, RemoteError)
    assert err.type_name.endswith(".UnpicklableError")
    assert err.message == "cannot pickle me"
    assert "cannot pickle me" in err.tb
    assert str(err) == f"{err.type_name}: cannot pickle me"
    assert isinstance(err.__cause__, RemoteTraceback)


@pytest.mark.timeout(10)
def test_codec_error_that_cannot_be_rebuilt_becomes_remote_error() -> None:
    payload = codec.dump_error(TwoArgError("a", "b"))
    assert frames.decode_error(payload)[3] != b""
    err = codec.load_error(payload)
    assert isinstance(err, RemoteError)
    assert err.type_name.endswith(".TwoArgError") and err.message == "a/b"
    builtin = codec.load_error(frames.encode_error(["builtins.KeyError", "builtins.Exception"], "'k'", "", b""))
    assert isinstance(builtin, RemoteError) and builtin.type_name == "KeyError"


@pytest.mark.timeout(10)
def test_codec_error_holding_a_large_array_round_trips() -> None:
    """An error's pickle has nowhere to put out-of-band buffers: they must stay in band."""
    np = pytest.importorskip("numpy")
    big = np.arange(codec.OOB_MIN, dtype=np.uint8)  # past the out-of-band threshold
    err = codec.load_error(codec.dump_error(ValueError("with data", big)))
    assert type(err) is ValueError
    assert err.args[0] == "with data"
    assert np.array_equal(err.args[1], big)


@pytest.mark.timeout(10)
def test_codec_checkpoint_state_is_self_contained() -> None:
    """A checkpoint is held by the supervisor as bytes alone: large buffers stay in band."""
    np = pytest.importorskip("numpy")
    for state in (os.urandom(codec.OOB_MIN + 8), {"step": 3, "data": np.ones(codec.OOB_MIN, dtype=np.uint8)}):
        payload = codec.dump_state(state)
        loaded = pickle.loads(payload)  # what the worker does with a resume, no buffers
        if isinstance(state, bytes):
            assert loaded == state
        else:
            assert loaded["step"] == 3 and np.array_equal(loaded["data"], state["data"])
    with pytest.raises(SerializationError):
        codec.dump_state(threading.Lock())


@pytest.mark.timeout(10)
def test_codec_values() -> None:
    payload, buffers = codec.dump_value({"a": [1, 2], "b": b"x"})
    assert buffers == []
    assert codec.load_value(payload) == {"a": [1, 2], "b": b"x"}
    big = os.urandom(codec.OOB_MIN)
    payload, buffers = codec.dump_value(big)
    assert len(buffers) == 1
    assert codec.load_value(payload, [b.raw() for b in buffers]) == big
    with pytest.raises(SerializationError, match="lock"):
        codec.dump_value(threading.Lock())
    for garbage in (b"", b"\x80\x05garbage", b"not a pickle"):
        with pytest.raises(SerializationError):
            codec.load_value(garbage)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_worker_crashed_messages() -> None:
    seg = WorkerCrashed(-11, pid=123, job="f#1")
    assert "SIGSEGV" in str(seg) and "123" in str(seg) and "f#1" in str(seg)
    assert seg.signal_name == "SIGSEGV"
    code = WorkerCrashed(3, pid=7)
    assert "exit code 3" in str(code)
    assert code.signal is None and code.signal_name is None
    assert "unknown exit status" in str(WorkerCrashed(None))
    assert "OOM" in str(WorkerCrashed(-9))
    assert "signal 200" in str(WorkerCrashed(-200))


@pytest.mark.timeout(10)
def test_error_classes() -> None:
    t = JobTimeout(2.5, "f#3")
    assert isinstance(t, TimeoutError) and isinstance(t, procsched.JobFailed) and isinstance(t, procsched.ProcschedError)
    assert "2.5 s" in str(t) and "f#3" in str(t)
    m = MemoryLimitExceeded(300 * 2**20, 256 * 2**20, pid=5, job="g#4")
    assert isinstance(m, WorkerCrashed) and m.signal_name == "SIGKILL"
    assert "300 MiB" in str(m) and "256 MiB" in str(m)
    assert isinstance(SerializationError("x"), pickle.PicklingError)
    assert isinstance(RemoteError("a.B", "m"), procsched.JobFailed)
    assert str(RemoteError("a.B", "")) == "a.B"


def _attrs(e: BaseException) -> dict[str, Any]:
    return {k: v for k, v in vars(e).items() if not k.startswith("__")}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "error",
    [
        WorkerCrashed(-11, 4321, "job#1"),
        WorkerCrashed(3),
        JobTimeout(1.5, "slow#2"),
        RemoteError("pkg.Err", "message", "Traceback ..."),
        MemoryLimitExceeded(3 * 2**30, 2**30, 99, "fat#3"),
        Preempted({"i": 3}),
        RemoteTraceback("tb text"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_round_trip(error: BaseException) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.args == error.args
    assert _attrs(again) == _attrs(error)


@pytest.mark.timeout(10)
def test_worker_crashed_job_label_survives_pickle() -> None:
    err = WorkerCrashed(-9, 11)
    err.job = "late#5"  # the supervisor names the job after the fact
    again = pickle.loads(pickle.dumps(err))
    assert again.job == "late#5" and "late#5" in str(again)


# ---------------------------------------------------------------------------
# context outside a job
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_in_job_helpers_outside_a_job() -> None:
    assert procsched.cancel_requested() is False
    procsched.checkpoint({"anything": 1})  # outside a job: does nothing, raises nothing
    with pytest.raises(RuntimeError, match="outside"):
        procsched.current_job()


# -- backend specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"window": -1}, "window"), ({"window": True}, "window"), ({"window": 1.5}, "window"), ({"address": ""}, "address"), ({"init": [1]}, "init")],
)
def test_ray_spec_rejects_bad_values_naming_them(kwargs: dict[str, Any], name: str) -> None:
    from procsched import backends

    with pytest.raises((ValueError, TypeError), match=name):
        backends.Ray(**kwargs)


def test_ray_spec_window_defaults_to_adaptive_and_takes_a_count() -> None:
    from procsched import backends

    assert backends.Ray().window is None
    assert backends.Ray(window=0).window == 0
    assert backends.choose("ray").window is None
