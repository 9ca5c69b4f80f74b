"""List-then-watch over an etcd prefix: a local cache kept in step, with every change handed to a callback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from libs.errors import Unavailable
from libs.etcd.client import Etcd, KeyValue, WatchCompacted, WatchEvent, WatchProgress

# What each informer of this process received from its watch (a service registers these in its registry: see
# libs/main.py): the fan-out of etcd's writes, which decides much of what a job costs (docs/benchmarks.md, issue 17).
WATCH_MESSAGES = Counter(
    "jobmesh_informer_watch_messages_total",
    "Watch responses an informer received, each one message from etcd.",
    ["informer"],
    registry=None,
)
WATCH_EVENTS = Counter(
    "jobmesh_informer_events_total",
    "Changes of stored keys an informer received through its watch.",
    ["informer"],
    registry=None,
)

log = logging.getLogger(__name__)

Handler = Callable[[WatchEvent], Awaitable[None] | None]

# A list reads pages of at most this many keys and, by the largest value seen so far, about this many bytes: well
# under the client's 64 MiB receive limit however large the records are.
PAGE_KEYS = 2000
PAGE_BYTES = 8 * 1024 * 1024
_FIRST_PAGE_KEYS = 64


def next_page_limit(largest_value: int) -> int:
    """How many keys the next page may ask for, given the largest value met so far."""
    return max(1, min(PAGE_KEYS, PAGE_BYTES // max(largest_value, 1)))


BatchHandler = Callable[[list[WatchEvent]], Awaitable[None] | None]


class Informer:
    """Keeps `cache` equal to the keys under `prefix`; calls `handler` for each put and delete, in order, and
    `batch_handler` once with the events of each watch response (one etcd transaction's changes arrive
    together), for handlers that do better work in bulk.

    After a reconnect it resumes from the last revision seen; after a compaction it lists again and
    replays the difference, so the handler never misses a change (it may see a key's latest value only).
    """

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        handler: Handler | None = None,
        name: str = "",
        batch_handler: BatchHandler | None = None,
    ):
        self.etcd = etcd
        self.prefix = prefix
        self.handler = handler
        self.batch_handler = batch_handler
        self.name = name or prefix
        self.cache: dict[str, KeyValue] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self.progress = WatchProgress()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer:{self.name}")

    async def stop(self, forget: bool = False) -> None:
        """Stops watching; with `forget`, also drops the cache so that a later `start` lists afresh."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if forget:
            self.cache = {}
            self.revision = 0
            self.synced.clear()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_synced(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    @property
    def caught_up_to(self) -> int:
        """The revision up to which every change under the prefix has been handled."""
        return max(self.revision, self.progress.revision) if self.synced.is_set() else 0

    async def wait_revision(self, revision: int, timeout: float = 10.0) -> None:
        """Returns once every change up to `revision` has been handled (e.g. all writes made before a leadership
        began); TimeoutError otherwise."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.caught_up_to < revision:
            left = end - loop.time()
            if left <= 0:
                raise TimeoutError(f"informer {self.name} did not reach revision {revision}")
            self.progress.heard.clear()
            self.progress.request()
            try:
                await asyncio.wait_for(self.progress.heard.wait(), min(left, 0.1))
            except TimeoutError:
                pass

    async def _emit(self, event: WatchEvent) -> WatchEvent:
        if event.kind == "put":
            self.cache[event.kv.key] = event.kv
        else:
            # A delete carries no value; hand the handler the last value we knew.
            old = self.cache.pop(event.kv.key, None)
            if old is not None:
                event = WatchEvent("delete", old, event.revision)
        if self.handler is not None:
            try:
                result = self.handler(event)
                if result is not None:
                    await result
            except Exception:
                log.exception("informer %s: handler failed for %s", self.name, event.kv.key)
        return event

    async def _emit_batch(self, events: list[WatchEvent]) -> None:
        if self.batch_handler is None or not events:
            return
        try:
            result = self.batch_handler(events)
            if result is not None:
                await result
        except Exception:
            log.exception("informer %s: batch handler failed for %d events", self.name, len(events))

    async def _list(self) -> None:
        """Every page at the first page's revision, so the list is one consistent snapshot and the watch that
        follows from the revision after it misses no change, however long the list took."""
        kvs: list[KeyValue] = []
        start: str | None = None
        revision = 0
        limit = _FIRST_PAGE_KEYS
        largest = 0
        while True:
            page, at, more = await self.etcd.get_prefix(self.prefix, start=start, limit=limit, revision=revision)
            revision = revision or at
            kvs.extend(page)
            if not more or not page:
                break
            largest = max(largest, *(len(kv.value) for kv in page))
            limit = next_page_limit(largest)
            start = page[-1].key + "\0"
        fresh = {kv.key: kv for kv in kvs}
        seen: list[WatchEvent] = []
        for key in [k for k in self.cache if k not in fresh]:
            seen.append(await self._emit(WatchEvent("delete", self.cache[key], revision)))
        for key, kv in fresh.items():
            old = self.cache.get(key)
            if old is None or old.mod_revision != kv.mod_revision:
                seen.append(await self._emit(WatchEvent("put", kv, kv.mod_revision)))
        await self._emit_batch(seen)
        self.revision = revision

    async def _run(self) -> None:
        backoff = 0.2
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    self.synced.set()
                messages, events = WATCH_MESSAGES.labels(self.name), WATCH_EVENTS.labels(self.name)
                async for batch in self.etcd.watch(self.prefix, self.revision + 1, self.progress):
                    backoff = 0.2
                    messages.inc()
                    events.inc(len(batch))
                    seen = []
                    for event in batch:
                        seen.append(await self._emit(event))
                        self.revision = max(self.revision, event.revision)
                    await self._emit_batch(seen)
            except WatchCompacted:
                need_list = True
            except Unavailable as exc:
                log.warning("informer %s: %s; retrying in %.1fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 3.0)
