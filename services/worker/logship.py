"""Sends one attempt's output to the pool-manager as it is written (AppendJobLog), in order, from one task.

What the job writes is buffered here, bounded: when the pool-manager cannot keep up (or is unreachable) the oldest
unsent output is dropped, and the store marks the gap where it was. Chunks carry their offset in the attempt's
output, so a chunk sent again after a lost answer is stored once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm

log = logging.getLogger(__name__)

# Unsent output one attempt may hold on the worker before its oldest is dropped.
MAX_BUFFER_BYTES = 10 * 1024 * 1024
# Most bytes per call.
CHUNK_BYTES = 256 * 1024
# After output arrives, wait this long for more before sending: fewer, larger calls for chatty jobs.
LINGER_SECONDS = 0.2

_GIVE_UP = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INVALID_ARGUMENT,
)

Send = Callable[[pm.AppendJobLogRequest], Awaitable[pm.AppendJobLogResponse]]


class LogShipper:
    def __init__(
        self,
        send: Send,
        worker_id: str,
        job_id: str,
        attempt: int,
        max_buffer: int = MAX_BUFFER_BYTES,
        linger: float = LINGER_SECONDS,
    ):
        self._send = send
        self.worker_id = worker_id
        self.job_id = job_id
        self.attempt = attempt
        self.max_buffer = max_buffer
        self.linger = linger
        self._buffer = bytearray()
        self._start = 0  # the attempt's offset of _buffer[0]
        self.dropped = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._refused = False
        self._task: asyncio.Task[None] | None = None

    def write(self, data: bytes) -> None:
        """The executor's sink: called on the loop with each chunk the job writes."""
        if self._refused:
            return
        self._buffer += data
        excess = len(self._buffer) - self.max_buffer
        if excess > 0:
            del self._buffer[:excess]
            self._start += excess
            self.dropped += excess
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"log-{self.job_id}")

    async def close(self, timeout: float) -> None:
        """Sends what is left, for up to `timeout` seconds (the result waits for it: a reader who sees the job
        ended finds its whole output)."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            log.warning("output of the job not all sent in %.1fs", timeout, extra={"job_id": self.job_id})

    async def _run(self) -> None:
        delay = 0.2
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not self._closing:
                    # Linger for more output, but not past the job's end: its result waits for this.
                    try:
                        await asyncio.wait_for(self._closed.wait(), self.linger)
                    except TimeoutError:
                        pass
                continue
            chunk = bytes(self._buffer[:CHUNK_BYTES])
            request = pm.AppendJobLogRequest(
                worker_id=self.worker_id, job_id=self.job_id, attempt=self.attempt, offset=self._start, data=chunk
            )
            try:
                resp = await self._send(request)
            except grpc.aio.AioRpcError as exc:
                # Not ours to write (any more), or a pool-manager without logs: stop sending this attempt's output.
                if exc.code() in _GIVE_UP:
                    log.warning("output refused: %s", exc.details(), extra={"job_id": self.job_id})
                    self._refused = True
                    self._buffer.clear()
                    return
                if self._closing and delay > 1.0:
                    return  # the result must not wait on a pool-manager that does not answer
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.2
            sent = min(max(resp.next_offset - self._start, len(chunk)), len(self._buffer))
            del self._buffer[:sent]
            self._start += sent
