"""Single-producer single-consumer byte rings in shared memory.

A :class:`Channel` is one anonymous shared-memory file (``memfd``) holding a
control block and two rings, one per direction, between the supervisor and
one worker. It is created by the supervisor and inherited by the worker as
an fd, so it has no name to leak: the kernel frees it when the last of the
two processes lets go.

Layout (every control word on its own 64-byte line)::

    words   in.head  in.tail  in.sleeping  out.head  out.tail  out.sleeping
            started  yield_req  stop  recall  out.bell  ... (see ``W_*``)
    data    [ in ring  | out ring ]

A record is a little-endian ``u32`` length and the bytes, padded to 8; a
length of ``WRAP`` means "continue at offset 0". Head and tail are
monotonically increasing byte counters, so full and empty are unambiguous.

Wakeups: a consumer that finds its ring empty raises its ``sleeping`` word,
issues a full fence, looks once more, and only then blocks on its doorbell.
A producer publishes its head, fences, and rings the doorbell only if it sees
``sleeping`` raised. The fence is a lock round trip (an atomic read-modify-
write, a full barrier on x86-64 and a release/acquire pair elsewhere); it
closes the store-load window of this Dekker-style handshake, and the
sleeper's wait keeps a long backstop timeout in case a platform's ordering
is weaker than that.

Producers never block: a frame that does not fit returns ``False`` and the
caller retries after the consumer has drained (the supervisor keeps the job
queued; a worker waits for its supervisor to consume). Frames larger than a
quarter of the ring travel out of band (``oob.py``).

Stdlib only: workers import this at boot.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

WRAP = 0xFFFFFFFF
_LINE = 64
_WORDS = 16
_CONTROL = _LINE * _WORDS

# Control word indices (each a signed 64-bit integer on its own line).
W_IN_HEAD, W_IN_TAIL, W_IN_SLEEPING = 0, 1, 2
W_OUT_HEAD, W_OUT_TAIL, W_OUT_SLEEPING = 3, 4, 5
W_STARTED = 6  # id of the job the worker began last (0: none yet; IN_INITIALIZER: the pool's initializer)
W_YIELD = 7  # id of the job asked to yield (0: none)
W_STOP = 8  # non-zero: begin nothing more, exit
W_RECALL = 9  # bumped by the supervisor: return every job not yet begun
IN_INITIALIZER = -1  # W_STARTED while a worker runs the pool's initializer
W_OUT_BELL = 10  # which supervisor doorbell the worker rings: 0 the loop thread's, 1 the lent one

_U32 = struct.Struct("<I")
_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier, as cheaply as pure Python gets one."""
    _fence_lock.acquire()
    _fence_lock.release()


class _Words:
    """The control block as an array of 64-bit words, one per cache line."""

    __slots__ = ("_q",)

    def __init__(self, buf: memoryview) -> None:
        self._q = buf[:_CONTROL].cast("q")

    def __getitem__(self, i: int) -> int:
        return self._q[i * 8]

    def __setitem__(self, i: int, v: int) -> None:
        self._q[i * 8] = v

    def release(self) -> None:
        self._q.release()


class Ring:
    """One direction of a channel. Each side uses only its own half of the API."""

    __slots__ = ("_w", "_data", "_cap", "_ih", "_it", "_is", "_head", "_tail")

    def __init__(self, words: _Words, data: memoryview, head: int, tail: int, sleeping: int) -> None:
        self._w = words
        self._data = data
        self._cap = len(data)
        self._ih, self._it, self._is = head, tail, sleeping
        self._head = words[head]  # producer's private copy
        self._tail = words[tail]  # consumer's private copy

    @property
    def max_frame(self) -> int:
        return self._cap // 4

    # -- producer ---------------------------------------------------------
    def put(self, frame: bytes | bytearray | memoryview) -> bool:
        """Write one frame (not yet visible). ``False`` if there is no room."""
        n = len(frame)
        size = (n + 4 + 7) & ~7
        cap = self._cap
        head = self._head
        off = head % cap
        skip = cap - off if off + size > cap else 0
        if head + skip + size - self._w[self._it] > cap:
            return False
        data = self._data
        if skip:
            _U32.pack_into(data, off, WRAP)
            head += skip
            off = 0
        _U32.pack_into(data, off, n)
        data[off + 4 : off + 4 + n] = frame
        self._head = head + size
        return True

    def publish(self) -> bool:
        """Make written frames visible; ``True`` if the consumer must be woken."""
        w = self._w
        w[self._ih] = self._head
        fence()
        if w[self._is]:
            w[self._is] = 0
            return True
        return False

    def free(self) -> int:
        return self._cap - (self._head - self._w[self._it])

    # -- consumer ---------------------------------------------------------
    def has_data(self) -> bool:
        return self._w[self._ih] != self._tail

    def read(self) -> tuple[bytes, list[tuple[int, int]]]:
        """Every published frame at once: one copy of them all and each one's ``(start, end)``
        in it, oldest first; frees their room."""
        head = self._w[self._ih]
        tail = self._tail
        if head == tail:
            return b"", []
        data = self._data
        cap = self._cap
        a, b = tail % cap, head % cap
        chunk = bytes(data[a:b]) if a < b else b"".join((data[a:], data[:b]))  # (one copy either way)
        spans = []
        pos, size = 0, head - tail
        while pos < size:
            n = _U32.unpack_from(chunk, pos)[0]
            if n == WRAP:  # the rest of the ring's end is padding: the next frame is at its start
                pos = cap - a
                continue
            spans.append((pos + 4, pos + 4 + n))
            pos += (n + 4 + 7) & ~7
        self._tail = head
        self._w[self._it] = head
        return chunk, spans

    def prepare_sleep(self) -> bool:
        """Announce sleep; ``False`` (and no sleep) if data arrived meanwhile."""
        w = self._w
        w[self._is] = 1
        fence()
        if w[self._ih] != self._tail:
            w[self._is] = 0
            return False
        return True

    def woke(self) -> None:
        self._w[self._is] = 0


class Channel:
    """The shared block between the supervisor and one worker."""

    __slots__ = ("fd", "size", "_map", "_buf", "words", "inbound", "outbound")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = memoryview(self._map)
        self.words = _Words(self._buf)
        ring = (size - _CONTROL) // 2 & ~7
        d_in = self._buf[_CONTROL : _CONTROL + ring]
        d_out = self._buf[_CONTROL + ring : _CONTROL + 2 * ring]
        self.inbound = Ring(self.words, d_in, W_IN_HEAD, W_IN_TAIL, W_IN_SLEEPING)
        self.outbound = Ring(self.words, d_out, W_OUT_HEAD, W_OUT_TAIL, W_OUT_SLEEPING)

    @classmethod
    def create(cls, ring_bytes: int) -> Channel:
        size = _CONTROL + 2 * ((ring_bytes + 7) & ~7)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("procsched-channel", os.MFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux fallback: an unlinked temp file
            import tempfile

            fd, path = tempfile.mkstemp(prefix="procsched-channel-")
            os.unlink(path)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def close(self) -> None:
        for view in (self.inbound._data, self.outbound._data):
            view.release()
        self.words.release()
        self._buf.release()
        self._map.close()
        try:
            os.close(self.fd)
        except OSError:
            pass
