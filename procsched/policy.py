"""Pure decisions: whether a failed attempt runs again, and after how long.

No clocks, no randomness of its own, no I/O: the supervisor passes the
random draw in, so tests pin every branch.
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import RetryPolicy

ERROR, CRASH, TIMEOUT = "error", "crash", "timeout"


def should_retry(policy: RetryPolicy, attempt: int, kind: str, type_names: Sequence[str] = ()) -> bool:
    """Whether attempt number ``attempt`` (1-based), which failed this way, gets another."""
    if attempt > policy.retries:
        return False
    if kind == CRASH:
        return policy.crashes
    if kind == TIMEOUT:
        return policy.timeouts
    return any(name in policy.on for name in type_names)


def backoff(policy: RetryPolicy, retry: int, draw: float) -> float:
    """Seconds before retry number ``retry`` (1-based); ``draw`` is uniform in [0, 1)."""
    try:
        grown = policy.backoff * policy.factor ** (retry - 1)
    except OverflowError:  # a long retry series: factor ** n is past any float, and any cap
        grown = float("inf") if policy.backoff else 0.0
    base = min(grown, policy.max_backoff)
    return max(0.0, base * (1.0 + policy.jitter * (2.0 * draw - 1.0)))
