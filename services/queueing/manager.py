"""The queueing core: jobs enter durably, wait in the fair queue, and leave when etcd says they were dispatched."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig
from libs.etcd.client import WatchEvent
from libs.jobs import DEFAULT_QUEUE, decode_job
from libs.jobstore import JobStore
from services.queueing.fairqueue import QueueItem, WeightedFairQueue, job_cost

log = logging.getLogger(__name__)


class QueueMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.depth = Gauge("jobmesh_queueing_depth_jobs", "Pending jobs per queue.", ["queue"], registry=registry)
        self.tenant_depth = Gauge(
            "jobmesh_queueing_tenant_depth_jobs", "Pending jobs per tenant.", ["tenant"], registry=registry
        )
        self.enqueued = Counter(
            "jobmesh_queueing_enqueued_total", "Jobs stored and queued.", ["tenant"], registry=registry
        )
        self.dispatched = Counter(
            "jobmesh_queueing_dispatched_total", "Jobs that left the queue to run.", ["tenant"], registry=registry
        )
        self.wait = Histogram(
            "jobmesh_queueing_wait_seconds",
            "Time from submit to dispatch.",
            ["sla_tier"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
        )
        self.virtual_time = Gauge("jobmesh_queueing_virtual_time", "WFQ virtual time.", registry=registry)


def queue_of(job: t.Job) -> str:
    return job.queue or job.spec.pool or DEFAULT_QUEUE


class QueueManager:
    def __init__(self, store: JobStore, config: MeshConfig, clock: Clock, metrics: QueueMetrics):
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.queue = WeightedFairQueue({tid: tc.weight for tid, tc in config.tenants.items()})
        self.pending: dict[str, tuple[t.Job, int]] = {}  # job id -> (record, mod revision)
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _admit(self, job: t.Job, revision: int) -> bool:
        known = self.pending.get(job.job_id)
        if known is not None and known[1] >= revision:
            return False
        self.pending[job.job_id] = (job, revision)
        job.queue = queue_of(job)
        seq = job.create_time.seconds * 1_000_000 + job.create_time.nanos // 1000
        return self.queue.push(
            QueueItem(
                job.job_id,
                job.tenant_id,
                job.queue,
                job_cost(job.spec.resources.cpu_millis, job.spec.resources.memory_mb),
                0,
                seq,
            )
        )

    def _drop(self, job_id: str, dispatched: t.Job | None) -> None:
        self.pending.pop(job_id, None)
        item = self.queue.remove(job_id, dispatched=dispatched is not None)
        if item is not None and dispatched is not None:
            self.metrics.dispatched.labels(item.tenant_id).inc()
            waited = self.clock.now() - dispatched.create_time.ToNanoseconds() / 1e9
            self.metrics.wait.labels(dispatched.spec.sla_tier or "standard").observe(max(waited, 0.0))
            self.metrics.virtual_time.set(self.queue.virtual_time)

    async def on_job_event(self, event: WatchEvent) -> None:
        job_id = event.kv.key.rsplit("/", 1)[-1]
        if event.kind == "delete":
            self._drop(job_id, None)
        else:
            job = decode_job(event.kv.value)
            if job.state == t.JOB_STATE_PENDING:
                if self._admit(job, event.kv.mod_revision):
                    await self._notify()
                else:
                    self.pending[job_id] = (job, max(event.kv.mod_revision, self.pending[job_id][1]))
            elif job_id in self.pending:
                self._drop(job_id, job if job.state == t.JOB_STATE_RUNNING else None)
        self._update_depth()

    def _update_depth(self) -> None:
        by_queue, by_tenant = self.queue.depth_by()
        self.metrics.depth.clear()
        for name, n in by_queue.items():
            self.metrics.depth.labels(name).set(n)
        self.metrics.tenant_depth.clear()
        for name, n in by_tenant.items():
            self.metrics.tenant_depth.labels(name).set(n)

    async def enqueue(self, job: t.Job) -> tuple[t.Job, bool]:
        job.queue = queue_of(job)
        stored, created, revision = await self.store.create(job)
        if created:
            self.metrics.enqueued.labels(job.tenant_id).inc()
            if self._admit(stored, revision):
                await self._notify()
        return stored, created

    async def next_jobs(
        self, limit: int, after_version: int, wait_seconds: float
    ) -> tuple[list[tuple[t.Job, int]], int]:
        if self.queue.version <= after_version and wait_seconds > 0:
            try:
                async with self._changed:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.queue.version > after_version), wait_seconds
                    )
            except TimeoutError:
                pass
        items = self.queue.peek(max(1, min(limit, 1000)))
        out = [self.pending[i.job_id] for i in items if i.job_id in self.pending]
        return out, self.queue.version

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        return self.queue.depth_by()
