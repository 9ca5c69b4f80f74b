"""Admission: the plan written as fenced dispatch transactions (built by the lifecycle), chunked, with a chunk
that lost a race retried job by job so only the jobs that raced stay queued."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opentelemetry import trace

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.batching import chunks
from libs.clock import Clock
from libs.etcd.election import LeaderElection, Leadership
from libs.keys import Keys
from libs.lifecycle import txns
from libs.lifecycle.txns import Txn
from libs.telemetry import job_span
from services.scheduler.capacity import Capacity
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.placement import Candidate

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("jobmesh.scheduler")

# Jobs per dispatch transaction: up to 4 compares each (+ the fence) stay under etcd's default of 128 per list;
# and at most TXN_BYTES of values, however large the specs.
DISPATCH_CHUNK = 31


@dataclass(frozen=True)
class Dispatch:
    """One job to one worker: the transaction that says so."""

    job: t.Job
    worker: t.Worker
    now: float
    txn: Txn


def _dispatch_bytes(d: Dispatch) -> int:
    return sum(op.ByteSize() for op in d.txn.ops)


class Dispatcher:
    def __init__(
        self, keys: Keys, clock: Clock, election: LeaderElection, capacity: Capacity, metrics: SchedulerMetrics
    ):
        self.keys = keys
        self.clock = clock
        self.election = election
        self.capacity = capacity
        self.metrics = metrics
        self.dispatched = 0

    def prepare(self, queued: q.QueuedJob, cand: Candidate) -> Dispatch:
        """The writes of one dispatch: the job RUNNING and the worker's assignment, both conditional on what the
        cycle read; the worker's room is claimed until the assignment cache shows it."""
        worker = cand.worker
        now = self.clock.now()
        job, txn = txns.dispatch(
            self.keys,
            queued.job,
            queued.mod_revision,
            worker,
            cand.mod_revision,
            now,
            exclusive=self.capacity.exclusive(worker.pool_id),
        )
        self.capacity.claim(self.keys.assignment(worker.worker_id, job.job_id), worker.worker_id, job.spec.resources)
        return Dispatch(job, worker, now, txn)

    async def admit(self, plan: list[tuple[q.QueuedJob, Candidate]], token: Leadership) -> int:
        """Writes the plan in one transaction per chunk, each fenced by the cycle's leadership `token`. Returns
        how many jobs were dispatched."""
        placed = 0
        prepared = (self.prepare(queued, cand) for queued, cand in plan)
        for chunk in chunks(prepared, _dispatch_bytes, DISPATCH_CHUNK):
            if len(chunk) > 1:
                joined = Txn.join(d.txn for d in chunk)
                if (await self.election.fenced_txn(joined.compares, joined.ops, token=token)).succeeded:
                    for d in chunk:
                        self._dispatched(d)
                    placed += len(chunk)
                    continue
            for d in chunk:
                if (await self.election.fenced_txn(d.txn.compares, d.txn.ops, token=token)).succeeded:
                    self._dispatched(d)
                    placed += 1
                else:
                    self._lost_race(d)
        return placed

    def _lost_race(self, d: Dispatch) -> None:
        self.capacity.release(self.keys.assignment(d.worker.worker_id, d.job.job_id))
        self.metrics.conflicts.inc()
        log.info(
            "dispatch to %s lost a race; the job stays queued",
            d.worker.worker_id,
            extra={"job_id": d.job.job_id, "tenant_id": d.job.tenant_id},
        )

    def _dispatched(self, d: Dispatch) -> None:
        job = d.job
        with job_span(_tracer, "dispatch", job.trace_parent, job_id=job.job_id, attempt=job.attempt) as span:
            span.set_attribute("worker_id", d.worker.worker_id)
            span.set_attribute("pool_id", d.worker.pool_id)
        self.dispatched += 1
        self.metrics.dispatched.labels(d.worker.pool_id).inc()
        self.metrics.allocation.observe(max(d.now - job.create_time.ToNanoseconds() / 1e9, 0.0))
        log.info(
            "dispatched attempt %d to %s",
            job.attempt,
            d.worker.worker_id,
            extra={"job_id": job.job_id, "tenant_id": job.tenant_id, "worker_id": d.worker.worker_id},
        )
