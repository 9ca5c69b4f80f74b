"""Group commit: callers that arrive while a write is in flight share the next write.

A lone caller is written at once; under load, batches grow by themselves to what arrived during the previous
write (one etcd transaction instead of one per caller). With `linger`, a batch that starts within
`10 * linger` of the previous write's end (that is, under steady load) waits `linger` first for more callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

# What one etcd transaction may carry, with room under etcd's default request limit (1.5 MiB) for keys, compares
# and framing: every batch that becomes one transaction is cut to this many bytes of values.
TXN_BYTES = 1024 * 1024


def chunks(
    items: Iterable[T], size: Callable[[T], int], max_items: int, max_bytes: int = TXN_BYTES
) -> Iterator[list[T]]:
    """Consecutive runs of `items` of at most `max_items` and at most `max_bytes` by `size`; an item larger than
    `max_bytes` alone still makes a chunk of its own (the store judges it, and it fails alone)."""
    chunk: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if chunk and (len(chunk) >= max_items or total + n > max_bytes):
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += n
    if chunk:
        yield chunk


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
        size: Callable[[In], int] | None = None,
        max_bytes: int = TXN_BYTES,
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
        self.size = size
        self.max_bytes = max_bytes
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
                batch = self._take()
                await self._write(batch)
            self._last_write = loop.time()
        finally:
            self._flusher = None

    def _take(self) -> list[tuple[In, asyncio.Future[Out]]]:
        """The next batch: up to max_batch callers and, with a `size`, up to max_bytes (at least one caller)."""
        if self.size is None:
            n = self.max_batch
        else:
            size = self.size
            n = len(next(chunks(self._waiting, lambda w: size(w[0]), self.max_batch, self.max_bytes)))
        batch, self._waiting = self._waiting[:n], self._waiting[n:]
        return batch

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
