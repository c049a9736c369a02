"""JobFuture: a ``concurrent.futures.Future`` whose value is decoded by its reader.

The supervisor resolves a future with the bytes the worker produced, never
unpickling them itself (that keeps its loop short, and in service mode keeps
client data out of the supervisor). The first ``result()`` or
``exception()`` call decodes them in the caller's thread and caches the
object. Waiters (``wait``, ``as_completed``, callbacks) work unchanged: a
failed job is resolved through ``set_exception`` with a placeholder, so
``FIRST_EXCEPTION`` sees it as a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from . import codec


class Encoded:
    """A job's pickled result, with its out-of-band buffers."""

    __slots__ = ("payload", "buffers")

    def __init__(self, payload: bytes, buffers: Sequence[memoryview]) -> None:
        self.payload = payload
        self.buffers = buffers


class EncodedError(Exception):
    """Placeholder for a job's exception until someone reads it."""

    def __init__(self, payload: bytes) -> None:
        super().__init__("job failed (not yet decoded)")
        self.payload = payload


class JobFuture(Future):  # type: ignore[type-arg]
    """The future of one procsched job. ``job_id`` names it in logs and stats."""

    job_id: int = 0

    def result(self, timeout: float | None = None) -> Any:
        try:
            value = super().result(timeout)
        except EncodedError:
            value = EncodedError
        if value is EncodedError:  # raised outside the except block: no chained context
            raise self._decode_error()
        if type(value) is Encoded:
            value = codec.load_value(value.payload, value.buffers)
            with self._condition:
                self._result = value
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = super().exception(timeout)
        if type(exc) is EncodedError:
            return self._decode_error()
        return exc

    def _decode_error(self) -> BaseException:
        with self._condition:
            exc = self._exception
            if type(exc) is EncodedError:
                exc = self._exception = codec.load_error(exc.payload)
        assert exc is not None
        return exc

    def __repr__(self) -> str:
        return super().__repr__().replace("<JobFuture ", f"<JobFuture job={self.job_id} ", 1)
