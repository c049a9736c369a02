"""Out-of-band buffers: large payloads placed in named POSIX shared memory.

Pickle protocol 5 hands large buffers (numpy arrays, and the top-level
``bytes``/``bytearray`` arguments and results that ``codec`` wraps) to a
callback instead of copying them into the pickle stream. The sender writes
them all into one fresh segment; the frame carries only a descriptor (the
segment's name and each buffer's offset and length). The receiver maps the
segment and rebuilds the objects over the mapping, without a copy.

Lifetimes, so that nothing stays in ``/dev/shm``:

* a job's argument segment is created by ``submit()`` and unlinked by the
  supervisor when the job reaches a final state (a retry maps it again);
* a result segment is created by the worker and unlinked by the supervisor
  the moment the outcome arrives; the mapping it keeps lives as long as the
  objects built over it;
* every name starts with the owning pool's prefix (``psm_<pid>_<token>_``),
  so shutdown sweeps whatever a crash left behind, and a new pool sweeps the
  segments of pools whose process is gone.

Stdlib only: workers import this module.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

TYPE_CHECKING = False  # typing costs a worker ~8 ms at boot; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Any

try:  # the same primitive multiprocessing.shared_memory uses, without its tracker
    import _posixshmem
except ImportError:  # pragma: no cover - not a POSIX platform
    _posixshmem = None

SHM_DIR = "/dev/shm"
PREFIX = "psm_"
_ALIGN = 64
_SPAN = struct.Struct("<QQ")


def pool_prefix(token: str) -> str:
    return f"{PREFIX}{os.getpid()}_{token}_"


def _fd(name: str, create: bool) -> int:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    if _posixshmem is not None:
        return int(_posixshmem.shm_open("/" + name, flags, 0o600))
    return os.open(os.path.join(SHM_DIR, name), flags, 0o600)  # pragma: no cover


def _map(name: str) -> mmap.mmap:
    """Map a segment privately: a job that writes into an argument array gets
    its own copy of the touched pages, and a retry sees the original."""
    fd = _fd(name, False)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_PRIVATE)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    try:
        if _posixshmem is not None:
            _posixshmem.shm_unlink("/" + name)
        else:  # pragma: no cover
            os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def write(name: str, buffers: Sequence[Any]) -> bytes:
    """Place ``buffers`` (PickleBuffers or bytes-likes) in a new segment; return its descriptor."""
    views = [b.raw() if hasattr(b, "raw") else memoryview(b).cast("B") for b in buffers]
    spans = []
    total = 0
    for v in views:
        spans.append((total, v.nbytes))
        total += (v.nbytes + _ALIGN - 1) & ~(_ALIGN - 1)
    # pwrite, not mmap and memcpy: the kernel fills each fresh page of the
    # segment straight from the buffer, with no page fault and no zeroing
    # first (about twice as fast for large buffers).
    fd = _fd(name, True)
    try:
        for (off, n), v in zip(spans, views):
            done = 0
            while done < n:
                done += os.pwrite(fd, v[done:], off + done)
        os.ftruncate(fd, max(total, 1))  # the padding reads as zeros
    finally:
        os.close(fd)
    return name.encode() + b"\0" + b"".join(_SPAN.pack(o, n) for o, n in spans)


def segment_name(descriptor: bytes) -> str:
    return descriptor[: descriptor.index(b"\0")].decode()


def read(descriptor: bytes, unlink_now: bool) -> list[memoryview]:
    """Map the segment a descriptor names; one view per buffer, zero-copy."""
    cut = descriptor.index(b"\0")
    name = descriptor[:cut].decode()
    mm = _map(name)
    if unlink_now:
        unlink(name)
    whole = memoryview(mm)
    return [whole[o : o + n] for o, n in _SPAN.iter_unpack(descriptor[cut + 1 :])]


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix``; how many there were."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:  # pragma: no cover - no /dev/shm to list
        return 0
    gone = 0
    for name in names:
        if name.startswith(prefix):
            unlink(name)
            gone += 1
    return gone


def sweep_orphans() -> int:
    """Unlink segments left by pools whose process no longer exists."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:  # pragma: no cover
        return 0
    gone = 0
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("_", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            unlink(name)
            gone += 1
        except PermissionError:
            pass
    return gone
