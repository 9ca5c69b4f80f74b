"""Worker lifetimes, followed from the workers prefix and kept durable in etcd, so idle cost survives restarts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig, Pruning
from libs.errors import JobMeshError
from libs.etcd.client import (
    Compare,
    KeyValue,
    RequestOp,
    TxnResult,
    WatchEvent,
    cmp_missing,
    cmp_mod,
    op_delete,
    op_put,
)
from libs.keys import Keys
from libs.pruning import Entry, to_prune
from services.cost.capacity import CapacityCell, DailyCapacity, fold_capacity
from services.cost.daily import merged
from services.cost.idle import WorkerInterval, WorkerLifetimes
from services.cost.keys import CostKeys
from services.cost.metrics import CostMetrics

log = logging.getLogger(__name__)


# Lifetimes per pruning transaction: a compare and a delete each, plus a compare and a put per day they touch.
PRUNE_CHUNK = 32


class IntervalStore(Protocol):
    async def get_prefix(
        self, prefix: str, *, start: str | None = None, limit: int = 0, keys_only: bool = False
    ) -> tuple[list[KeyValue], int, bool]: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult: ...


class WorkerLedger:
    def __init__(
        self,
        store: IntervalStore,
        keys: CostKeys,
        config: MeshConfig,
        clock: Clock,
        metrics: CostMetrics,
        may_write: Callable[[], bool] = lambda: True,
    ):
        self.store = store
        # False on a standby: it follows the workers in memory and writes nothing (see `take_over`).
        self.may_write = may_write
        self.keys = keys
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.lifetimes = WorkerLifetimes()
        self.dirty: set[str] = set()  # worker ids whose interval is not written yet
        self.revisions: dict[str, int] = {}  # worker id -> its stored lifetime's mod revision
        # Lifetimes pruned (see prune): what their workers cost per pool and day, and each aggregate's revision.
        self.capacity: dict[CapacityCell, DailyCapacity] = {}
        self.capacity_revisions: dict[CapacityCell, int] = {}

    @property
    def intervals(self) -> list[WorkerInterval]:
        return list(self.lifetimes.intervals.values())

    async def load(self) -> None:
        """Reads the stored lifetimes and capacity aggregates (what was in memory is dropped); call before
        following the workers."""
        stored = await self._read(self.keys.workers)
        await self._load_capacity()
        self.lifetimes, self.revisions, self.dirty = WorkerLifetimes(), {}, set()
        for kv in stored:
            interval = WorkerInterval.from_json(kv.value)
            self.lifetimes.restore(interval)
            self.revisions[interval.worker_id] = kv.mod_revision

    async def take_over(self, live: Callable[[], Iterable[t.Worker]]) -> None:
        """A new term of the cost leader: the lifetimes as the last leader stored them, then the workers registered
        now (`live`, read once the stored ones are in, so a worker event handled meanwhile counts): a live worker
        keeps its first start, one that left while no leader wrote ends now. The next `flush` writes the changes."""
        await self.load()
        workers = list(live())  # no await between the load and here: nothing changes the lifetimes meanwhile
        now = self.clock.now()
        for worker in workers:
            if self._registered(worker, now):
                self.dirty.add(worker.worker_id)
        await self.close_missing({w.worker_id for w in workers})

    async def _load_capacity(self) -> None:
        stored = await self._read(self.keys.capacity)
        self.capacity.clear()
        self.capacity_revisions.clear()
        for kv in stored:
            cell = DailyCapacity.from_json(kv.value)
            self.capacity[cell.cell] = cell
            self.capacity_revisions[cell.cell] = kv.mod_revision

    async def _read(self, prefix: str) -> list[KeyValue]:
        out: list[KeyValue] = []
        start: str | None = None
        while True:
            kvs, _, more = await self.store.get_prefix(prefix, start=start, limit=1000)
            out += kvs
            if not more or not kvs:
                return out
            start = kvs[-1].key + "\0"

    async def on_worker_event(self, event: WatchEvent) -> None:
        worker = t.Worker()
        worker.ParseFromString(event.kv.value)
        now = self.clock.now()
        if event.kind == "delete":
            changed = self.lifetimes.gone(worker.worker_id, now)
        else:
            changed = self._registered(worker, now)
        if changed:
            self.dirty.add(worker.worker_id)
            await self.flush()

    def _registered(self, worker: t.Worker, now: float) -> bool:
        pool = self.config.pool(worker.pool_id)
        cpu = worker.capacity.cpu_millis or (pool.worker_cpu_millis if pool else 0)
        mem = worker.capacity.memory_mb or (pool.worker_memory_mb if pool else 0)
        start = worker.register_time.ToNanoseconds() / 1e9 if worker.HasField("register_time") else now
        return self.lifetimes.registered(worker.worker_id, worker.pool_id, start, cpu, mem)

    async def close_missing(self, alive: set[str]) -> None:
        """After a (re)start or a takeover: workers that left while no cost leader followed them end now (the error
        is that gap)."""
        closed = self.lifetimes.close_missing(alive, self.clock.now())
        if closed:
            log.info("closed the lifetimes of %d workers that left while no cost leader followed them", len(closed))
            self.dirty.update(closed)
            await self.flush()

    async def flush(self) -> None:
        if not self.may_write():
            return
        for worker_id in sorted(self.dirty):
            interval = self.lifetimes.intervals[worker_id]
            try:
                self.revisions[worker_id] = await self.store.put(self.keys.worker(worker_id), interval.to_json())
            except JobMeshError as exc:
                self.metrics.write_failures.labels("worker_lifetime").inc()
                log.warning("worker lifetime %s not written (%s); retrying next cycle", worker_id, exc.reason)
                continue
            self.dirty.discard(worker_id)

    # Pruning ---------------------------------------------------------------------------------------------------

    async def prune(self, rule: Pruning) -> int:
        """Deletes ended lifetimes older than the rule's age or beyond its newest count, folding their capacity into
        per-day aggregates in the same transaction (so idle cost over their days does not change); returns how many
        went. A lifetime being written (or reopened) is never pruned."""
        ended = [
            Entry(self.keys.worker(w.worker_id), w.end, self.revisions[w.worker_id])
            for w in self.lifetimes.intervals.values()
            if w.end is not None and w.worker_id not in self.dirty and w.worker_id in self.revisions
        ]
        gone = [self.lifetimes.intervals[Keys.last_segment(e.key)] for e in to_prune(ended, self.clock.now(), rule)]
        pruned = 0
        for first in range(0, len(gone), PRUNE_CHUNK):
            pruned += await self._prune(gone[first : first + PRUNE_CHUNK])
        if pruned:
            self.metrics.lifetimes_pruned.inc(pruned)
            log.info("pruned %d worker lifetimes into daily capacity aggregates", pruned)
        return pruned

    async def _prune(self, intervals: list[WorkerInterval]) -> int:
        cells = merged(self.capacity, fold_capacity(intervals, self.config))
        compares = [cmp_mod(self.keys.worker(w.worker_id), self.revisions[w.worker_id]) for w in intervals]
        ops = [op_delete(self.keys.worker(w.worker_id)) for w in intervals]
        for cell in cells.values():
            key = self.keys.capacity_day(cell.pool_id, cell.day)
            revision = self.capacity_revisions.get(cell.cell, 0)
            compares.append(cmp_mod(key, revision) if revision else cmp_missing(key))
            ops.append(op_put(key, cell.to_json()))
        try:
            result = await self.store.txn(compares, ops)
        except JobMeshError as exc:
            log.warning("worker lifetimes not pruned (%s); re-reading them", exc.reason)
            await self._reread(intervals)
            return 0
        if not result.succeeded:
            await self._reread(intervals)
            return 0
        for w in intervals:
            self.lifetimes.intervals.pop(w.worker_id, None)
            self.revisions.pop(w.worker_id, None)
        for cell in cells.values():
            self.capacity[cell.cell] = cell
            self.capacity_revisions[cell.cell] = result.revision
        return len(intervals)

    async def _reread(self, intervals: list[WorkerInterval]) -> None:
        """After a transaction whose outcome we do not know or that lost a race: what is stored is the truth."""
        await self._load_capacity()
        for w in intervals:
            kvs, _, _ = await self.store.get_prefix(self.keys.worker(w.worker_id), limit=1)
            mine = [kv for kv in kvs if kv.key == self.keys.worker(w.worker_id)]
            if not mine:
                self.lifetimes.intervals.pop(w.worker_id, None)
                self.revisions.pop(w.worker_id, None)
            else:
                self.revisions[w.worker_id] = mine[0].mod_revision
