"""Worker lifetimes, followed from the workers prefix and kept durable in etcd, so idle cost survives restarts."""

from __future__ import annotations

import logging
from typing import Protocol

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError
from libs.etcd.client import KeyValue, WatchEvent
from services.cost.idle import WorkerInterval, WorkerLifetimes
from services.cost.keys import CostKeys
from services.cost.metrics import CostMetrics

log = logging.getLogger(__name__)


class IntervalStore(Protocol):
    async def get_prefix(
        self, prefix: str, *, start: str | None = None, limit: int = 0, keys_only: bool = False
    ) -> tuple[list[KeyValue], int, bool]: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...


class WorkerLedger:
    def __init__(self, store: IntervalStore, keys: CostKeys, config: MeshConfig, clock: Clock, metrics: CostMetrics):
        self.store = store
        self.keys = keys
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.lifetimes = WorkerLifetimes()
        self.dirty: set[str] = set()  # worker ids whose interval is not written yet

    @property
    def intervals(self) -> list[WorkerInterval]:
        return list(self.lifetimes.intervals.values())

    async def load(self) -> None:
        """Reads the stored lifetimes; call before following the workers."""
        start: str | None = None
        while True:
            kvs, _, more = await self.store.get_prefix(self.keys.workers, start=start, limit=1000)
            for kv in kvs:
                self.lifetimes.restore(WorkerInterval.from_json(kv.value))
            if not more or not kvs:
                return
            start = kvs[-1].key + "\0"

    async def on_worker_event(self, event: WatchEvent) -> None:
        worker = t.Worker()
        worker.ParseFromString(event.kv.value)
        now = self.clock.now()
        if event.kind == "delete":
            changed = self.lifetimes.gone(worker.worker_id, now)
        else:
            pool = self.config.pool(worker.pool_id)
            cpu = worker.capacity.cpu_millis or (pool.worker_cpu_millis if pool else 0)
            mem = worker.capacity.memory_mb or (pool.worker_memory_mb if pool else 0)
            start = worker.register_time.ToNanoseconds() / 1e9 if worker.HasField("register_time") else now
            changed = self.lifetimes.registered(worker.worker_id, worker.pool_id, start, cpu, mem)
        if changed:
            self.dirty.add(worker.worker_id)
            await self.flush()

    async def close_missing(self, alive: set[str]) -> None:
        """After (re)start: workers that left while this service was down end now (the error is the downtime)."""
        closed = self.lifetimes.close_missing(alive, self.clock.now())
        if closed:
            log.info("closed the lifetimes of %d workers that left while cost was down", len(closed))
            self.dirty.update(closed)
            await self.flush()

    async def flush(self) -> None:
        for worker_id in sorted(self.dirty):
            interval = self.lifetimes.intervals[worker_id]
            try:
                await self.store.put(self.keys.worker(worker_id), interval.to_json())
            except JobMeshError as exc:
                self.metrics.write_failures.labels("worker_lifetime").inc()
                log.warning("worker lifetime %s not written (%s); retrying next cycle", worker_id, exc.reason)
                continue
            self.dirty.discard(worker_id)
