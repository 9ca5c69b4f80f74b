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
    them. The next ask waits for the queue to move past the version the last answer had
      - after a fruitless cycle (`settle(placed=0)`), unless capacity changed meanwhile: waiting is then all there
        is to do;
      - after a cycle that placed every head it was given when the answer held the whole queue (fewer heads than
        asked for): the queue had nothing more, so even new capacity finds nothing until the queue changes.
    At light load that is one ask per job instead of a second one answered at once with nothing."""

    def __init__(self, stub: NextJobsStub, wait_millis: int = 1000, timeout: float = 5.0):
        self.stub = stub
        self.wait_millis = wait_millis
        self.timeout = timeout
        self.version = -1
        self._asked = 0  # the limit of the last ask, and how many heads its answer held
        self._given = 0
        # (queue version, capacity epoch or None when any capacity would find nothing) to wait past.
        self._stall: tuple[int, int | None] | None = None

    async def heads(self, room: int, epoch: int, capacity_changed: asyncio.Event) -> list[q.QueuedJob]:
        """The heads for `room` free slots; [] when capacity changed before the queue answered."""
        after = -1
        if self._stall is not None and self._stall[1] in (None, epoch):
            after = self._stall[0]
        self._asked = room * 2 + 4
        request = q.NextJobsRequest(limit=self._asked, after_version=after, wait_millis=self.wait_millis)
        wait_queue = asyncio.ensure_future(self.stub.NextJobs(request, timeout=self.timeout))
        wait_capacity = asyncio.ensure_future(capacity_changed.wait())
        done, _ = await asyncio.wait({wait_queue, wait_capacity}, return_when=asyncio.FIRST_COMPLETED)
        wait_capacity.cancel()
        if wait_queue not in done:
            wait_queue.cancel()
            self._given = -1  # no answer: the next ask must not wait
            return []
        resp = wait_queue.result()
        self.version = resp.version
        self._given = len(resp.jobs)
        return list(resp.jobs)

    def settle(self, placed: int, epoch: int) -> None:
        """Remembers what the next ask may wait for (see the class). (Heads are read, not taken: one not placed is
        still first in its queue, so nothing needs putting back.)"""
        if self._given < 0:
            self._stall = None
        elif placed == self._given and self._given < self._asked:
            self._stall = (self.version, None)  # the whole queue was placed (or it was empty)
        elif not placed:
            self._stall = (self.version, epoch)
        else:
            self._stall = None
