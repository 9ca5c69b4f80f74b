"""The submit saga: validate, check the budget, reserve quota, enqueue; the reservation is given back when the
enqueue fails or was an idempotent replay. Over typed interfaces, so it is tested without sockets."""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2 as c
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.quota.v1 import quota_pb2 as qt
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError
from libs.interceptors import error_from_rpc
from libs.jobs import new_job_id, validate_spec
from libs.telemetry import job_id_var

log = logging.getLogger(__name__)


class BudgetStub(Protocol):
    async def CheckBudget(self, request: c.CheckBudgetRequest, timeout: float) -> c.CheckBudgetResponse: ...


class Reservations(Protocol):
    async def reserve(self, request: qt.ReserveRequest) -> qt.ReserveResponse: ...

    async def release(self, tenant_id: str, job_id: str) -> None: ...


class Enqueuer(Protocol):
    async def enqueue(self, request: q.EnqueueRequest) -> q.EnqueueResponse: ...


class BudgetGate:
    """Asks the cost service whether a tenant may still submit; remembers the answer briefly to stay off the hot
    path (an enforced budget may overshoot by what is submitted within that window)."""

    def __init__(self, cost: BudgetStub, clock: Clock, ttl: float = 2.0):
        self.cost = cost
        self.clock = clock
        self.ttl = ttl
        self._known: dict[str, tuple[float, JobMeshError | None]] = {}

    async def check(self, tenant_id: str) -> None:
        now = self.clock.monotonic()
        known = self._known.get(tenant_id)
        if known is None or now - known[0] > self.ttl:
            refusal: JobMeshError | None = None
            try:
                await self.cost.CheckBudget(c.CheckBudgetRequest(tenant_id=tenant_id), timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # Cost being down must not stop admission; budgets are re-checked shortly.
                    log.warning("budget check unavailable: %s", exc.code().name)
                    return
                refusal = error_from_rpc(exc)  # keeps BUDGET_EXCEEDED and its limit/spent metadata
            known = (now, refusal)
            self._known[tenant_id] = known
        if known[1] is not None:
            raise known[1]


class SubmitSaga:
    def __init__(self, config: MeshConfig, clock: Clock, budgets: BudgetGate, quota: Reservations, queue: Enqueuer):
        self.config = config
        self.clock = clock
        self.budgets = budgets
        self.quota = quota
        self.queue = queue

    async def submit(self, tenant_id: str, spec: t.JobSpec) -> t.Job:
        """The stored job (the first one, for a replayed idempotency key)."""
        now = self.clock.now()
        validate_spec(spec, self.config, now)
        await self.budgets.check(tenant_id)
        # A submission, not a record: the queueing service creates the record from it (libs/lifecycle).
        job = t.Job(job_id=new_job_id(now), tenant_id=tenant_id, spec=spec)
        job_id_var.set(job.job_id)
        reserved = await self.quota.reserve(
            qt.ReserveRequest(tenant_id=tenant_id, job_id=job.job_id, resources=spec.resources, burst=spec.burst)
        )
        job.burst_session_id = reserved.burst_session_id
        try:
            stored = await self.queue.enqueue(q.EnqueueRequest(job=job))
        except BaseException:
            await self.quota.release(tenant_id, job.job_id)
            raise
        if not stored.created:
            await self.quota.release(tenant_id, job.job_id)  # an idempotent replay: the first job holds the quota
        else:
            log.info("job accepted")
        return stored.job
