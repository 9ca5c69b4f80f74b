"""Group commit: callers that arrive while a write is in flight share the next write.

A lone caller is written at once; under load, batches grow by themselves to what arrived during the previous
write (one etcd transaction instead of one per caller). With `linger`, a batch that starts within
`10 * linger` of the previous write's end (that is, under steady load) waits `linger` first for more callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class GroupCommit(Generic[In, Out]):
    """`submit(item)` returns what `write(batch)` returned for that item (the i-th result for the i-th item),
    or raises what the write of its batch raised. A result that is an exception is raised to its caller alone."""

    def __init__(
        self,
        write: Callable[[list[In]], Awaitable[list[Out | Exception]]],
        max_batch: int = 64,
        on_batch: Callable[[int], None] | None = None,
        name: str = "group-commit",
        linger: float = 0.0,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        self.linger = linger
        self._last_write = float("-inf")
        self.write = write
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.name = name
        self._waiting: list[tuple[In, asyncio.Future[Out]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=self.name)
        return await future

    async def _flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            if self.linger and loop.time() - self._last_write < 10 * self.linger:
                await asyncio.sleep(self.linger)
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                await self._write(batch)
            self._last_write = loop.time()
        finally:
            self._flusher = None

    async def _write(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            results = await self.write([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
