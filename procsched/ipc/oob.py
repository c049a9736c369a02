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
  segments of pools whose process is gone; a write that fails removes its
  segment at once.

Speed: a large segment built of small (4 KiB) pages is slow three times over.
The kernel allocates each page as ``pwrite`` reaches it, the reader faults
each one in, and the last close frees them one by one (64 MiB on a 2-core VM:
about 29 ms, 11 ms and 7 ms; the free runs on whichever thread drops the last
object, the supervisor's included). So the part of a segment that fills whole
huge pages (2 MiB on x86-64) is built of them, with ``MADV_COLLAPSE`` (Linux
6.1+), which makes them on request even where ``/dev/shm`` never gets any by
itself (``shmem_enabled`` is "never" by default; only "deny" refuses), and
then filled with one memcpy through a mapping: 64 MiB then takes about 16 ms
to write, 7 ms to read and under 1 ms to free. Where that is unavailable or
fails, ``pwrite`` writes it all in small pages, as before: the path changes
only the speed. See :func:`_write_huge`. (In a VM whose balloon reports free
memory to the host, a huge page left free for a few seconds comes back cold,
a host fault per small page, and such a write can take several times longer;
numpy's own large arrays pay the same there. Pages freed and reused within
seconds, as a stream of large results does, stay warm.)

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
    fd = _fd(name, True)
    try:
        done = _write_huge(fd, total, spans, views)
        _write_small(fd, spans, views, done)
        os.ftruncate(fd, max(total, 1))  # the padding reads as zeros
    except BaseException:
        unlink(name)  # (ENOSPC, most likely) no half-written segment stays behind
        raise
    finally:
        os.close(fd)
    return name.encode() + b"\0" + b"".join(_SPAN.pack(o, n) for o, n in spans)


def _write_small(fd: int, spans: list[tuple[int, int]], views: list[memoryview], start: int) -> None:
    """Write the buffers' bytes from offset ``start`` on (all of them for 0) with pwrite."""
    # pwrite, not mmap and memcpy: the kernel fills each fresh small page
    # straight from the buffer, with no page fault and no zeroing first
    # (about twice as fast as faulting small pages in).
    for (off, n), v in zip(spans, views):
        at = max(off, start)
        while at < off + n:
            at += os.pwrite(fd, v[at - off :], at)


# -- huge pages ----------------------------------------------------------------

_HUGE_MIN = 2 << 20  # the smallest huge page there is (x86-64, arm64 with 4 KiB pages)
_MADV_COLLAPSE = 25  # Linux 6.1; an older kernel answers EINVAL
_MAP_FIXED = 0x10
_PROT_NONE = 0
_huge: Any = None  # (page size, libc, ctypes, MAP_FAILED) once probed; False: none to be had


def _huge_pages() -> Any:
    """What :func:`_write_huge` needs, or ``False``; probed once, on the first large write.

    ctypes, because the mmap module can neither place a mapping at an
    address nor unmap one it did not make.
    """
    global _huge
    if _huge is None:
        _huge = False
        try:
            with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
                size = int(f.read())
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, ValueError, AttributeError, ImportError):  # not Linux, no THP, no ctypes
            return False
        if size >= _HUGE_MIN and size & (size - 1) == 0:
            _huge = (size, libc, ctypes, ctypes.c_void_p(-1).value)
    return _huge


def _write_huge(fd: int, total: int, spans: list[tuple[int, int]], views: list[memoryview]) -> int:
    """Build the segment's whole huge pages and copy into them the bytes they hold.

    Returns the offset up to which the buffers are written: 0 when nothing
    was (too small, or no huge pages here or now), so pwrite does it all.
    ``MADV_COLLAPSE`` wants one small page present in each huge page to be
    (it builds none over a hole) and a mapping whose address is aligned as
    the file offset is; the copy goes only where it succeeded, so a write
    through the mapping never has to allocate (which, on a full tmpfs, would
    be a SIGBUS rather than ENOSPC).
    """
    if total < _HUGE_MIN:
        return 0
    probed = _huge_pages()
    if not probed:
        return 0
    size, libc, ctypes, map_failed = probed
    edge: int = total & ~(size - 1)
    if not edge:
        return 0
    os.ftruncate(fd, total)
    for off in range(0, edge, size):
        os.pwrite(fd, b"\0", off)
    room = edge + size  # reserved first, so an aligned address lies inside it
    base = libc.mmap(None, room, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base is None or base == map_failed:
        return 0
    try:
        at = (base + size - 1) & ~(size - 1)
        if libc.mmap(at, edge, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0) != at:
            return 0
        if libc.madvise(at, edge, _MADV_COLLAPSE) != 0:
            # None here (kernel before 6.1, THP off, shmem_enabled "deny") or
            # none now (no free huge page, a full tmpfs). Asked again next
            # time: the attempt costs microseconds, the write milliseconds.
            return 0
        dst = memoryview((ctypes.c_char * edge).from_address(at)).cast("B")
        try:
            for (off, n), v in zip(spans, views):
                if off < edge:
                    k = min(n, edge - off)
                    dst[off : off + k] = v[:k]
        finally:
            dst.release()  # before the unmap: nothing may reach the memory after it
        return edge
    finally:
        libc.munmap(base, room)


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
