"""The submit saga: validate, check the budget, reserve quota, enqueue; the reservation is given back when the
enqueue fails or was an idempotent replay. Over typed interfaces, so it is tested without sockets."""

from __future__ import annotations

import logging
from typing import Protocol

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.quota.v1 import quota_pb2 as qt
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError
from libs.jobs import new_job_id, validate_spec
from libs.telemetry import current_traceparent, job_id_var
from services.gateway.budgets import BudgetGate

log = logging.getLogger(__name__)

# A submit admitted by a quota leader that lost its term before the job was stored is admitted again by the new
# leader: at most this many tries (a second failover within one submit is the only reason for a third).
ADMISSION_ATTEMPTS = 3
# Refusals that mean "nothing was stored, a leader changed": ADMISSION_FENCED (the admitting quota term ended),
# NOT_LEADER (the queueing replica lost its term before its fenced create committed).
_AGAIN = frozenset({"ADMISSION_FENCED", "NOT_LEADER"})


class Reservations(Protocol):
    async def reserve(self, request: qt.ReserveRequest) -> qt.ReserveResponse: ...

    async def release(self, tenant_id: str, job_id: str) -> None: ...


class Enqueuer(Protocol):
    async def enqueue(self, request: q.EnqueueRequest) -> q.EnqueueResponse: ...


class SubmitSaga:
    def __init__(self, config: MeshConfig, clock: Clock, budgets: BudgetGate, quota: Reservations, queue: Enqueuer):
        self.config = config
        self.clock = clock
        self.budgets = budgets
        self.quota = quota
        self.queue = queue

    async def submit(self, tenant_id: str, spec: t.JobSpec, written: list[float] | None = None) -> t.Job:
        """The stored job (the first one, for a replayed idempotency key). Appends to `written` the monotonic
        time the job was written (what the submit shedder measures)."""
        now = self.clock.now()
        validate_spec(spec, self.config, now)
        await self.budgets.check(tenant_id)
        # A submission, not a record: the queueing service creates the record from it (libs/lifecycle).
        job = t.Job(job_id=new_job_id(now), tenant_id=tenant_id, spec=spec, trace_parent=current_traceparent())
        job_id_var.set(job.job_id)
        for attempt in range(1, ADMISSION_ATTEMPTS + 1):
            try:
                stored = await self._admit_and_enqueue(job, written)
                break
            except JobMeshError as err:
                # A leader was deposed before the job was stored: the new leaders admit and store it.
                if err.reason not in _AGAIN or attempt == ADMISSION_ATTEMPTS:
                    raise
                log.info("not stored (%s: a leader changed); admitting again", err.reason)
        if not stored.created:
            await self.quota.release(tenant_id, job.job_id)  # an idempotent replay: the first job holds the quota
        else:
            log.info("job accepted")
        return stored.job

    async def _admit_and_enqueue(self, job: t.Job, written: list[float] | None) -> q.EnqueueResponse:
        """Reserve, then store the job fenced by the admitting quota term; the reservation is given back when the
        store fails."""
        spec = job.spec
        reserved = await self.quota.reserve(
            qt.ReserveRequest(tenant_id=job.tenant_id, job_id=job.job_id, resources=spec.resources, burst=spec.burst)
        )
        job.burst_session_id = reserved.burst_session_id
        try:
            stored = await self.queue.enqueue(q.EnqueueRequest(job=job, quota_fence=reserved.admission_fence))
            if written is not None:
                written.append(self.clock.monotonic())
        except BaseException:
            await self.quota.release(job.tenant_id, job.job_id)
            raise
        return stored
