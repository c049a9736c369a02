"""The ready queue: two lanes (hot, cold), priority with aging, FIFO ties.

A queued job's effective priority is ``priority + aging_rate * waited``. For
two jobs queued at ``t1`` and ``t2`` the comparison of ``p1 + r(now - t1)``
with ``p2 + r(now - t2)`` does not depend on ``now``, so the heap key
``r * t_queued - priority`` is fixed at push time: aging costs nothing per
turn and the heap never needs re-sorting. Ties go to the earlier sequence
number, i.e. submission order. A job pushed ``front=True`` (a preempted or
returned job) takes a sequence number below every other, so it runs before
the jobs it would tie with.

Most pushes come in key order (jobs of one priority, queued one after the
other), so each lane keeps those in a sorted run (a deque: O(1) at both
ends) and only the others in a heap; a pop takes the smaller of the two
heads. A batch of 100k queued jobs then costs no heap work at all.

Pure: time is a parameter, entries are job ids; stale entries (cancelled
jobs) are the caller's to skip.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

_Entry = tuple[float, int, int]  # (key, sequence, job id)


class _Lane:
    """Entries in order: a sorted run of those pushed in order, a heap of the rest."""

    __slots__ = ("run", "heap")

    def __init__(self) -> None:
        self.run: deque[_Entry] = deque()
        self.heap: list[_Entry] = []

    def push(self, entry: _Entry) -> None:
        run = self.run
        if not run or entry >= run[-1]:
            run.append(entry)
        else:
            heapq.heappush(self.heap, entry)

    def take(self, n: int) -> list[int]:
        """Up to ``n`` entries, in order (the common case, no heap, in one comprehension)."""
        run = self.run
        if not self.heap:
            return [run.popleft()[2] for _ in range(min(n, len(run)))]
        return [self.pop() for _ in range(min(n, len(self)))]

    def pop(self) -> int:
        heap, run = self.heap, self.run
        if heap and (not run or heap[0] < run[0]):
            return heapq.heappop(heap)[2]
        return run.popleft()[2]

    def peek(self) -> int | None:
        heap, run = self.heap, self.run
        if heap and (not run or heap[0] < run[0]):
            return heap[0][2]
        return run[0][2] if run else None

    def remove(self, job_id: int) -> bool:
        for entry in self.run:
            if entry[2] == job_id:
                self.run.remove(entry)  # (the run stays sorted)
                return True
        heap = self.heap
        for i, entry in enumerate(heap):
            if entry[2] == job_id:
                heap[i] = heap[-1]
                heap.pop()
                heapq.heapify(heap)
                return True
        return False

    def __len__(self) -> int:
        return len(self.run) + len(self.heap)


class ReadyQueue:
    def __init__(self, aging_rate: float) -> None:
        self.aging_rate = aging_rate
        self._lanes = (_Lane(), _Lane())  # hot, cold
        self._seq = itertools.count(1)
        # Below every regular number, and rising: jobs put back together (a
        # preempted job, then the prefetch recalled behind it) keep their order.
        self._front = itertools.count(-(1 << 62))

    def push(self, job_id: int, priority: int, hot: bool, queued_at: float, front: bool = False) -> None:
        seq = next(self._front) if front else next(self._seq)
        self._lanes[0 if hot else 1].push((self.aging_rate * queued_at - priority, seq, job_id))

    def take_cold(self, n: int) -> list[int]:
        """The next ``n`` cold entries (fewer if the lane has fewer), in order."""
        return self._lanes[1].take(n)

    def peek_hot(self) -> int | None:
        return self._lanes[0].peek()

    def pop_hot(self) -> int:
        return self._lanes[0].pop()

    def pop_cold(self) -> int:
        return self._lanes[1].pop()

    @property
    def hot(self) -> int:
        return len(self._lanes[0])

    @property
    def cold(self) -> int:
        return len(self._lanes[1])

    def remove(self, job_id: int) -> bool:
        """Take a job's entry out (O(n): for changes a person asks for, not the hot path)."""
        return any(lane.remove(job_id) for lane in self._lanes)

    def __len__(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    def rank(self, priority: int, queued_at: float) -> float:
        """The key this queue would sort by (lower runs first)."""
        return self.aging_rate * queued_at - priority
