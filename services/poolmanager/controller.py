"""Leader-only pool work as a phased loop over the pure reconciler: declare lost workers, keep static pools
full, autoscale dynamic pools with cooldowns (the rules are in reconciler.py, the writes in executor.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from libs.clock import Clock
from libs.config import MeshConfig
from libs.etcd.client import WatchEvent
from libs.etcd.election import LeaderElection, run_while_leader
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.lifecycle.codec import decode_worker
from libs.lifecycle.store import JobStore
from services.poolmanager.executor import ActionExecutor
from services.poolmanager.metrics import ControllerMetrics, PoolBacklogCollector
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.provider import WorkerProvider
from services.poolmanager.reconciler import (
    Memory,
    QueueDepth,
    View,
    pool_backlogs,
    reconcile_pools,
    reconcile_workers,
)

log = logging.getLogger(__name__)


class PoolController:
    def __init__(
        self,
        keys: Keys,
        config: MeshConfig,
        clock: Clock,
        election: LeaderElection,
        workers: Informer,
        assignments: Informer,
        provider: WorkerProvider,
        metrics: ControllerMetrics,
        queue_depth: QueueDepthSource,
        outcomes: JobOutcomes,
        store: JobStore,
        interval: float = 1.0,
    ):
        self.keys = keys
        self.config = config
        self.clock = clock
        self.election = election
        self.workers = workers
        self.assignments = assignments
        self.provider = provider
        self.metrics = metrics
        self.queue_depth = queue_depth
        self.interval = interval
        self.memory = Memory()
        self.executor = ActionExecutor(keys, clock, election, workers, store, provider, metrics, outcomes, self.memory)
        self._wake = asyncio.Event()
        self.backlogs: dict[str, int] = {}  # waiting jobs per pool, as of the last cycle
        metrics.registry.register(PoolBacklogCollector(lambda: self.backlogs if self.election.is_leader else {}))
        for pool in config.pools:
            # Counters exist from the start, so the first loss is an increase that alerts can see.
            metrics.lost.labels(pool.pool_id)
            metrics.retired.labels(pool.pool_id)

    # Informer hooks -----------------------------------------------------------------------------

    def on_worker_event(self, event: WatchEvent) -> None:
        if event.kind == "delete":
            self.memory.idle_since.pop(Keys.last_segment(event.kv.key), None)
            self.memory.stopped.discard(Keys.last_segment(event.kv.key))
            self._wake.set()
        else:
            worker = decode_worker(event.kv.value)
            if worker.spawn_time.seconds and event.kv.version == 1:
                spawn = worker.spawn_time.ToNanoseconds() / 1e9
                reg = worker.register_time.ToNanoseconds() / 1e9
                self.metrics.provisioning.labels(worker.pool_id).observe(max(reg - spawn, 0.0))

    def on_assignment_event(self, event: WatchEvent) -> None:
        worker_id = Keys.assignment_worker(event.kv.key)
        if event.kind == "delete":
            held = self.keys.worker_assignments(worker_id)
            if not any(key.startswith(held) for key in self.assignments.cache):
                self.memory.idle_since[worker_id] = self.clock.monotonic()
        else:
            self.memory.idle_since.pop(worker_id, None)

    # Leader loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        await run_while_leader(self.election, self._cycle_then_wait, self.metrics.leader, "pool")

    async def _cycle_then_wait(self) -> None:
        try:
            await self.cycle()
        finally:
            self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.interval)
        except TimeoutError:
            pass

    def _phase(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.metrics.phase.labels(name).observe(now - start)
        return now

    async def cycle(self) -> None:
        started = time.perf_counter()
        # Phase 0: the leadership this cycle acts under; every write below is fenced by it.
        token = self.election.token()
        # Phase 1: what the caches and the provider show.
        view = self.view()
        mark = self._phase("1_view", started)
        # Phase 2: jobs on workers that are gone are retried or failed; workers that may not be reused (max jobs
        # per worker, failed health check) are stopped, to be replaced.
        await self.executor.apply(reconcile_workers(view), token)
        mark = self._phase("2_workers", mark)
        # Phase 3: how many jobs wait, per queue (a queueing outage gives none: scaling holds, nothing else).
        view = replace(view, depth=await self.queue_depth())
        self.backlogs = pool_backlogs(view)
        mark = self._phase("3_queue_depth", mark)
        # Phase 4: every pool moves toward the size its load asks for.
        await self.executor.apply(reconcile_pools(view, self.clock), token)
        self._phase("4_pools", mark)

    def view(self) -> View:
        workers = [decode_worker(kv.value) for kv in self.workers.cache.values()]
        starting = {}
        for pool in self.config.pools:
            known = {w.worker_id for w in workers if w.pool_id == pool.pool_id}
            starting[pool.pool_id] = len(self.provider.pending(pool.pool_id, known, max_age=60.0))
        return View(self.config.pools, workers, dict(self.assignments.cache), starting, self.memory)


class QueueDepthSource:
    """Reads queue depth per queue from the queueing service."""

    def __init__(self, stub: object):
        self.stub = stub

    async def __call__(self) -> QueueDepth:
        from jobmesh.queueing.v1 import queueing_pb2 as q

        try:
            resp = await self.stub.GetQueueStats(q.GetQueueStatsRequest(), timeout=2.0)  # type: ignore[attr-defined]
        except Exception as exc:  # a queueing outage must not stop lost-worker handling
            log.warning("queue depth unavailable: %s", exc)
            return QueueDepth({}, {})
        return QueueDepth(
            dict(resp.depth_by_queue), dict(resp.burst_depth_by_queue), dict(resp.oldest_wait_seconds_by_queue)
        )
