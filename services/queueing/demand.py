"""What autoscaling reads of each queue, kept as jobs come and go: how many waiting jobs were admitted against a burst
session, and when the longest-waiting one was submitted. Pure; O(log n) per change and O(queues) per read, so the
pool-manager's read every second costs the same with ten jobs waiting or a hundred thousand."""

from __future__ import annotations

import heapq
from collections import Counter


class QueueDemand:
    """The jobs that wait in the fair queue (pending and not backing off), by queue."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[str, float, bool]] = {}  # job id -> (queue, submitted, admitted on a burst)
        self._burst: Counter[str] = Counter()
        # Per queue, a heap of (submitted, job id); entries of jobs that left are dropped when they reach the top
        # or when stale ones outnumber the live ones.
        self._oldest: dict[str, list[tuple[float, str]]] = {}
        self._live: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job_id: str, queue: str, submitted: float, burst: bool) -> None:
        if job_id in self._jobs:
            self.discard(job_id)
        self._jobs[job_id] = (queue, submitted, burst)
        self._live[queue] += 1
        if burst:
            self._burst[queue] += 1
        heap = self._oldest.setdefault(queue, [])
        heapq.heappush(heap, (submitted, job_id))
        if len(heap) > 2 * self._live[queue] + 64:
            self._compact(queue)

    def discard(self, job_id: str) -> None:
        known = self._jobs.pop(job_id, None)
        if known is None:
            return
        queue, _, burst = known
        self._live[queue] -= 1
        if not self._live[queue]:
            del self._live[queue]
            self._oldest.pop(queue, None)
        if burst:
            self._burst[queue] -= 1
            if not self._burst[queue]:
                del self._burst[queue]

    def _valid(self, queue: str, entry: tuple[float, str]) -> bool:
        known = self._jobs.get(entry[1])
        return known is not None and known[0] == queue and known[1] == entry[0]

    def _compact(self, queue: str) -> None:
        heap = [e for e in self._oldest[queue] if self._valid(queue, e)]
        heapq.heapify(heap)
        self._oldest[queue] = heap

    def burst_by_queue(self) -> dict[str, int]:
        return dict(self._burst)

    def oldest_by_queue(self) -> dict[str, float]:
        """When each queue's longest-waiting job was submitted."""
        out: dict[str, float] = {}
        for queue, heap in self._oldest.items():
            while heap and not self._valid(queue, heap[0]):
                heapq.heappop(heap)
            if heap:
                out[queue] = heap[0][0]
        return out
