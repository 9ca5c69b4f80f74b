"""The scheduling loop (leader only): match queued jobs to idle workers, in numbered, timed phases."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.batching import chunks
from libs.clock import Clock
from libs.config import POOL_KINDS, MeshConfig
from libs.etcd.client import Compare, RequestOp, WatchEvent
from libs.etcd.election import LeaderElection, run_while_leader
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.lifecycle import txns
from libs.lifecycle.codec import decode_assignment, decode_worker
from libs.lifecycle.routing import fits, may_place

log = logging.getLogger(__name__)


# Placement order (the seed's pool selection chart) is the order of POOL_KINDS: static, dynamic, burst.
TIERS = {kind: rank for rank, kind in enumerate(POOL_KINDS)}
TIER_STATIC, TIER_DYNAMIC, TIER_BURST = TIERS["static"], TIERS["dynamic"], TIERS["burst"]


@dataclass(frozen=True)
class Dispatch:
    """One job to one worker: the transaction that says so."""

    job: t.Job
    worker: t.Worker
    now: float
    compares: list[Compare]
    ops: list[RequestOp]


# Jobs per dispatch transaction: up to 4 compares each (+ the fence) stay under etcd's default of 128 per list;
# and at most TXN_BYTES of values, however large the specs.
DISPATCH_CHUNK = 31


def _dispatch_bytes(d: Dispatch) -> int:
    return sum(op.ByteSize() for op in d.ops)


@dataclass(frozen=True)
class _Claim:
    worker_id: str
    at: float
    cpu_millis: int
    memory_mb: int


def _add(holdings: dict[str, list[int]], worker_id: str, cpu_millis: int, memory_mb: int) -> None:
    held = holdings.setdefault(worker_id, [0, 0, 0])
    held[0] += 1
    held[1] += cpu_millis
    held[2] += memory_mb


@dataclass
class Candidate:
    """A worker with room for at least one more job: `free` is what its running jobs leave of its size, `slots`
    how many more jobs it may take."""

    worker: t.Worker
    mod_revision: int
    tier: int = TIER_STATIC
    slots: int = 1
    free: t.Resources | None = None

    def __post_init__(self) -> None:
        if self.free is None:
            self.free = t.Resources()
            self.free.CopyFrom(self.worker.capacity)

    def room(self) -> t.Resources:
        assert self.free is not None
        return self.free

    def take(self, spec: t.JobSpec) -> None:
        """Counts a job placed on this worker within the cycle that placed it."""
        self.slots -= 1
        self.room().cpu_millis -= spec.resources.cpu_millis
        self.room().memory_mb -= spec.resources.memory_mb


def pick_worker(spec: t.JobSpec, idle: list[Candidate], burst_ok: bool = False) -> Candidate | None:
    """Static pools first, then dynamic, then (only for a job admitted against a burst session) burst capacity;
    within a tier the tightest fit (least CPU, then memory, left over), so jobs pack onto busy workers and
    big workers stay free."""
    suitable = [
        c
        for c in idle
        if c.slots > 0
        and may_place(spec, c.worker.pool_id, POOL_KINDS[c.tier], burst_ok)
        and fits(c.room().cpu_millis, c.room().memory_mb, c.worker.labels, spec)
    ]
    if not suitable:
        return None
    return min(
        suitable,
        key=lambda c: (
            c.tier,
            c.room().cpu_millis - spec.resources.cpu_millis,
            c.room().memory_mb - spec.resources.memory_mb,
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
        min_interval: float = 0.0,
    ):
        self.keys = keys
        # After a cycle that placed jobs, the next starts no sooner than this after it (Slurm's
        # sched_min_interval): under load, freed room and new jobs gather and go out in one transaction.
        self.min_interval = min_interval
        self.tiers = {p.pool_id: TIERS[p.kind] for p in config.pools}
        self.max_jobs = {p.pool_id: p.max_jobs_per_worker for p in config.pools if p.max_jobs_per_worker}
        self.slots = {p.pool_id: p.worker_slots for p in config.pools}
        self.clock = clock
        self.election = election
        self.workers = workers
        self.assignments = assignments
        self.queueing = queueing
        self.metrics = metrics
        self.dispatched = 0
        self.capacity_changed = asyncio.Event()
        # Assignments we wrote that the assignment cache has not shown yet: they hold their worker's room.
        self._claimed: dict[str, _Claim] = {}
        self._held: dict[str, tuple[int, int, int]] = {}  # assignment key -> (mod revision, CPU, memory)
        self._version = -1
        self._epoch = 0  # bumped on every worker or assignment change
        # (queue version, epoch) of the last cycle that placed nothing: until one of them moves, waiting is all
        # there is to do.
        self._stall: tuple[int, int] | None = None
        self._decoded: dict[str, tuple[int, t.Worker]] = {}  # worker key -> (mod revision, parsed record)

    def on_change(self, _event: object) -> None:
        self._epoch += 1
        self.capacity_changed.set()

    def on_assignment(self, event: WatchEvent) -> None:
        """Any change of an assignment we claimed means the cache now speaks for it, and the claim can go.
        Waiting to see it in the cache instead would miss a job that started and ended between two cycles,
        and leave its room unused until the claim expired.

        Only a delete frees room: a put is our own dispatch landing, so it wakes no scheduling cycle."""
        self._claimed.pop(event.kv.key, None)
        if event.kind == "delete":
            self.on_change(event)

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch_while_leading(), name="scheduler-informers")
        try:
            await run_while_leader(self.election, self.schedule_once, self.metrics.leader, "scheduling")
        finally:
            watcher.cancel()

    async def _watch_while_leading(self) -> None:
        """Only the leader keeps the worker and assignment caches: a standby would decode every change for
        nothing. Taking over lists both prefixes afresh (milliseconds), well inside the lease TTL."""
        informers = (self.workers, self.assignments)
        try:
            while True:
                await self.election.wait_leader()
                for informer in informers:
                    if not informer.running:
                        informer.start()
                while self.election.is_leader:
                    self.election.changed.clear()
                    await self.election.changed.wait()
                for informer in informers:
                    await informer.stop(forget=True)
                self._claimed.clear()
        finally:
            for informer in informers:
                await informer.stop()

    def _phase(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.metrics.phase.labels(name).observe(now - start)
        return now

    async def schedule_once(self) -> None:
        for informer in (self.workers, self.assignments):
            await informer.wait_synced()  # just after taking over, until the first list is in
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
        heads = await self._heads(sum(c.slots for c in idle), epoch)
        mark = self._phase("2_heads", mark)
        # Phase 3: nominate a worker for each head, in queue order.
        plan: list[tuple[q.QueuedJob, Candidate]] = []
        for queued in heads:
            choice = pick_worker(queued.job.spec, idle, burst_ok=bool(queued.job.burst_session_id))
            if choice is not None:
                plan.append((queued, choice))
                choice.take(queued.job.spec)
                if choice.slots <= 0:
                    idle.remove(choice)
        self.metrics.unplaced.set(len(heads) - len(plan))
        mark = self._phase("3_nominate", mark)
        # Phase 4: admit, in fenced transactions (the whole plan in one while nothing raced it).
        placed = await self._dispatch_all(plan)
        mark = self._phase("4_admit", mark)
        # Phase 5: remember a fruitless cycle, so the next one waits for the queue or the workers to change.
        self._stall = None if placed else (self._version, epoch)
        self._phase("5_requeue", mark)
        if placed and self.min_interval > 0:
            rest = self.min_interval - (time.perf_counter() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _wait_for_capacity(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.capacity_changed.wait(), timeout)
        except TimeoutError:
            pass
        self.capacity_changed.clear()

    async def _heads(self, idle_count: int, epoch: int) -> list[q.QueuedJob]:
        stalled = self._stall is not None and self._stall[1] == epoch
        after = self._stall[0] if stalled and self._stall else -1
        # A few more heads than idle workers, so jobs no idle worker suits do not starve the ones behind them.
        request = q.NextJobsRequest(limit=idle_count * 2 + 4, after_version=after, wait_millis=1000)
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

    def _holdings(self) -> dict[str, list[int]]:
        """worker id -> [jobs, CPU, memory] it holds: its assignments in the cache and the ones we claimed."""
        cache = self.assignments.cache
        now = time.monotonic()
        for key in [k for k, c in self._claimed.items() if k in cache or now - c.at > 5.0]:
            del self._claimed[key]
        held: dict[str, tuple[int, int, int]] = {}
        out: dict[str, list[int]] = {}
        for key, kv in cache.items():
            known = self._held.get(key)
            if known is None or known[0] != kv.mod_revision:
                res = decode_assignment(kv.value).spec.resources
                known = (kv.mod_revision, res.cpu_millis, res.memory_mb)
            held[key] = known
            _add(out, Keys.assignment_worker(key), known[1], known[2])
        self._held = held
        for claim in self._claimed.values():
            _add(out, claim.worker_id, claim.cpu_millis, claim.memory_mb)
        return out

    def idle_workers(self) -> list[Candidate]:
        """Workers with room for another job (an idle one, or one with a free slot)."""
        holdings = self._holdings()
        out = []
        decoded: dict[str, tuple[int, t.Worker]] = {}
        for key, kv in self.workers.cache.items():
            known = self._decoded.get(key)
            if known is not None and known[0] == kv.mod_revision:
                worker = known[1]
            else:
                worker = decode_worker(kv.value)
            decoded[key] = (kv.mod_revision, worker)
            if worker.state == t.WORKER_STATE_DRAINING:
                continue
            jobs, cpu, memory = holdings.get(worker.worker_id, (0, 0, 0))
            slots = self.slots.get(worker.pool_id, 1) - jobs
            limit = self.max_jobs.get(worker.pool_id)
            if limit:
                slots = min(slots, limit - worker.jobs_run - jobs)  # used up: the pool-manager replaces it
            if slots <= 0:
                continue
            free = t.Resources(
                cpu_millis=worker.capacity.cpu_millis - cpu, memory_mb=worker.capacity.memory_mb - memory
            )
            tier = self.tiers.get(worker.pool_id, TIER_DYNAMIC)
            out.append(Candidate(worker, kv.mod_revision, tier, slots=slots, free=free))
        self._decoded = decoded
        return out

    async def _dispatch_all(self, plan: list[tuple[q.QueuedJob, Candidate]]) -> int:
        """Writes the plan in one fenced transaction per chunk; a chunk that lost a race goes job by job, so
        only the jobs that raced stay queued. Returns how many were dispatched."""
        placed = 0
        prepared = (self._prepare(queued, cand) for queued, cand in plan)
        for chunk in chunks(prepared, _dispatch_bytes, DISPATCH_CHUNK):
            if len(chunk) > 1:
                compares = [c for d in chunk for c in d.compares]
                ops = [op for d in chunk for op in d.ops]
                if (await self.election.fenced_txn(compares, ops)).succeeded:
                    for d in chunk:
                        self._dispatched(d)
                    placed += len(chunk)
                    continue
            for d in chunk:
                if (await self.election.fenced_txn(d.compares, d.ops)).succeeded:
                    self._dispatched(d)
                    placed += 1
                else:
                    self._lost_race(d)
        return placed

    def _prepare(self, queued: q.QueuedJob, cand: Candidate) -> Dispatch:
        """The fenced writes of one dispatch (built by the lifecycle): the job RUNNING and the worker's
        assignment, both conditional on what the cycle read."""
        worker = cand.worker
        now = self.clock.now()
        exclusive = self.slots.get(worker.pool_id, 1) == 1  # one job at a time: the store itself refuses a second
        job, txn = txns.dispatch(
            self.keys, queued.job, queued.mod_revision, worker, cand.mod_revision, now, exclusive=exclusive
        )
        res = job.spec.resources
        assign_key = self.keys.assignment(worker.worker_id, job.job_id)
        self._claimed[assign_key] = _Claim(worker.worker_id, time.monotonic(), res.cpu_millis, res.memory_mb)
        return Dispatch(job, worker, now, txn.compares, txn.ops)

    def _lost_race(self, d: Dispatch) -> None:
        self._claimed.pop(self.keys.assignment(d.worker.worker_id, d.job.job_id), None)
        self.metrics.conflicts.inc()
        log.info(
            "dispatch to %s lost a race; the job stays queued",
            d.worker.worker_id,
            extra={"job_id": d.job.job_id, "tenant_id": d.job.tenant_id},
        )

    def _dispatched(self, d: Dispatch) -> None:
        job = d.job
        self.dispatched += 1
        self.metrics.dispatched.labels(d.worker.pool_id).inc()
        self.metrics.allocation.observe(max(d.now - job.create_time.ToNanoseconds() / 1e9, 0.0))
        log.info(
            "dispatched attempt %d to %s",
            job.attempt,
            d.worker.worker_id,
            extra={"job_id": job.job_id, "tenant_id": job.tenant_id, "worker_id": d.worker.worker_id},
        )
