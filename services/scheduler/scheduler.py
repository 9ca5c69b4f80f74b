"""The scheduling loop (leader only): match queued jobs to idle workers, in numbered, timed phases."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.clock import Clock
from libs.config import MeshConfig
from libs.etcd.client import cmp_missing, cmp_mod, op_put
from libs.etcd.election import LeaderElection, run_while_leader
from libs.etcd.informer import Informer
from libs.jobs import apply_dispatch, fits, ts
from libs.keys import Keys

log = logging.getLogger(__name__)


# Placement order (the seed's pool selection chart): static, then dynamic, then burst capacity.
TIER_STATIC, TIER_DYNAMIC, TIER_BURST = 0, 1, 2
TIERS = {"static": TIER_STATIC, "dynamic": TIER_DYNAMIC, "burst": TIER_BURST}


@dataclass(frozen=True)
class Candidate:
    worker: t.Worker
    mod_revision: int
    tier: int = TIER_STATIC


def pick_worker(spec: t.JobSpec, idle: list[Candidate], burst_ok: bool = False) -> Candidate | None:
    """Static pools first, then dynamic, then (only for a job admitted against a burst session) burst capacity;
    within a tier the tightest fit (least spare CPU, then memory), so big workers stay free."""
    suitable = [
        c
        for c in idle
        if (burst_ok or c.tier != TIER_BURST)
        and (not spec.pool or c.worker.pool_id == spec.pool)
        and fits(c.worker.capacity, dict(c.worker.labels), spec)
    ]
    if not suitable:
        return None
    return min(
        suitable,
        key=lambda c: (
            c.tier,
            c.worker.capacity.cpu_millis - spec.resources.cpu_millis,
            c.worker.capacity.memory_mb - spec.resources.memory_mb,
            c.worker.worker_id,
        ),
    )


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.phase = Histogram(
            "jobmesh_scheduler_phase_seconds",
            "Time per scheduling phase.",
            ["phase"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.dispatched = Counter(
            "jobmesh_scheduler_dispatched_total", "Jobs handed to workers.", ["pool"], registry=registry
        )
        self.conflicts = Counter(
            "jobmesh_scheduler_dispatch_conflicts_total",
            "Dispatches that lost a race (stale job or worker).",
            registry=registry,
        )
        self.unplaced = Gauge(
            "jobmesh_scheduler_unplaced_jobs", "Jobs seen last cycle with no suitable idle worker.", registry=registry
        )
        self.leader = Gauge("jobmesh_scheduler_is_leader", "1 while this replica leads.", registry=registry)
        self.allocation = Histogram(
            "jobmesh_scheduler_allocation_seconds",
            "Submit to dispatch.",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )


class Scheduler:
    def __init__(
        self,
        keys: Keys,
        config: MeshConfig,
        clock: Clock,
        election: LeaderElection,
        workers: Informer,
        assignments: Informer,
        queueing: object,
        metrics: SchedulerMetrics,
    ):
        self.keys = keys
        self.tiers = {p.pool_id: TIERS[p.kind] for p in config.pools}
        self.max_jobs = {p.pool_id: p.max_jobs_per_worker for p in config.pools if p.max_jobs_per_worker}
        self.clock = clock
        self.election = election
        self.workers = workers
        self.assignments = assignments
        self.queueing = queueing
        self.metrics = metrics
        self.dispatched = 0
        self.capacity_changed = asyncio.Event()
        self._claimed: dict[str, float] = {}  # worker id -> when we assigned it (until the informer shows it)
        self._version = -1
        self._epoch = 0  # bumped on every worker or assignment change
        # (queue version, epoch) of the last cycle that placed nothing: until one of them moves, waiting is all
        # there is to do.
        self._stall: tuple[int, int] | None = None

    def on_change(self, _event: object) -> None:
        self._epoch += 1
        self.capacity_changed.set()

    async def run(self) -> None:
        await run_while_leader(self.election, self.schedule_once, self.metrics.leader, "scheduling")

    def _phase(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.metrics.phase.labels(name).observe(now - start)
        return now

    async def schedule_once(self) -> None:
        started = time.perf_counter()
        # Phase 1: snapshot idle workers.
        self.capacity_changed.clear()
        epoch = self._epoch
        idle = self.idle_workers()
        mark = self._phase("1_snapshot", started)
        if not idle:
            await self._wait_for_capacity(1.0)
            return
        # Phase 2: heads of the fair queue (long-poll when nothing changed since a fruitless cycle).
        heads = await self._heads(len(idle), epoch)
        mark = self._phase("2_heads", mark)
        # Phase 3: nominate a worker for each head, in queue order.
        plan: list[tuple[q.QueuedJob, Candidate]] = []
        for queued in heads:
            choice = pick_worker(queued.job.spec, idle, burst_ok=bool(queued.job.burst_session_id))
            if choice is not None:
                idle.remove(choice)
                plan.append((queued, choice))
        self.metrics.unplaced.set(len(heads) - len(plan))
        mark = self._phase("3_nominate", mark)
        # Phase 4: admit, each as a fenced transaction.
        results = await asyncio.gather(*(self._dispatch(job, cand) for job, cand in plan))
        mark = self._phase("4_admit", mark)
        # Phase 5: remember a fruitless cycle, so the next one waits for the queue or the workers to change.
        self._stall = None if any(results) else (self._version, epoch)
        self._phase("5_requeue", mark)

    async def _wait_for_capacity(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.capacity_changed.wait(), timeout)
        except TimeoutError:
            pass
        self.capacity_changed.clear()

    async def _heads(self, idle_count: int, epoch: int) -> list[q.QueuedJob]:
        stalled = self._stall is not None and self._stall[1] == epoch
        after = self._stall[0] if stalled and self._stall else -1
        request = q.NextJobsRequest(limit=max(16, idle_count * 4), after_version=after, wait_millis=1000)
        wait_queue = asyncio.ensure_future(self.queueing.NextJobs(request, timeout=5.0))  # type: ignore[attr-defined]
        wait_workers = asyncio.ensure_future(self.capacity_changed.wait())
        done, _ = await asyncio.wait({wait_queue, wait_workers}, return_when=asyncio.FIRST_COMPLETED)
        wait_workers.cancel()
        if wait_queue not in done:
            wait_queue.cancel()
            return []
        resp = wait_queue.result()
        self._version = resp.version
        return list(resp.jobs)

    def idle_workers(self) -> list[Candidate]:
        now = time.monotonic()
        busy = {Keys.last_segment(k) for k in self.assignments.cache}
        for worker_id in [w for w, at in self._claimed.items() if w in busy or now - at > 5.0]:
            del self._claimed[worker_id]
        out = []
        for kv in self.workers.cache.values():
            worker = t.Worker()
            worker.ParseFromString(kv.value)
            if worker.worker_id in busy or worker.worker_id in self._claimed:
                continue
            if worker.state == t.WORKER_STATE_DRAINING:
                continue
            limit = self.max_jobs.get(worker.pool_id)
            if limit and worker.jobs_run >= limit:
                continue  # used up: the pool-manager replaces it
            out.append(Candidate(worker, kv.mod_revision, self.tiers.get(worker.pool_id, TIER_DYNAMIC)))
        return out

    async def _dispatch(self, queued: q.QueuedJob, cand: Candidate) -> bool:
        job = t.Job()
        job.CopyFrom(queued.job)
        worker = cand.worker
        now = self.clock.now()
        apply_dispatch(job, worker, now)
        job_key = self.keys.job(job.tenant_id, job.job_id)
        assign_key = self.keys.assignment(worker.worker_id)
        assignment = t.Assignment(
            job_id=job.job_id,
            tenant_id=job.tenant_id,
            attempt=job.attempt,
            worker_id=worker.worker_id,
            spec=job.spec,
            assign_time=ts(now),
        )
        self._claimed[worker.worker_id] = time.monotonic()
        result = await self.election.fenced_txn(
            [
                cmp_mod(job_key, queued.mod_revision),
                cmp_missing(assign_key),
                cmp_mod(self.keys.worker(worker.worker_id), cand.mod_revision),
            ],
            [op_put(job_key, job.SerializeToString()), op_put(assign_key, assignment.SerializeToString())],
        )
        if not result.succeeded:
            self._claimed.pop(worker.worker_id, None)
            self.metrics.conflicts.inc()
            log.info(
                "dispatch to %s lost a race; the job stays queued",
                worker.worker_id,
                extra={"job_id": job.job_id, "tenant_id": job.tenant_id},
            )
            return False
        self.dispatched += 1
        self.metrics.dispatched.labels(worker.pool_id).inc()
        self.metrics.allocation.observe(max(now - job.create_time.ToNanoseconds() / 1e9, 0.0))
        log.info(
            "dispatched attempt %d to %s",
            job.attempt,
            worker.worker_id,
            extra={"job_id": job.job_id, "tenant_id": job.tenant_id, "worker_id": worker.worker_id},
        )
        return True
