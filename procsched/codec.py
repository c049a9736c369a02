"""Pickling of calls, results, errors and checkpoints: the only cloudpickle user.

Who calls what:

* the caller, inside ``submit()``: :meth:`CallEncoder.encode` (so a bad
  argument raises right there), then :func:`load_value` /
  :func:`load_error` when a future's result is asked for;
* the worker: :func:`load_call`, then :func:`dump_value` or
  :func:`dump_error`;
* the supervisor: nothing. It moves the bytes this module makes without
  ever loading them, and never imports this module.

Speed: the C pickler does the work whenever it can. A module-level function
is pickled by reference once and the bytes are cached (``F_FN_CACHEABLE``
tells the worker it may cache the loaded function too). Arguments go through
the C pickler first and fall back to cloudpickle only when that fails or the
stream refers to ``__main__`` (a function or class defined in a script or
notebook, which a worker could not import by name). cloudpickle itself is
imported the first time it is needed.

Large buffers (pickle protocol 5: numpy arrays, and top-level ``bytes`` or
``bytearray`` arguments and results, which :class:`_Big` exposes as buffers)
are returned separately so the caller can place them out of band.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Sequence

from . import context
from . import fastpickle as pickle  # (pickle.py itself costs a worker's boot ~10 ms)
from .errors import Preempted, RemoteError, SerializationError, rebuild
from .ipc import frames

TYPE_CHECKING = False  # typing costs a worker ~8 ms at boot; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Any

OOB_MIN = 128 * 1024  # buffers at least this large travel out of band
_IN_BAND = float("inf")  # as an ``oob_min``: every buffer stays in the pickle stream
_MAIN = b"__main__"
# Arguments of these types alone pickle as they are: no buffer to take out
# of band, no reference to ``__main__`` for cloudpickle to resolve.
_SCALARS = frozenset((int, float, str, bool, type(None)))


def _cloudpickle() -> Any:
    import cloudpickle

    return cloudpickle


class _Big:
    """Makes a large top-level ``bytes``/``bytearray`` travel as a protocol-5 buffer."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.value), (pickle.PickleBuffer(self.value),)


def _wrap(value: Any) -> Any:
    if type(value) in (bytes, bytearray) and len(value) >= OOB_MIN:
        return _Big(value)
    return value


def _dumps(obj: Any, buffers: list[pickle.PickleBuffer], oob_min: float = OOB_MIN) -> bytes:
    """Pickle with the C pickler, falling back to cloudpickle; big buffers to ``buffers``."""

    def keep(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < oob_min:
            return True  # small: in band
        buffers.append(buf)
        return False

    try:
        data = pickle.dumps(obj, 5, buffer_callback=keep)
        if _MAIN not in data:
            return data
    except (pickle.PicklingError, TypeError, AttributeError):
        pass
    del buffers[:]
    return _cloudpickle().dumps(obj, protocol=5, buffer_callback=keep)  # type: ignore[no-any-return]


def _by_reference(fn: Any) -> bool:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    return bool(module) and module != "__main__" and "<" not in qualname


def state_copied_by_value(fn: Any) -> list[str]:
    """The global state ``fn`` uses (assigns, or reads a value that is not a module, class or
    function), if it travels by value (defined in ``__main__``, say): it gets its own copy of
    those globals in a worker, which no other function sees."""
    code = getattr(fn, "__code__", None)
    if code is None or _by_reference(fn):
        return []
    import dis  # (only for such a function: a pool's initializer from a script)

    found = {i.argval for i in dis.get_instructions(code) if i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL")}
    scope = getattr(fn, "__globals__", {})
    for name in _global_names(code):
        value = scope.get(name, _Absent)
        if value is not _Absent and not isinstance(value, (types.ModuleType, type)) and not callable(value):
            found.add(name)
    return sorted(found)


class _Absent:
    """A global a function names but its module lacks (a builtin, an attribute name)."""


def _global_names(code: types.CodeType) -> frozenset[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return frozenset(names)


def _fingerprint(fn: types.FunctionType, names: frozenset[str]) -> tuple[int, ...]:
    """Identity of everything a by-value pickle of ``fn`` captures that can be rebound."""
    g = fn.__globals__
    cells = fn.__closure__ or ()
    ids = [id(fn.__code__), id(fn.__defaults__), id(fn.__kwdefaults__)]
    ids += [id(g.get(n)) for n in names]
    ids += [id(c.cell_contents) if _cell_full(c) else 0 for c in cells]
    return tuple(ids)


def _cell_full(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _module_builtin(fn: Any) -> bool:
    """A C function of a module (``operator.mul``, ``math.sqrt``): pickled by name."""
    return type(fn) is types.BuiltinFunctionType and isinstance(getattr(fn, "__self__", None), types.ModuleType)


class CallEncoder:
    """Turns ``fn(*args, **kwargs)`` into bytes; owned by one pool.

    A function's pickle is cached per function object. One pickled by value
    (defined in ``__main__``, a notebook cell, or a closure) is pickled again
    when a global name it reads, a closure cell, its defaults or its code is
    rebound; a mutable global changed in place is not noticed, which matches
    what a worker that imported the function once would see.
    """

    def __init__(self) -> None:
        self._fn_cache: weakref.WeakKeyDictionary[Any, tuple[Any, bytes]] = weakref.WeakKeyDictionary()
        self._builtins: dict[Any, bytes] = {}
        # the last function pickled by reference, with its answer (one tuple: read whole by
        # any thread): a batch of submits of one function skips the weak dictionary (its get
        # is Python code) after the first
        self._last: tuple[Any, tuple[bytes, int]] = (None, (b"", 0))

    def function(self, fn: Callable[..., Any]) -> tuple[bytes, int]:
        """The pickled function and its dispatch flags."""
        last, answer = self._last
        if fn is last:
            return answer
        if type(fn) is not types.FunctionType:
            if _module_builtin(fn):
                data = self._builtins.get(fn)  # a C function of a module (operator.mul, math.sqrt): by name
                if data is None:
                    data = self._pickle_function(fn)
                    if len(self._builtins) < 1024:
                        self._builtins[fn] = data
                return data, frames.F_FN_CACHEABLE
            return self._pickle_function(fn), 0
        hit = self._fn_cache.get(fn)
        if hit is not None:
            key, data = hit
            if key is None:
                self._last = (fn, (data, frames.F_FN_CACHEABLE))
                return data, frames.F_FN_CACHEABLE
            if key[1] == _fingerprint(fn, key[0]):
                return data, frames.F_FN_CACHEABLE
        if _by_reference(fn):
            try:
                data = pickle.dumps(fn, 5)
            except (pickle.PicklingError, TypeError, AttributeError):
                pass
            else:
                self._fn_cache[fn] = (None, data)
                self._last = (fn, (data, frames.F_FN_CACHEABLE))
                return data, frames.F_FN_CACHEABLE
        names = _global_names(fn.__code__)
        data = self._pickle_function(fn)
        self._fn_cache[fn] = ((names, _fingerprint(fn, names)), data)
        return data, frames.F_FN_CACHEABLE

    def carried(self, fn: Callable[..., Any]) -> Any:
        """``fn`` as a ``map`` batch's argument: a function as a :class:`Carried` pickle, a
        callable object (which may hold state) as itself.

        A function pickled by value is pickled afresh for each ``map`` (a global changed in
        place since is seen, as when every batch pickled it), and that pickle is what later
        ``submit`` calls reuse.
        """
        if type(fn) is types.FunctionType:
            if not _by_reference(fn):
                self._fn_cache.pop(fn, None)
        elif not _module_builtin(fn):
            return fn
        return Carried(self.function(fn)[0])

    def _pickle_function(self, fn: Any) -> bytes:
        try:
            return _cloudpickle().dumps(fn, protocol=5)  # type: ignore[no-any-return]
        except Exception as e:
            raise SerializationError(f"cannot pickle function {_name(fn)}: {e}") from e

    def arguments(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], in_band: bool = False) -> tuple[bytes, list[pickle.PickleBuffer]]:
        """The pickled ``(args, kwargs)`` and the large buffers left out of it (none if ``in_band``)."""
        if not kwargs and not in_band and _SCALARS.issuperset(map(type, args)):
            return pickle.dumps((args, kwargs), 5), []  # nothing out of band, nothing of __main__
        buffers: list[pickle.PickleBuffer] = []
        if in_band:
            try:
                return _dumps((args, kwargs), buffers, _IN_BAND), buffers
            except Exception as e:
                raise SerializationError(f"cannot pickle the arguments of {_name(fn)}: {e}") from e
        if args:
            args = tuple(map(_wrap, args))
        if kwargs:
            kwargs = {k: _wrap(v) for k, v in kwargs.items()}
        try:
            return _dumps((args, kwargs), buffers), buffers
        except Exception as e:
            raise SerializationError(f"cannot pickle the arguments of {_name(fn)}: {e}") from e


def run_chunk(fn: Callable[..., Any], chunk: Sequence[Any], star: bool = True) -> list[Any]:
    """Runs in a worker: one job made of an explicit ``map`` chunk; one failure fails it all.

    ``star``: each item is a tuple of arguments; otherwise each item is the one argument.
    """
    return _run_batch(fn, chunk, star, keep_errors=False)


def run_calls(fn: Callable[..., Any], calls: Sequence[Any], star: bool = True) -> list[Any]:
    """Runs in a worker: a batch of ``map`` calls that keep their own outcomes.

    A call that raises becomes an :class:`ItemError` in its place, and the
    list comes back as :class:`WithErrors`, so the caller checks each value
    only when it must; each call's result or exception reaches the caller as
    if it had been a job of its own. ``star`` as for :func:`run_chunk`.
    """
    return _run_batch(fn, calls, star, keep_errors=True)


def check_path(path: str) -> str:
    """``"package.module:function"`` (a dotted attribute after the colon is fine), checked for form."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name or not all(p.isidentifier() for p in (*module.split("."), *name.split("."))):
        raise ValueError(f"{path!r} is not a function's import path (expected 'package.module:function')")
    return path


class ByPath:
    """A function named by import path: the worker imports it when the job runs.

    A job given this way holds no pickled code: it survives any restart and
    any change of the submitter's environment, as long as the workers can
    import the module (``pool.submit("package.module:function", ...)``).
    """

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = check_path(path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib

        module, _, name = self.path.partition(":")
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ByPath, (self.path,))

    def __repr__(self) -> str:
        return f"ByPath({self.path!r})"


_loaded: dict[bytes, Any] = {}  # a process's functions by their pickle (a worker's cache)
_LOADED_MAX = 1024


def load_function(data: bytes) -> Any:
    """A cacheable function's pickle (:meth:`CallEncoder.function`), unpickled once per process."""
    fn = _loaded.get(data)
    if fn is None:
        if len(_loaded) >= _LOADED_MAX:
            _loaded.clear()
        fn = _loaded[data] = pickle.loads(data)
    return fn


class Carried:
    """A function inside a job's arguments (a ``map`` batch's), as the pickle the encoder
    keeps for it: the batches of one ``map`` pickle it once, and a worker unpickles it once
    (:func:`load_function`), where cloudpickle would redo both for every batch."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (load_function, (self.data,))


def callable_of(fn: Any) -> Any:
    """What a front door runs for ``fn``: ``fn`` itself, or a :class:`ByPath` for a ``"module:function"`` str."""
    if isinstance(fn, str):
        return ByPath(fn)
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    return fn


def then_parts(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The caller's half of a continuation: the call, pickled in band (see :func:`run_then`)."""
    try:
        return _dumps((fn, args, kwargs), [], _IN_BAND)
    except Exception as e:
        raise SerializationError(f"cannot pickle the continuation {_name(fn)}: {e}") from e


def dump_initializer(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """A pool's ``(initializer, initargs)``, pickled in band for each worker to call as it starts."""
    try:
        return _dumps((fn, args), [], _IN_BAND)
    except Exception as e:
        raise SerializationError(f"cannot pickle the pool's initializer {_name(fn)} and its initargs: {e}") from e


def run_then(parts: bytes, payload: bytes, buffers: list[bytes]) -> Any:
    """Runs in a worker: ``fn(prerequisite's result, *args, **kwargs)`` of ``pool.then``."""
    fn, args, kwargs = pickle.loads(parts)
    return fn(load_value(payload, [memoryview(b) for b in buffers]), *args, **kwargs)


class ItemError:
    """One failed call of a batch of ``map`` calls: its error payload (see :func:`dump_error`)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return ItemError, (self.payload,)

    def error(self) -> BaseException:
        return load_error(self.payload)


class WithErrors(list):  # type: ignore[type-arg]
    """The outcomes of a batch of calls of which at least one failed (an :class:`ItemError` in its place)."""


class BatchState:
    """A batch's checkpoint: the call that saved ``inner``, and the outcomes before it.

    ``done`` is ``None`` for a checkpoint streamed while the call ran
    (``preempt="kill"``): a batch killed then runs again from its first call,
    and only the call at ``index`` sees ``inner`` as its ``resume_from``.
    """

    __slots__ = ("index", "done", "inner")

    def __init__(self, index: int, done: list[Any] | None, inner: Any) -> None:
        self.index = index
        self.done = done
        self.inner = inner

    def __reduce__(self) -> tuple[Any, ...]:
        return BatchState, (self.index, self.done, self.inner)


def _run_batch(fn: Callable[..., Any], calls: Sequence[Any], star: bool, keep_errors: bool) -> list[Any]:
    """Run ``calls`` in order; a preempted batch resumes at the call that yielded.

    Each call sees its own checkpoint (``current_job().resume_from``), not
    its neighbours': the job's checkpoint is a :class:`BatchState`.
    """
    ctx = context._current
    if ctx is None or (ctx._send is None and type(ctx.resume_from) is not BatchState):
        return _run_fresh(fn, calls, star, keep_errors, ctx)
    out: list[Any] = []
    start, resume_at, inner = 0, -1, None
    if ctx is not None and type(ctx.resume_from) is BatchState:
        saved: BatchState = ctx.resume_from
        resume_at, inner = saved.index, saved.inner
        if saved.done is not None:
            start, out = saved.index, list(saved.done)
    at = [start]  # the running call's index, for streamed checkpoints
    if ctx is not None and ctx._send is not None:
        send = ctx._send
        ctx._send = lambda job_id, state: send(job_id, BatchState(at[0], None, state))
    append = out.append
    failed = any(type(v) is ItemError for v in out)
    for i in range(start, len(calls)):
        at[0] = i
        if ctx is not None:
            ctx.resume_from = inner if i == resume_at else None
        item = calls[i]
        try:
            append(fn(*item) if star else fn(item))
        except Preempted as p:
            raise Preempted(BatchState(i, out, p.state)) from None
        except BaseException as e:  # noqa: BLE001 - the call's failure, like a job's
            if not keep_errors:
                raise
            append(ItemError(dump_error(e)))
            failed = True
    return WithErrors(out) if failed else out


def _run_fresh(fn: Callable[..., Any], calls: Sequence[Any], star: bool, keep_errors: bool, ctx: context.JobContext | None) -> list[Any]:
    """:func:`_run_batch` of a batch that neither resumes nor streams checkpoints.

    No call has a checkpoint of its own and none needs its index while it
    runs, so the calls run in a plain loop (about three times less overhead
    per call): the running call's index is ``len(out)``, one outcome per
    call before it.
    """
    if ctx is not None:
        ctx.resume_from = None
    out: list[Any] = []
    append = out.append
    failed = False
    it = iter(calls)
    while True:
        try:
            if star:
                for item in it:
                    append(fn(*item))
            else:
                for item in it:
                    append(fn(item))
            return WithErrors(out) if failed else out
        except Preempted as p:
            raise Preempted(BatchState(len(out), out, p.state)) from None
        except BaseException as e:  # noqa: BLE001 - the call's failure, like a job's
            if not keep_errors:
                raise
            append(ItemError(dump_error(e)))
            failed = True


def dump_outcome(fn: Any, value: Any, preempted: bool) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle what ``fn`` returned: its result, or with ``preempted`` its checkpoint.

    A checkpoint travels in band (it comes back as a resume, bytes alone). For
    a batch of :func:`run_calls`, a result that cannot be pickled fails its
    own call (an :class:`ItemError`), not the batch; so does one kept in a
    preempted batch's :class:`BatchState`. Raises ``SerializationError``.
    """
    batch = fn is run_calls
    try:
        return (dump_state(value), []) if preempted else dump_value(value)
    except SerializationError:
        if not batch:
            raise
    if not preempted:
        return dump_value(_picklable(value))
    if type(value) is not BatchState or value.done is None:
        return dump_state(value), []  # raises again: nothing per call to isolate
    return dump_state(BatchState(value.index, _picklable(value.done), value.inner)), []


def _picklable(values: list[Any]) -> WithErrors:
    """``values`` with each one that cannot be pickled replaced by its call's error."""
    kept = WithErrors()
    for v in values:
        try:
            _dumps(_wrap(v), [])
            kept.append(v)
        except Exception as e:
            err = SerializationError(f"cannot pickle the job's result of type {type(v).__qualname__}: {e}")
            kept.append(ItemError(dump_error(err)))
    return kept


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


# -- worker side -------------------------------------------------------------


def load_call(fn_bytes: bytes, args_bytes: bytes, buffers: Sequence[memoryview]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    fn = pickle.loads(fn_bytes)
    args, kwargs = pickle.loads(args_bytes, buffers=buffers)
    return fn, args, kwargs


def dump_value(value: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle a result or checkpoint; raises ``SerializationError`` naming its type."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        return _dumps(_wrap(value), buffers), buffers
    except Exception as e:
        raise SerializationError(f"cannot pickle the job's result of type {type(value).__qualname__}: {e}") from e


def dump_state(state: Any) -> bytes:
    """Pickle a checkpoint with every buffer in band: the supervisor keeps it as bytes alone."""
    try:
        return _dumps(state, [], _IN_BAND)
    except Exception as e:
        raise SerializationError(f"cannot pickle the job's checkpoint of type {type(state).__qualname__}: {e}") from e


def _type_names(exc: BaseException) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def dump_error(exc: BaseException) -> bytes:
    """An error payload the caller can always render, even if the class can't be loaded."""
    import traceback  # only a failing job pays for it (and for the re module it loads)

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled = _dumps(exc, [], _IN_BAND)  # an error payload has no room for out-of-band buffers
    except Exception:
        pickled = b""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ fails the job, not the worker that reports it
        message = "<exception str() failed>"
    return frames.encode_error(_type_names(exc), message, tb, pickled)


# -- caller side -------------------------------------------------------------


def load_value(payload: bytes, buffers: Sequence[memoryview] = ()) -> Any:
    try:
        return pickle.loads(payload, buffers=buffers)
    except Exception as e:
        raise SerializationError(f"cannot unpickle the job's result here: {e}") from e


def load_error(payload: bytes) -> BaseException:
    names, message, tb, pickled = frames.decode_error(payload)
    if pickled:
        try:
            exc = pickle.loads(pickled)
            if isinstance(exc, BaseException):
                return rebuild(exc, tb)
        except Exception:
            pass
    type_name = names[0] if names else "Exception"
    if type_name.startswith("builtins."):
        type_name = type_name[len("builtins.") :]
    return rebuild(RemoteError(type_name, message, tb), tb)
