"""The pickle functions a worker needs, from CPython's C module ``_pickle`` when there is one.

``import pickle`` also loads ``re``, ``enum`` and ``functools`` (about 10 ms of a worker's
boot on a small machine) for its pure-Python fallback and its helpers; ``_pickle`` is the
same pickler, and ``pickle`` re-exports these very objects from it. The modules a worker
imports at boot (``codec``, ``errors``, ``worker``) take pickle from here; an interpreter
without ``_pickle`` gets the ``pickle`` module's.

Stdlib only: workers import this module.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pickle import PickleBuffer, PicklingError, UnpicklingError, dumps, loads
else:
    try:
        from _pickle import PickleBuffer, PicklingError, UnpicklingError, dumps, loads
    except ImportError:  # an interpreter without the C pickler
        from pickle import PickleBuffer, PicklingError, UnpicklingError, dumps, loads

__all__ = ["PickleBuffer", "PicklingError", "UnpicklingError", "dumps", "loads"]
