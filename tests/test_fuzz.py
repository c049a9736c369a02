"""Garbage on the service's socket, thrown while a well-behaved client's batch runs.

Given a real ``procsched serve`` working through a batch for a normal
client; when other connections send it random bytes, random msgpack,
requests with wrong tags and types, oversized and truncated frames, frames
before the handshake, a second Hello and Submits with wrong fields; then
each bad frame gets a reply that names what was wrong (``Failure`` for a
frame that does not decode, ``Rejected`` for a Submit that decodes but
breaks a rule), a stream that cannot be followed is closed, nothing
accepted is lost, the batch ends with the right results, and the service
still answers.

The examples of one Hypothesis run share one service (a service per
example would cost most of a second each), so shrinking is off: the
example reported is the first that broke something, not a smaller one
tried on a service an earlier example may have damaged.
"""

from __future__ import annotations

import math
import pickle
import re
import socket
import typing
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import jobfns
import procsched
from conftest import wait_for
from procsched import protocol as p
from procsched.codec import CallEncoder
from procsched.ipc.frames import F_FN_CACHEABLE, F_THEN
from procsched.model import JobOptions
from servicectl import Service

BATCH = 200
DELAY = 0.01  # 200 jobs of 10 ms on 2 workers: the batch is in flight while the garbage flies
READ_TIMEOUT = 10.0  # any read from the service (a hang fails the test instead of blocking it)
PING = 0x5EED  # the ref of the GetStats that proves a connection still answers

FUZZ = settings(
    deadline=None,
    database=None,  # nothing written to the working tree
    phases=(Phase.explicit, Phase.generate),  # no shrinking: the examples share a service
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
encode = msgspec.msgpack.encode


def framed(body: bytes) -> bytes:
    return p.HEADER.pack(len(body)) + body


class Raw:
    """A hand-driven connection: bytes out, typed replies in, every read with a deadline."""

    def __init__(self, address: str, hello: bool = True, timeout: float = READ_TIMEOUT) -> None:
        _, path = p.parse_address(address)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.sock.connect(path)
        self.frames = p.FrameReader(1 << 30)
        self.replies: deque[Any] = deque()
        self.outcomes: dict[int, p.Outcome] = {}
        self.eof = False
        if hello:
            self.send(p.frame(p.Hello(p.VERSION, client="test_fuzz")))
            welcome = self.next()
            assert type(welcome) is p.Welcome, welcome
            self.welcome = welcome

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service closed the connection already: what it said is still to be read

    def next(self) -> Any:
        """The next reply; None once the service has closed the connection."""
        while not self.replies and not self.eof:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                pytest.fail(f"the service sent nothing for {self.timeout} s")
            if not data:
                self.eof = True
            self.replies.extend(p.reply_decoder.decode(body) for body in self.frames.feed(data))
        return self.replies.popleft() if self.replies else None

    def reply(self) -> Any:
        """The next reply that is not a pushed outcome (those are kept in ``outcomes``)."""
        while True:
            msg = self.next()
            if type(msg) is not p.Outcomes:
                return msg
            self.outcomes.update((o.job, o) for o in msg.items)

    def answers(self, n: int) -> list[Any]:
        """The next ``n`` replies that are not pushed outcomes."""
        return [self.reply() for _ in range(n)]

    def drain(self) -> list[Any]:
        """Half-close, then every reply until the service closes its side."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = []
        while (msg := self.next()) is not None:
            out.append(msg)
        return out

    def ping(self) -> bool:
        """Whether the connection still takes a request and answers it."""
        self.send(p.frame(p.GetStats(PING)))
        msg = self.reply()
        return type(msg) is p.Answer and msg.ref == PING

    def wait_outcomes(self, ids: set[int]) -> dict[int, p.Outcome]:
        while not ids <= self.outcomes.keys():
            msg = self.next()
            assert type(msg) is p.Outcomes, f"waiting for the outcomes of {sorted(ids - self.outcomes.keys())}, got {msg}"
            self.outcomes.update((o.job, o) for o in msg.items)
        return {i: self.outcomes[i] for i in ids}


def a_call(x: int, delay: float | None = None) -> tuple[bytes, int, bytes]:
    """``slow_square(x[, delay])`` as a client pickles it: (function, flags, arguments)."""
    enc = CallEncoder()
    fn, flags = enc.function(jobfns.slow_square)
    args = (x,) if delay is None else (x, delay)
    return fn, flags, enc.arguments(jobfns.slow_square, args, {}, in_band=True)[0]


def spec(x: int, delay: float | None = None, **options: Any) -> p.JobSpec:
    fn, flags, args = a_call(x, delay)
    return p.JobSpec(fn, flags, args, f"square {x}", JobOptions(**options))


def result(o: p.Outcome) -> Any:
    assert o.status == p.OK, f"job {o.job} did not succeed: status {o.status}, {bytes(o.payload)[:300]!r}"
    return pickle.loads(o.payload)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with Service(tmp_path) as svc:
        yield svc


@pytest.fixture
def client(service: Service) -> Iterator[procsched.Client]:
    c = procsched.connect(service.address, timeout=10, reconnect=2)
    yield c
    c.close()


@pytest.fixture
def batch(client: procsched.Client) -> list[Any]:
    """A well-behaved client's batch, in flight while a test throws garbage."""
    return [client.submit(jobfns.slow_square, x, DELAY) for x in range(BATCH)]


def assert_unharmed(service: Service, client: procsched.Client, batch: list[Any]) -> None:
    assert [f.result(timeout=60) for f in batch] == [x * x for x in range(BATCH)]
    assert service.proc is not None and service.proc.poll() is None, service.output()
    assert client.submit(jobfns.slow_square, 12, 0).result(timeout=10) == 144
    assert client.stats()["crashed"] == 0


# -- malformed frames: one table, one service --------------------------------------------
@dataclass(frozen=True)
class Bad:
    name: str
    greeted: bool  # sent after a valid Hello
    data: bytes
    failure: str | None  # a fragment of the Failure's message; None: no reply (we disconnect mid-frame)
    closes: bool = False  # the service closes the connection after the Failure


_submit = p.frame(p.Submit([spec(3)]))
_over = p.MAX_FRAME + 1

MALFORMED = [
    Bad("a request before Hello", False, p.frame(p.GetStats(1)), "expected Hello first, got GetStats", closes=True),
    Bad("a Submit before Hello", False, _submit, "expected Hello first, got Submit", closes=True),
    Bad("an unknown protocol version", False, p.frame(p.Hello(p.VERSION + 1)), f"protocol version {p.VERSION + 1} is not supported", closes=True),
    Bad("msgpack that is no request, before Hello", False, framed(encode({"hello": 1})), "malformed request", closes=True),
    Bad("an oversized length prefix before Hello", False, p.HEADER.pack(_over), f"frame of {_over} bytes is over the limit of {p.MAX_FRAME}", closes=True),
    Bad("an oversized length prefix", True, p.HEADER.pack(_over), f"frame of {_over} bytes is over the limit of {p.MAX_FRAME}", closes=True),
    Bad("the largest length prefix", True, b"\xff\xff\xff\xff", f"frame of {2**32 - 1} bytes is over the limit", closes=True),
    Bad("a second Hello", True, p.frame(p.Hello(p.VERSION)), "Hello sent twice"),
    Bad("a reply sent as a request", True, p.frame(p.Welcome(1, "e", "s", 1, 1)), "malformed request"),
    Bad("an unknown tag", True, framed(encode([99, 1])), "malformed request"),
    Bad("an empty frame", True, framed(b""), "malformed request"),
    Bad("a body that is not msgpack", True, framed(b"\xc1\xc1\xc1"), "malformed request"),
    Bad("a field of the wrong type", True, framed(encode([15, 1, "two"])), "Expected `int`, got `str` - at `$[2]`"),
    Bad("a Submit of the wrong shape", True, framed(encode([10, {"jobs": []}])), "at `$[1]`"),
    Bad("a truncated frame, then a disconnect", True, _submit[:-7], None),
    Bad("a truncated length prefix, then a disconnect", True, _submit[:2], None),
    Bad("a truncated Hello, then a disconnect", False, p.frame(p.Hello(p.VERSION))[:6], None),
]


def test_malformed_frames_are_refused_by_name(service: Service, client: procsched.Client, batch: list[Any]) -> None:
    # one service for the whole table: a service per row would cost most of a second each
    for bad in MALFORMED:
        with Raw(service.address, hello=bad.greeted) as conn:
            conn.send(bad.data)
            if bad.failure is None:
                continue  # disconnect with the frame half sent
            reply = conn.reply()
            assert type(reply) is p.Failure, f"{bad.name}: {reply}"
            assert (reply.ref, reply.kind) == (0, "ProtocolError") and bad.failure in reply.message, f"{bad.name}: {reply}"
            if bad.closes:
                assert conn.next() is None, f"{bad.name}: the connection stayed open"
            else:
                assert conn.ping(), f"{bad.name}: the connection stopped answering"
    assert_unharmed(service, client, batch)
    assert client.stats()["submitted"] == BATCH + 1  # no half-sent or refused Submit made a job


# -- random streams ------------------------------------------------------------------------
_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12)
)  # fmt: skip
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
_TAGS = sorted({c.__struct_config__.tag for c in typing.get_args(p.Request) + typing.get_args(p.Reply)} | {0, 3, 25, 99, 2**16})
_tagged = st.builds(lambda tag, rest: [tag, *rest], st.sampled_from(_TAGS), st.lists(_values, max_size=5))
_bodies = _values.map(encode) | _tagged.map(encode) | st.binary(max_size=48)
#: requests a random frame must not make: they would change the batch's jobs, or add jobs
_HARMFUL = (p.Submit, p.Cancel, p.Purge, p.Schedule, p.Resubmit)


def _requests(stream: bytes) -> list[Any]:
    """The requests that ``stream`` holds, as the service would read them (undecodable frames skipped)."""
    out, pos = [], 0
    while len(stream) - pos >= 4:
        (n,) = p.HEADER.unpack_from(stream, pos)
        if n > p.MAX_FRAME or len(stream) - pos - 4 < n:
            break
        try:
            out.append(p.decode_request(stream[pos + 4 : pos + 4 + n]))
        except p.ProtocolError:
            pass
        pos += 4 + n
    return out


def _harmless(frames: list[bytes]) -> bool:
    return not any(isinstance(r, _HARMFUL) for r in _requests(b"".join(frames)))


#: (greeted, the frames, whether they are whole frames) : whole frames get one answer each
_streams = st.one_of(
    st.tuples(st.booleans(), st.binary(max_size=300).map(lambda b: [b]), st.just(False)),
    st.tuples(st.booleans(), st.lists(_bodies.map(framed), min_size=1, max_size=4), st.just(False)),
    st.tuples(st.just(True), st.lists(_bodies.map(framed), min_size=1, max_size=4), st.just(True)),
).filter(lambda s: _harmless(s[1]))


def test_random_streams_get_failures_and_leave_the_batch_alone(service: Service, client: procsched.Client, batch: list[Any]) -> None:
    @settings(FUZZ, max_examples=250)
    @given(_streams)
    @example((True, [framed(encode([16]))], True))  # a request missing its ref
    @example((False, [b"\x00\x00\x00\x01\x90" * 3], False))  # an empty array before Hello
    def throw(case: tuple[bool, list[bytes], bool]) -> None:
        greeted, frames, whole = case
        with Raw(service.address, hello=greeted) as conn:
            conn.send(b"".join(frames))
            if whole:  # every frame is answered, once, and the connection goes on
                conn.send(p.frame(p.GetStats(PING)))
                replies = conn.answers(len(frames) + 1)
                assert {type(r) for r in replies} <= {p.Failure, p.Answer}, replies
                assert any(type(r) is p.Answer and r.ref == PING for r in replies), replies
            else:
                replies = [r for r in conn.drain() if type(r) is not p.Outcomes]
                if not greeted and replies:  # before Hello: a Welcome, or one Failure and the end
                    assert type(replies[0]) in (p.Welcome, p.Failure), replies
                    if type(replies[0]) is p.Failure:
                        assert len(replies) == 1, replies
                assert {type(r) for r in replies[1:]} <= {p.Failure, p.Answer}, replies
        for r in replies:
            if type(r) is p.Failure:
                assert r.kind and r.message, r
                if r.ref == 0:
                    assert r.kind == "ProtocolError", r
        assert service.proc is not None and service.proc.poll() is None, service.output()

    throw()
    assert_unharmed(service, client, batch)


# -- Submits with wrong fields --------------------------------------------------------------
@dataclass
class Drawn:
    """A JobSpec as msgpack carries it, and what is wrong with it."""

    fields: list[Any]
    #: msgspec paths, below the spec, of the fields of a wrong type ("" for the spec itself)
    by_type: set[str] = field(default_factory=set)
    #: words a refusal uses for the fields of the right type and a wrong value
    by_value: set[str] = field(default_factory=set)


_NAN, _INF = math.nan, math.inf
_not_finite = st.sampled_from([_NAN, _INF, -_INF])
_ints = st.integers(-(2**63), 2**64 - 1)
_not_str = _ints | st.booleans() | st.none()
#: option: (right values, wrong values, values of a wrong type, the word a refusal uses)
_OPTIONS: dict[str, tuple[Any, Any, Any, str]] = {
    "priority": (_ints, None, st.floats() | st.text(max_size=3) | st.booleans() | st.none(), ""),
    "hot": (st.booleans(), None, st.integers(0, 1) | st.text(max_size=2) | st.none(), ""),
    "timeout": (st.none() | st.floats(5, 3600) | st.integers(5, 3600), st.floats(max_value=0) | st.integers(-(2**63), 0) | _not_finite,
                st.text(max_size=3) | st.booleans(), "'timeout'"),  # fmt: skip
    "preempt": (st.sampled_from(["cooperative", "kill"]), None, st.text(max_size=8).filter(lambda s: s not in ("cooperative", "kill")) | _ints, ""),
    "name": (st.none() | st.text(max_size=10), None, _ints | st.booleans(), ""),
    "tags": (st.lists(st.text(max_size=6), max_size=3), None, st.text(max_size=4) | st.lists(_ints, min_size=1, max_size=2), ""),
}
_RETRY: dict[str, tuple[Any, Any, Any, str]] = {
    "retries": (st.integers(0, 3), st.integers(-(2**63), -1), st.floats() | st.text(max_size=2) | st.booleans(), "'retries'"),
    "backoff": (st.floats(0, 10), st.floats(max_value=-1e-9) | _not_finite, st.text(max_size=2) | st.none(), "'backoff'"),
    "factor": (st.floats(1, 10), st.floats(-10, 0.999) | _not_finite, st.text(max_size=2) | st.none(), "'factor'"),
    "max_backoff": (st.floats(0, 100), st.floats(max_value=-1e-9) | _not_finite, st.text(max_size=2) | st.none(), "'max_backoff'"),
    "jitter": (st.floats(0, 1), st.floats(1.001, 100) | st.floats(max_value=-1e-9) | st.just(_NAN), st.text(max_size=2), "'jitter'"),
    "on": (st.lists(st.text(max_size=10), max_size=2), None, st.text(max_size=3) | st.lists(_ints, min_size=1, max_size=2), ""),
    "crashes": (st.booleans(), None, st.integers(0, 1) | st.none(), ""),
    "timeouts": (st.booleans(), None, st.integers(0, 1) | st.none(), ""),
}


@st.composite
def job_specs(draw: Any, fn: bytes, fn_ref: int, args: bytes, known: list[int]) -> Drawn:
    """A spec whose every field is right, of a wrong value, or of a wrong type.

    A third of the specs are right, a third have only wrong values, a third
    may have both (mostly right fields, so each wrong one is noticed).
    """
    d = Drawn([])
    mode = draw(st.sampled_from(["right", "values", "mixed"]))
    odds = {"right": (1, 0, 0), "values": (3, 1, 0), "mixed": (6, 1, 1)}[mode]

    def one(right: Any, wrong: Any, wrong_type: Any, path: str, word: str) -> Any:
        r, v, t = odds
        kinds = ["right"] * r + ["value"] * v * (wrong is not None) + ["type"] * t * (wrong_type is not None)
        kind = draw(st.sampled_from(kinds))
        if kind == "value":
            d.by_value.add(word)
            return draw(wrong)
        if kind == "type":
            d.by_type.add(path)
            return draw(wrong_type)
        return draw(right)

    n = draw(st.sampled_from([9] * 8 + [5, 6, 7, 8] + [0, 3, 4] * (mode == "mixed")))  # the last 4 fields have defaults
    if n < 5:  # too few fields: the spec has a wrong shape
        d.by_type.add("")
        d.fields = [fn, 0, args, "short"][:n]
        return d
    d.fields = [
        one(st.sampled_from([fn, fn_ref]), st.just(b"") | st.integers(fn_ref + 1, 2**63) | st.integers(-(2**63), 0),
            st.text(max_size=3) | st.floats() | st.booleans() | st.none(), "[0]", "function"),
        one(st.sampled_from([0, F_FN_CACHEABLE]), _ints.filter(lambda f: f & ~(F_FN_CACHEABLE | F_THEN)),
            st.text(max_size=3) | st.floats() | st.booleans(), "[1]", "flags"),
        one(st.just(args), None, st.text(max_size=3) | _ints | st.none(), "[2]", ""),
        one(st.text(max_size=20), None, _ints | st.binary(max_size=3) | st.none(), "[3]", ""),
    ]
    if mode == "mixed" and draw(st.integers(0, 15)) == 0:
        d.by_type.add("[4]")
        d.fields.append(draw(_ints | st.text(max_size=3) | st.lists(_ints, max_size=2)))
    else:
        options: dict[str, Any] = {}
        for name, (right, wrong, wrong_type, word) in _OPTIONS.items():
            if draw(st.booleans()):
                options[name] = one(right, wrong, wrong_type, f"[4].{name}", word)
        if draw(st.booleans()):
            retry = {}
            for name, (right, wrong, wrong_type, word) in _RETRY.items():
                if draw(st.booleans()):
                    retry[name] = one(right, wrong, wrong_type, f"[4].retries.{name}", word)
            options["retries"] = retry
        if draw(st.booleans()):
            options["colour"] = draw(_values)  # unknown keys are ignored: a newer client's options
        d.fields.append(options)
    trailing = [  # key, not_before, deps, dep_policy: sent up to the n-th field
        (st.none() | st.text(max_size=8) | _ints, None, st.floats() | st.binary(max_size=3) | st.booleans(), "[5]", ""),
        (st.just(0.0) | st.floats(-1e9, 1e9) | st.integers(-(10**9), 10**9), _not_finite, st.text(max_size=3) | st.none(), "[6]", "start time"),
        (st.lists(st.sampled_from(known), max_size=2), st.lists(st.integers(10**9, 2**64 - 1) | st.integers(-(2**63), 0), min_size=1, max_size=2),
         st.lists(st.text(max_size=3), min_size=1, max_size=2) | st.text(max_size=3) | _ints, "[7]", "'depends_on'"),
        (st.sampled_from(["cancel", "run"]), st.text(max_size=8).filter(lambda s: s not in ("cancel", "run")), _not_str, "[8]", "'on_failure'"),
    ]  # fmt: skip
    d.fields += [one(*f) for f in trailing[: n - 5]]
    return d


def test_bad_submits_are_refused_naming_the_field(service: Service, client: procsched.Client, batch: list[Any]) -> None:
    fn, flags, args = a_call(7)
    good = [fn, flags, args, "good", {}]
    with Raw(service.address) as conn:
        # Given jobs accepted on this connection, one of them with a function it defines by number
        conn.send(p.frame(p.Submit([spec(x, DELAY) for x in range(20)], fns={1: fn})))
        before = conn.reply()
        assert type(before) is p.Accepted, before
        accepted: set[int] = set(before.jobs)

        @settings(FUZZ, max_examples=200)
        @given(st.integers(0, 2), job_specs(fn, 1, args, before.jobs))
        def submit(lead: int, drawn: Drawn) -> None:
            # When a Submit carries ``lead`` right specs and then the drawn one
            conn.send(framed(encode([p.Submit.__struct_config__.tag, [good] * lead + [drawn.fields]])))
            reply = conn.reply()
            at = f"`$[1][{lead}]"
            # Then a spec of a wrong type fails the frame, naming the field's path
            if drawn.by_type:
                assert type(reply) is p.Failure and reply.kind == "ProtocolError", (reply, drawn)
                assert reply.message.startswith("malformed request"), reply
                assert any(at + path in reply.message for path in drawn.by_type), (reply, drawn)
            # a spec of a wrong value is refused alone (the specs of a Submit are separate
            # submits), naming the option; the right ones before it are accepted
            elif drawn.by_value:
                assert type(reply) is p.Accepted and list(reply.errors) == [lead], (reply, drawn)
                kind, message = reply.errors[lead]
                assert kind in ("ValueError", "TypeError") and reply.jobs[lead] == 0, (reply, drawn)
                assert any(word in message for word in drawn.by_value), (reply, drawn)
                assert all(reply.jobs[:lead]), reply
                accepted.update(reply.jobs[:lead])
            # and a right one is accepted, all of the batch
            else:
                assert type(reply) is p.Accepted and len(reply.jobs) == lead + 1 and not reply.errors, (reply, drawn)
                accepted.update(reply.jobs)
            assert conn.ping()

        submit()
        # Then nothing accepted was lost: every job accepted, before or between the bad ones, ran
        outcomes = conn.wait_outcomes(accepted)
    expected = {job: 49 for job in accepted} | {job: x * x for x, job in enumerate(before.jobs)}
    assert {job: result(o) for job, o in outcomes.items()} == expected
    assert_unharmed(service, client, batch)


def test_extreme_priorities_are_accepted(service: Service) -> None:
    # priorities are any 64-bit int (higher first); only a non-int is refused
    with Raw(service.address) as conn:
        conn.send(p.frame(p.Submit([spec(x, priority=prio) for x, prio in enumerate([-1, -(2**63), 2**63 - 1, 2**64 - 1])])))
        reply = conn.reply()
        assert type(reply) is p.Accepted, reply
        assert sorted(result(o) for o in conn.wait_outcomes(set(reply.jobs)).values()) == [0, 1, 4, 9]
        fn, flags, args = a_call(3)
        conn.send(framed(encode([p.Submit.__struct_config__.tag, [[fn, flags, args, "x", {"priority": 1.5}]]])))
        reply = conn.reply()
        assert type(reply) is p.Failure and "Expected `int`, got `float` - at `$[1][0][4].priority`" in reply.message, reply


# -- garbage functions ----------------------------------------------------------------------
def test_garbage_functions_fail_their_jobs_only(service: Service, client: procsched.Client, batch: list[Any]) -> None:
    _, _, args = a_call(5)
    jobs: dict[int, bytes] = {}
    with Raw(service.address) as conn:

        @settings(FUZZ, max_examples=25)
        @given(st.binary(min_size=1, max_size=64))
        @example(b"\x00not a pickle")
        @example(b"N.")  # None: unpickles, but is not callable
        @example(b"\x80\x05\x95\xff\xff\xff\x00\x00\x00\x00")  # a frame longer than the data
        def submit(garbage: bytes) -> None:
            # the server never unpickles a job: it accepts it and a worker finds out
            conn.send(p.frame(p.Submit([p.JobSpec(garbage, 0, args, "garbage", JobOptions())])))
            reply = conn.reply()
            assert type(reply) is p.Accepted, reply
            jobs[reply.jobs[0]] = garbage

        submit()
        outcomes = conn.wait_outcomes(set(jobs))
    assert all(o.status == p.RAISED for o in outcomes.values()), outcomes
    # a client (another connection) sees each job failed, with an error that says why
    for job, garbage in jobs.items():
        wait_for(lambda: client.show(job)["state"] == "failed", what=f"job {job} to show as failed")
        shown = client.show(job)
        assert re.match(r"[\w.]+: \S", shown["error"]), (garbage, shown)
        if garbage == b"\x00not a pickle":
            assert shown["error"].startswith("SerializationError: cannot unpickle the job in the worker: UnpicklingError"), shown
    assert_unharmed(service, client, batch)


# -- regressions the fuzzing found ------------------------------------------------------
def test_a_month_long_timeout_is_refused_or_harmless(tmp_path: Path) -> None:
    service = Service(tmp_path).start()
    try:
        with Raw(service.address, timeout=5.0) as conn:  # a healthy service answers in milliseconds
            conn.send(p.frame(p.Submit([spec(3, timeout=30 * 86400.0)])))
            reply = conn.reply()
            if type(reply) is p.Accepted and reply.errors:
                assert "'timeout'" in reply.errors[0][1], reply
            else:
                assert type(reply) is p.Accepted, reply
                assert result(conn.wait_outcomes(set(reply.jobs))[reply.jobs[0]]) == 9
            conn.send(p.frame(p.Submit([spec(4)])))
            later = conn.reply()
            assert type(later) is p.Accepted and result(conn.wait_outcomes(set(later.jobs))[later.jobs[0]]) == 16
    finally:
        service.kill()  # not a drain: a service whose supervisor crashed may never finish draining


def test_submits_are_answered_in_order_when_durable(tmp_path: Path) -> None:
    with Service(tmp_path, config='[journal]\nfsync = "always"\n') as service, Raw(service.address) as conn:
        conn.send(p.frame(p.Submit([spec(3)])) + p.frame(p.Submit([spec(4, timeout=-1.0)])))
        first, second = conn.answers(2)
        assert type(first) is p.Accepted and not first.errors, first
        assert type(second) is p.Accepted and second.jobs == [0] and "'timeout'" in second.errors[0][1], second
