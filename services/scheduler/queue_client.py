"""The scheduler's side of the queueing service: the heads of the fair queue, long-polled when nothing changed
since a cycle that could place nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

from jobmesh.queueing.v1 import queueing_pb2 as q


class NextJobsStub(Protocol):
    def NextJobs(self, request: q.NextJobsRequest, timeout: float) -> Awaitable[q.NextJobsResponse]: ...


class QueueClient:
    """Asks for a few more heads than there is room for, so jobs no worker suits do not starve the ones behind
    them. After a fruitless cycle (`settle(placed=0)`), the next ask waits for the queue to move past the version
    that cycle saw, unless capacity changed meanwhile: waiting is then all there is to do."""

    def __init__(self, stub: NextJobsStub, wait_millis: int = 1000, timeout: float = 5.0):
        self.stub = stub
        self.wait_millis = wait_millis
        self.timeout = timeout
        self.version = -1
        # (queue version, capacity epoch) of the last cycle that placed nothing.
        self._stall: tuple[int, int] | None = None

    async def heads(self, room: int, epoch: int, capacity_changed: asyncio.Event) -> list[q.QueuedJob]:
        """The heads for `room` free slots; [] when capacity changed before the queue answered."""
        after = self._stall[0] if self._stall is not None and self._stall[1] == epoch else -1
        request = q.NextJobsRequest(limit=room * 2 + 4, after_version=after, wait_millis=self.wait_millis)
        wait_queue = asyncio.ensure_future(self.stub.NextJobs(request, timeout=self.timeout))
        wait_capacity = asyncio.ensure_future(capacity_changed.wait())
        done, _ = await asyncio.wait({wait_queue, wait_capacity}, return_when=asyncio.FIRST_COMPLETED)
        wait_capacity.cancel()
        if wait_queue not in done:
            wait_queue.cancel()
            return []
        resp = wait_queue.result()
        self.version = resp.version
        return list(resp.jobs)

    def settle(self, placed: int, epoch: int) -> None:
        """Remembers a fruitless cycle, so the next one waits for the queue or the workers to change. (Heads are
        read, not taken: one not placed is still first in its queue, so nothing needs putting back.)"""
        self._stall = None if placed else (self.version, epoch)
