"""Leader-only pool work: declare lost workers, keep static pools full, autoscale dynamic pools with cooldowns."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig, PoolConfig
from libs.etcd.client import Etcd, KeyValue, WatchEvent, cmp_mod, cmp_none_under, op_put
from libs.etcd.election import LeaderElection, run_while_leader
from libs.etcd.informer import Informer
from libs.jobstore import JobStore
from libs.keys import Keys
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.provider import WorkerProvider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingDecision:
    time: float
    pool_id: str
    direction: str  # "up" | "down"
    from_workers: int
    to_workers: int
    trigger: str
    reason: str
    executed: bool


@dataclass(frozen=True)
class QueueDepth:
    """Waiting jobs per queue, how many of them were admitted against a burst session, and how long the
    longest-waiting one has waited (seconds)."""

    by_queue: dict[str, int]
    burst_by_queue: dict[str, int]
    oldest_wait: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolLoad:
    active: int  # registered and not draining
    starting: int  # provisioned, not registered yet
    busy: int
    backlog: int  # waiting jobs this pool may take
    oldest_wait: float = 0.0  # seconds the longest-waiting of them has waited

    @property
    def current(self) -> int:
        return self.active + self.starting


def scaling_target(pool: PoolConfig, load: PoolLoad) -> tuple[int, str]:
    """The size a pool should move to, and the trigger that asks for it. Pure.

    Static pools hold their size. Dynamic and burst pools grow to their busy workers plus one worker per
    `worker_slots` waiting jobs (one per job with the default single slot) when
    enough jobs wait (`scale_up_queue_depth`) or one has waited too long (`scale_up_queue_wait_seconds`), and
    by one worker of headroom when `scale_up_utilization` of the active workers are busy; they shrink (idle
    workers only, see the controller) to what the running and waiting jobs need plus that headroom, never
    below `min_workers`. The controller applies steps and cooldowns."""
    current = load.current
    if pool.kind == "static":
        return pool.max_workers, "pool_size"
    need = load.busy + math.ceil(load.backlog / pool.worker_slots)
    utilization = pool.scale_up_utilization
    want, trigger = current, ""
    if need > current and load.backlog >= pool.scale_up_queue_depth:
        want, trigger = need, "burst_demand" if pool.kind == "burst" else "queue_depth"
    elif need > current and load.backlog and 0 < pool.scale_up_queue_wait_seconds <= load.oldest_wait:
        want, trigger = need, "queue_wait"
    elif utilization and load.active and load.busy >= utilization * load.active and load.starting == 0:
        want, trigger = current + 1, "utilization"
    else:
        keep = need
        if utilization and load.busy:
            keep = max(keep, math.floor(load.busy / utilization) + 1)  # scaling down must not re-trigger it
        want = min(current, keep)
    want = max(pool.min_workers, min(pool.max_workers, want))
    if want > current and not trigger:
        trigger = "min_workers"
    elif want < current:
        trigger = "idle_workers"
    return want, trigger


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.lost = Counter(
            "jobmesh_poolmanager_workers_lost_total", "Workers declared lost.", ["pool"], registry=registry
        )
        self.scaling = Counter(
            "jobmesh_poolmanager_scaling_actions_total",
            "Scaling decisions.",
            ["pool", "direction", "executed"],
            registry=registry,
        )
        self.workers = Gauge(
            "jobmesh_poolmanager_workers", "Workers by pool and state.", ["pool", "state"], registry=registry
        )
        self.provisioning = Histogram(
            "jobmesh_poolmanager_provisioning_seconds",
            "Spawn to registration.",
            ["pool"],
            registry=registry,
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.leader = Gauge("jobmesh_poolmanager_is_leader", "1 while this replica leads.", registry=registry)
        self.events_pruned = Counter(
            "jobmesh_poolmanager_scaling_events_pruned_total",
            "Scaling history entries deleted for age or count ([retention] scaling_events_*).",
            registry=registry,
        )
        self.retired = Counter(
            "jobmesh_poolmanager_workers_retired_total",
            "Workers stopped because they may not be reused.",
            ["pool"],
            registry=registry,
        )


class PoolController:
    def __init__(
        self,
        etcd: Etcd,
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
        self.etcd = etcd
        self.keys = keys
        self.config = config
        self.clock = clock
        self.election = election
        self.workers = workers
        self.assignments = assignments
        self.provider = provider
        self.metrics = metrics
        self.queue_depth = queue_depth
        self.outcomes = outcomes
        self.store = store
        self.interval = interval
        self._last_action: dict[tuple[str, str], float] = {}
        self._last_refusal: dict[tuple[str, str], float] = {}
        self._idle_since: dict[str, float] = {}
        self._stopped: set[str] = set()  # workers we asked to stop, until their record is gone
        self._wake = asyncio.Event()
        for pool in config.pools:
            # Counters exist from the start, so the first loss is an increase that alerts can see.
            metrics.lost.labels(pool.pool_id)
            metrics.retired.labels(pool.pool_id)

    # Informer hooks -----------------------------------------------------------------------------

    def on_worker_event(self, event: WatchEvent) -> None:
        if event.kind == "delete":
            self._idle_since.pop(Keys.last_segment(event.kv.key), None)
            self._stopped.discard(Keys.last_segment(event.kv.key))
            self._wake.set()
        else:
            worker = decode_worker(event.kv)
            if worker.spawn_time.seconds and event.kv.version == 1:
                spawn = worker.spawn_time.ToNanoseconds() / 1e9
                reg = worker.register_time.ToNanoseconds() / 1e9
                self.metrics.provisioning.labels(worker.pool_id).observe(max(reg - spawn, 0.0))

    def on_assignment_event(self, event: WatchEvent) -> None:
        worker_id = Keys.assignment_worker(event.kv.key)
        if event.kind == "delete":
            held = self.keys.worker_assignments(worker_id)
            if not any(key.startswith(held) for key in self.assignments.cache):
                self._idle_since[worker_id] = self.clock.monotonic()
        else:
            self._idle_since.pop(worker_id, None)

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

    async def cycle(self) -> None:
        # Phase 1: jobs on workers that are gone are retried or failed.
        await self.reclaim_lost_workers()
        # Phase 2: workers that may not be reused (max jobs per worker, failed health check) are stopped, to be
        # replaced.
        await self.retire_used_up_workers()
        # Phase 3: every pool moves toward the size its load asks for.
        depth = await self.queue_depth()
        for pool in self.config.pools:
            await self.reconcile_pool(pool, depth)

    async def reclaim_lost_workers(self) -> None:
        live = {Keys.last_segment(k) for k in self.workers.cache}
        for key, kv in list(self.assignments.cache.items()):
            worker_id = Keys.assignment_worker(key)
            if worker_id not in live:
                await self.handle_lost(worker_id, kv)

    async def handle_lost(self, worker_id: str, assign_kv: KeyValue) -> None:
        compares, ops, job = await self.store.reclaim_plan(worker_id, assign_kv, self.clock.now())
        result = await self.election.fenced_txn(compares, ops)
        if result.succeeded and job is not None:
            log.warning(
                "worker %s lost during attempt %d: %s",
                worker_id,
                job.attempt,
                job.message,
                extra={"job_id": job.job_id, "tenant_id": job.tenant_id},
            )
            self.metrics.lost.labels(job.pool_id).inc()
            if job.state == t.JOB_STATE_FAILED:
                self.outcomes.record(job.pool_id, False)

    async def retire_used_up_workers(self) -> None:
        busy = self._busy_ids()
        for pool in self.config.pools:
            for worker in self._pool_workers(pool.pool_id):
                if worker.state == t.WORKER_STATE_DRAINING:
                    # Drained by its failed health check (or by us): stopped once its job, if any, is over.
                    if worker.worker_id not in busy and worker.worker_id not in self._stopped:
                        self._stop(worker)
                        self.metrics.retired.labels(pool.pool_id).inc()
                        log.info("stopped drained worker %s", worker.worker_id)
                elif pool.max_jobs_per_worker and worker.jobs_run >= pool.max_jobs_per_worker:
                    if await self._drain(worker):
                        self.metrics.retired.labels(pool.pool_id).inc()
                        log.info("retired worker %s after %d jobs", worker.worker_id, worker.jobs_run)

    def _stop(self, worker: t.Worker) -> None:
        self._stopped.add(worker.worker_id)
        self.provider.terminate(worker)

    def _busy_ids(self) -> set[str]:
        """Workers holding at least one job."""
        return {Keys.assignment_worker(k) for k in self.assignments.cache}

    def _pool_workers(self, pool_id: str) -> list[t.Worker]:
        return [w for w in (decode_worker(kv) for kv in self.workers.cache.values()) if w.pool_id == pool_id]

    def _size(self, pool: PoolConfig) -> tuple[list[t.Worker], list[t.Worker], int]:
        """(active workers, idle ones among them, workers still starting) of a pool."""
        workers = self._pool_workers(pool.pool_id)
        busy_ids = self._busy_ids()
        active = [w for w in workers if w.state != t.WORKER_STATE_DRAINING]
        idle = [w for w in active if w.worker_id not in busy_ids]
        pending = self.provider.pending(pool.pool_id, {w.worker_id for w in workers}, max_age=60.0)
        return active, idle, len(pending)

    def _backlog(self, pool: PoolConfig, depth: QueueDepth) -> tuple[int, float]:
        """(waiting jobs this pool may take, the longest wait among their queues)."""
        queues = [pool.pool_id]
        if pool.kind == "dynamic" and not self._static_has_room():
            queues.append("default")
        if pool.kind != "burst":
            return sum(depth.by_queue.get(q, 0) for q in queues), max(depth.oldest_wait.get(q, 0.0) for q in queues)
        # Burst capacity serves only jobs admitted against a burst session, and only what static and dynamic
        # capacity cannot: its own queue, a dynamic pool's queue once that pool is at its max, and `default`
        # once static pools are full and every dynamic pool is at its max.
        dynamic = [p for p in self.config.pools if p.kind == "dynamic"]
        at_max = [p.pool_id for p in dynamic if self._at_max(p)]
        queues += at_max
        if len(at_max) == len(dynamic) and not self._static_has_room():
            queues.append("default")
        waiting = [q for q in queues if depth.burst_by_queue.get(q, 0)]
        backlog = sum(depth.burst_by_queue.get(q, 0) for q in waiting)
        return backlog, max((depth.oldest_wait.get(q, 0.0) for q in waiting), default=0.0)

    def _at_max(self, pool: PoolConfig) -> bool:
        active, _, starting = self._size(pool)
        return len(active) + starting >= pool.max_workers

    async def reconcile_pool(self, pool: PoolConfig, depth: QueueDepth) -> None:
        active, idle, starting = self._size(pool)
        busy = len(active) - len(idle)
        self.metrics.workers.labels(pool.pool_id, "busy").set(busy)
        self.metrics.workers.labels(pool.pool_id, "idle").set(len(idle))
        self.metrics.workers.labels(pool.pool_id, "provisioning").set(starting)
        current = len(active) + starting
        if pool.provider != "local":
            return  # workers of this pool are run by something else (e.g. a Kubernetes Deployment)
        backlog, oldest_wait = self._backlog(pool, depth)
        load = PoolLoad(len(active), starting, busy, backlog, oldest_wait)
        want, trigger = scaling_target(pool, load)
        elastic = pool.kind != "static"
        if want > current:
            step = min(want - current, pool.scale_up_step) if elastic else want - current
            reason = f"{busy} busy, {backlog} waiting (longest {oldest_wait:.1f}s), {current} workers"
            if elastic and not self._cooled(pool, "up", pool.scale_up_cooldown_seconds):
                await self._refused(pool, "up", current, current + step, trigger, reason)
                return
            for _ in range(step):
                self.provider.provision(pool)
            await self._record(pool, "up", current, current + step, trigger, reason, True)
        elif want < current and elastic:
            now = self.clock.monotonic()
            idle_long = [
                w for w in idle if now - self._idle_since.setdefault(w.worker_id, now) >= pool.scale_down_idle_seconds
            ]
            if not idle_long:
                return
            target = max(want, current - pool.scale_down_step)
            reason = f"{len(idle_long)} idle for {pool.scale_down_idle_seconds:.0f}s, {backlog} waiting"
            if not self._cooled(pool, "down", pool.scale_down_cooldown_seconds):
                await self._refused(pool, "down", current, target, "idle_workers", reason)
                return
            removed = 0
            for worker in idle_long[: current - target]:
                if await self._drain(worker):
                    removed += 1
            if removed:
                await self._record(pool, "down", current, current - removed, "idle_workers", reason, True)

    def _static_has_room(self) -> bool:
        busy_ids = self._busy_ids()
        return any(
            w.worker_id not in busy_ids and w.state != t.WORKER_STATE_DRAINING
            for pool in self.config.pools
            if pool.kind == "static"
            for w in self._pool_workers(pool.pool_id)
        )

    async def _drain(self, worker: t.Worker) -> bool:
        """Marks an idle worker DRAINING (only if it is still idle) and then stops it: never a busy one."""
        key = self.keys.worker(worker.worker_id)
        kv = self.workers.cache.get(key)
        if kv is None:
            return False
        worker.state = t.WORKER_STATE_DRAINING
        result = await self.election.fenced_txn(
            [cmp_mod(key, kv.mod_revision), cmp_none_under(self.keys.worker_assignments(worker.worker_id))],
            [op_put(key, worker.SerializeToString(), kv.lease)],
        )
        if not result.succeeded:
            return False
        self._stop(worker)
        return True

    def _cooled(self, pool: PoolConfig, direction: str, cooldown: float) -> bool:
        last = self._last_action.get((pool.pool_id, direction))
        return last is None or self.clock.monotonic() - last >= cooldown

    async def _refused(self, pool: PoolConfig, direction: str, cur: int, to: int, trigger: str, reason: str) -> None:
        # One "in cooldown" record per cooldown window keeps the history readable.
        key = (pool.pool_id, direction)
        last = self._last_refusal.get(key, -1e9)
        cooldown = pool.scale_up_cooldown_seconds if direction == "up" else pool.scale_down_cooldown_seconds
        if self.clock.monotonic() - last < cooldown:
            return
        self._last_refusal[key] = self.clock.monotonic()
        await self._record(pool, direction, cur, to, trigger, f"in cooldown: {reason}", False)

    async def _record(
        self, pool: PoolConfig, direction: str, cur: int, to: int, trigger: str, reason: str, executed: bool
    ) -> None:
        if executed:
            self._last_action[(pool.pool_id, direction)] = self.clock.monotonic()
        now = self.clock.now()
        decision = ScalingDecision(now, pool.pool_id, direction, cur, to, trigger, reason, executed)
        key = self.keys.scaling_event(pool.pool_id, int(now * 1000))
        await self.election.fenced_txn([], [op_put(key, json.dumps(asdict(decision)).encode())])
        self.metrics.scaling.labels(pool.pool_id, direction, str(executed).lower()).inc()
        log.info("scale %s %s: %d -> %d (%s; executed=%s)", pool.pool_id, direction, cur, to, reason, executed)


def decode_worker(kv: KeyValue) -> t.Worker:
    worker = t.Worker()
    worker.ParseFromString(kv.value)
    return worker


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
