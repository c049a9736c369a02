"""The ready queue: two lanes (hot, cold), priority with aging, FIFO ties.

A queued job's effective priority is ``priority + aging_rate * waited``. For
two jobs queued at ``t1`` and ``t2`` the comparison of ``p1 + r(now - t1)``
with ``p2 + r(now - t2)`` does not depend on ``now``, so the heap key
``r * t_queued - priority`` is fixed at push time: aging costs nothing per
turn and the heap never needs re-sorting. Ties go to the earlier sequence
number, i.e. submission order. A job pushed ``front=True`` (a preempted or
returned job) takes a sequence number below every other, so it runs before
the jobs it would tie with.

Pure: time is a parameter, entries are job ids; stale entries (cancelled
jobs) are the caller's to skip.
"""

from __future__ import annotations

import heapq
import itertools


class ReadyQueue:
    def __init__(self, aging_rate: float) -> None:
        self.aging_rate = aging_rate
        self._lanes: tuple[list[tuple[float, int, int]], list[tuple[float, int, int]]] = ([], [])
        self._seq = itertools.count(1)
        # Below every regular number, and rising: jobs put back together (a
        # preempted job, then the prefetch recalled behind it) keep their order.
        self._front = itertools.count(-(1 << 62))

    def push(self, job_id: int, priority: int, hot: bool, queued_at: float, front: bool = False) -> None:
        seq = next(self._front) if front else next(self._seq)
        heapq.heappush(self._lanes[0 if hot else 1], (self.aging_rate * queued_at - priority, seq, job_id))

    def peek_hot(self) -> int | None:
        hot = self._lanes[0]
        return hot[0][2] if hot else None

    def pop_hot(self) -> int:
        return heapq.heappop(self._lanes[0])[2]

    def pop_cold(self) -> int:
        return heapq.heappop(self._lanes[1])[2]

    @property
    def hot(self) -> int:
        return len(self._lanes[0])

    @property
    def cold(self) -> int:
        return len(self._lanes[1])

    def remove(self, job_id: int) -> bool:
        """Take a job's entry out (O(n): for changes a person asks for, not the hot path)."""
        for lane in self._lanes:
            for i, entry in enumerate(lane):
                if entry[2] == job_id:
                    lane[i] = lane[-1]
                    lane.pop()
                    heapq.heapify(lane)
                    return True
        return False

    def __len__(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    def rank(self, priority: int, queued_at: float) -> float:
        """The key this queue would sort by (lower runs first)."""
        return self.aging_rate * queued_at - priority
