"""The public API: authenticate, authorize, validate, then delegate to the internal services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import TypeVar

import grpc
from google.api import httpbody_pb2
from opentelemetry import trace
from prometheus_client import CollectorRegistry, generate_latest

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2 as c
from jobmesh.cost.v1 import cost_pb2_grpc
from jobmesh.gateway.v1 import gateway_pb2 as g
from jobmesh.gateway.v1 import gateway_pb2_grpc
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.queueing.v1 import queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2 as qt
from jobmesh.quota.v1 import quota_pb2_grpc
from libs.auth import Principal, TokenVerifier
from libs.batching import GroupCommit
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import InvalidArgument, JobMeshError, NotFound, PermissionDenied, from_item_error
from libs.interceptors import error_from_rpc
from libs.jobs import validate_spec
from libs.keys import safe_segment
from libs.lifecycle.routing import assign_queue
from libs.lifecycle.transitions import TERMINAL
from libs.telemetry import job_id_var, tenant_id_var
from services.gateway import dryrun
from services.gateway.budgets import BudgetGate
from services.gateway.metrics_scrape import scrape_all
from services.gateway.shedding import SubmitShedder
from services.gateway.submit import SubmitSaga

log = logging.getLogger(__name__)


# How long a call to an active/standby service (a reservation, a budget read or update, a cost report) may wait for
# its leader: longer than a failover (the lease, 5 s by default, plus the takeover), so a call made during one is
# delayed, not refused (the channel waits for the next leader). Calls with a fallback of their own keep short
# deadlines: the submit's budget check (which fails open) and a job's cost (left out of the job when unanswered).
LEADER_FAILOVER_SECONDS = 10.0

# Submits per batched call: bounded so that one call stays small (a job spec is at most a few KiB).
_BATCH = 64


# A job's output is sent in chunks of at most this many bytes; a follower looks for more this often.
LOG_CHUNK_BYTES = 256 * 1024
LOG_FOLLOW_SECONDS = 0.5
_TEXT = "text/plain; charset=utf-8"

# The most jobs one page holds; a larger page_size is coerced to it.
MAX_PAGE_SIZE = 500
# ListJobs' order_by values (AIP-132), and whether each lists newest first.
ORDERS = {"": False, "create_time": False, "create_time asc": False, "create_time desc": True}


class Backends:
    """Stubs of the internal services. Submits' reservations and enqueues go out batched: what concurrent
    submits ask while one call is in flight shares the next call (a lone submit is sent at once), so under
    load each of the two hops costs one call per batch instead of one per job."""

    def __init__(
        self,
        quota: quota_pb2_grpc.QuotaServiceStub,
        queueing: queueing_pb2_grpc.QueueingServiceStub,
        poolmanager: poolmanager_pb2_grpc.PoolManagerServiceStub,
        cost: cost_pb2_grpc.CostServiceStub,
    ):
        self.quota = quota
        self.queueing = queueing
        self.poolmanager = poolmanager
        self.cost = cost
        self._reservations: GroupCommit[_Traced[qt.ReserveRequest], qt.ReserveResponse] = GroupCommit(
            self._reserve_many, max_batch=_BATCH, name="reserve"
        )
        # Bounded in bytes too: a batch of large specs stays well under queueing's 4 MiB receive limit and etcd's
        # request limit, and one tenant's large specs never fail another's submit that shares the batch.
        self._enqueues: GroupCommit[_Traced[q.EnqueueRequest], q.EnqueueResponse] = GroupCommit(
            self._enqueue_many, max_batch=_BATCH, name="enqueue", size=lambda item: item[0].ByteSize()
        )

    async def reserve(self, request: qt.ReserveRequest) -> qt.ReserveResponse:
        return await self._reservations.submit((request, trace.get_current_span().get_span_context()))

    async def enqueue(self, request: q.EnqueueRequest) -> q.EnqueueResponse:
        return await self._enqueues.submit((request, trace.get_current_span().get_span_context()))

    async def release(self, tenant_id: str, job_id: str) -> None:
        """Gives a reservation back; if that fails it expires by itself."""
        try:
            await self.quota.Release(qt.ReleaseRequest(tenant_id=tenant_id, job_id=job_id), timeout=2.0)
        except grpc.aio.AioRpcError:
            log.warning("could not release a reservation; it expires by itself")

    async def _reserve_many(self, batch: list[_Traced[qt.ReserveRequest]]) -> list[qt.ReserveResponse | Exception]:
        with _batch_span("reserve", batch):
            request = qt.ReserveManyRequest(reservations=[r for r, _ in batch])
            resp = await self.quota.ReserveMany(request, timeout=LEADER_FAILOVER_SECONDS)
        return [o.reserved if o.HasField("reserved") else from_item_error(o.error) for o in resp.outcomes]

    async def _enqueue_many(self, batch: list[_Traced[q.EnqueueRequest]]) -> list[q.EnqueueResponse | Exception]:
        with _batch_span("enqueue", batch):
            request = q.EnqueueManyRequest(items=[r for r, _ in batch])
            resp = await self.queueing.EnqueueMany(request, timeout=10.0)
        return [o.enqueued if o.HasField("enqueued") else from_item_error(o.error) for o in resp.outcomes]


_T = TypeVar("_T")
# A submit's request with the span it was made in.
_Traced = tuple[_T, trace.SpanContext]
_tracer = trace.get_tracer("jobmesh.gateway")


def _batch_span(name: str, batch: list[_Traced[_T]]) -> AbstractContextManager[trace.Span]:
    """The batched call's span: a child of the submit that opened the batch (its task carries that context),
    linked to every submit it serves, so each submit's trace finds the call that did its work."""
    links = [trace.Link(ctx) for _, ctx in batch if ctx.is_valid]
    return _tracer.start_as_current_span(
        f"{name} batch", kind=trace.SpanKind.CLIENT, links=links, attributes={"jobmesh.batch.size": len(batch)}
    )


class Authenticator:
    def __init__(self, verifier: TokenVerifier):
        self.verifier = verifier

    def __call__(self, context: grpc.aio.ServicerContext) -> Principal:
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
        principal = self.verifier.verify(header)
        tenant_id_var.set(principal.tenant_id)
        return principal


def require_tenant_access(principal: Principal, tenant_id: str) -> None:
    if not tenant_id:
        raise InvalidArgument("tenant_id", "is required")
    if principal.tenant_id != tenant_id and not principal.is_admin:
        raise PermissionDenied("you may only act on your own tenant", reason="TENANT_FORBIDDEN")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("this call needs the admin role", reason="ADMIN_ONLY")


def check_job_id(job_id: str) -> None:
    if not safe_segment(job_id):
        raise NotFound(f"job {job_id!r} not found", reason="JOB_NOT_FOUND")


class JobsServicer(gateway_pb2_grpc.JobServiceServicer):
    def __init__(
        self, auth: Authenticator, backends: Backends, config: MeshConfig, clock: Clock, shedder: SubmitShedder
    ):
        self.auth = auth
        self.b = backends
        self.config = config
        self.clock = clock
        self.submits = SubmitSaga(config, clock, BudgetGate(backends.cost, clock, config), backends, backends)
        self.shedder = shedder

    def _scope(self, principal: Principal) -> str:
        """Tenant to look jobs up in: the caller's own, or any (empty) for an admin."""
        return "" if principal.is_admin else principal.tenant_id

    async def SubmitJob(self, request: g.SubmitJobRequest, context: grpc.aio.ServicerContext) -> t.Job:
        principal = self.auth(context)
        self.shedder.admit()
        started = self.clock.monotonic()
        written: list[float] = []
        try:
            return await self.submits.submit(principal.tenant_id, request.spec, written)
        finally:
            self.shedder.release(written[0] - started if written else None)

    async def _with_cost(self, job: t.Job) -> t.Job:
        if job.attempt == 0:
            return job
        try:
            resp = await self.b.cost.GetJobCost(c.GetJobCostRequest(job=job), timeout=2.0)
            job.cost.CopyFrom(resp.cost)
        except grpc.aio.AioRpcError as exc:
            log.warning("cost unavailable for job: %s", exc.code().name)
        return job

    async def GetJob(self, request: g.GetJobRequest, context: grpc.aio.ServicerContext) -> t.Job:
        principal = self.auth(context)
        check_job_id(request.job_id)
        job_id_var.set(request.job_id)
        resp = await self.b.queueing.GetJob(
            q.GetJobRequest(tenant_id=self._scope(principal), job_id=request.job_id), timeout=5.0
        )
        return await self._with_cost(resp.job)

    async def ListJobs(self, request: g.ListJobsRequest, context: grpc.aio.ServicerContext) -> g.ListJobsResponse:
        principal = self.auth(context)
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        # A space may arrive as "+" from a query string the transcoder passes through as it is.
        order = " ".join(request.order_by.lower().replace("+", " ").split())
        if order not in ORDERS:
            raise InvalidArgument("order_by", 'must be "create_time" or "create_time desc"')
        resp = await self.b.queueing.ListJobs(
            q.ListJobsRequest(
                tenant_id=principal.tenant_id,
                state=request.state,
                newest_first=ORDERS[order],
                page_size=min(request.page_size, MAX_PAGE_SIZE),  # AIP-158: above the maximum is the maximum
                page_token=request.page_token,
            ),
            timeout=10.0,
        )
        return g.ListJobsResponse(jobs=resp.jobs, next_page_token=resp.next_page_token)

    async def CancelJob(self, request: g.CancelJobRequest, context: grpc.aio.ServicerContext) -> t.Job:
        principal = self.auth(context)
        check_job_id(request.job_id)
        job_id_var.set(request.job_id)
        resp = await self.b.queueing.CancelJob(
            q.CancelJobRequest(tenant_id=self._scope(principal), job_id=request.job_id), timeout=10.0
        )
        log.info("job cancelled")
        return await self._with_cost(resp.job)

    async def _get(self, principal: Principal, job_id: str) -> t.Job:
        resp = await self.b.queueing.GetJob(  # type: ignore[attr-defined]
            q.GetJobRequest(tenant_id=self._scope(principal), job_id=job_id), timeout=5.0
        )
        return resp.job  # type: ignore[no-any-return]

    async def WatchJob(self, request: g.WatchJobRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[t.Job]:
        principal = self.auth(context)
        check_job_id(request.job_id)
        job_id_var.set(request.job_id)
        # Queueing answers NOT_FOUND for another tenant's job, as GetJob does.
        changes = self.b.queueing.WatchJob(  # type: ignore[attr-defined]
            q.WatchJobRequest(tenant_id=self._scope(principal), job_id=request.job_id)
        )
        async for change in changes:
            job = change.job
            yield (await self._with_cost(job)) if job.state in TERMINAL else job

    async def GetJobLogs(
        self, request: g.GetJobLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        """The attempt's stored output; with follow, more as it comes until the attempt is over (the job ended, or
        it went on to a next attempt, which a follower of the latest attempt then follows too)."""
        principal = self.auth(context)
        check_job_id(request.job_id)
        job_id_var.set(request.job_id)
        job = await self._get(principal, request.job_id)  # NOT_FOUND for another tenant's job
        if request.attempt < 0 or request.attempt > max(job.attempt, 0):
            raise InvalidArgument("attempt", f"must be between 0 (the latest) and {job.attempt}")
        attempt, offset, sent = request.attempt or job.attempt, 0, False
        last_look = False
        while True:
            data = b""
            if attempt > 0:
                resp = await self.b.poolmanager.ReadJobLog(  # type: ignore[attr-defined]
                    pm.ReadJobLogRequest(
                        tenant_id=job.tenant_id,
                        job_id=job.job_id,
                        attempt=attempt,
                        offset=offset,
                        max_bytes=LOG_CHUNK_BYTES,
                    ),
                    timeout=10.0,
                )
                data, offset = resp.data, resp.next_offset
            if data:
                yield httpbody_pb2.HttpBody(content_type=_TEXT, data=data)
                sent = True
                continue
            if not request.follow or last_look:
                break
            await asyncio.sleep(LOG_FOLLOW_SECONDS)
            job = await self._get(principal, request.job_id)
            if request.attempt == 0 and job.attempt > attempt:
                if attempt > 0:
                    last_look = False
                    # What is left of the old attempt is lost to this follower only if it was written after the
                    # attempt ended, which a worker never does.
                    header = f"\n[jobmesh: attempt {job.attempt}]\n".encode()
                    yield httpbody_pb2.HttpBody(content_type=_TEXT, data=header)
                    sent = True
                attempt, offset = job.attempt, 0
            elif job.state in TERMINAL:
                last_look = True  # the worker sent everything before it reported the end: one more read
        if not sent:
            yield httpbody_pb2.HttpBody(content_type=_TEXT, data=b"")

    async def DryRunJob(self, request: g.DryRunJobRequest, context: grpc.aio.ServicerContext) -> g.DryRunJobResponse:
        """What SubmitJob would do with this spec, creating nothing and reserving nothing."""
        principal = self.auth(context)
        spec = request.spec
        now = self.clock.now()
        out = g.DryRunJobResponse(valid=True)
        try:
            validate_spec(spec, self.config, now)
        except JobMeshError as err:
            out.valid = False
            out.violations.append(dryrun.violation(err))
        queue = assign_queue(spec, self.config.pools)
        admission, estimate = await asyncio.gather(
            self._admission(principal.tenant_id, spec),
            self.b.queueing.EstimateStart(  # type: ignore[attr-defined]
                q.EstimateStartRequest(queue=queue, tenant_id=principal.tenant_id), timeout=5.0
            ),
        )
        out.admission.CopyFrom(admission)
        out.start.CopyFrom(
            dryrun.start_estimate(
                queue, estimate.pending, estimate.dispatch_rate_per_second, estimate.window_seconds, now
            )
        )
        pools = dryrun.candidate_pools(spec, queue, self.config)
        out.cost.CopyFrom(
            dryrun.cost_estimate(spec, pools, self.config, estimate.median_runtime_seconds, estimate.runtime_samples)
        )
        return out

    async def _admission(self, tenant_id: str, spec: t.JobSpec) -> g.AdmissionEstimate:
        checked = await self.b.quota.CheckAdmission(  # type: ignore[attr-defined]
            qt.CheckAdmissionRequest(
                reservation=qt.ReserveRequest(
                    tenant_id=tenant_id, job_id="dry-run", resources=spec.resources, burst=spec.burst
                )
            ),
            timeout=5.0,
        )
        if not checked.admitted:
            r = checked.refusal
            return g.AdmissionEstimate(admitted=False, reason=r.reason, message=r.message, metadata=r.metadata)
        try:
            await self.b.cost.CheckBudget(c.CheckBudgetRequest(tenant_id=tenant_id), timeout=2.0)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                err = error_from_rpc(exc)
                return g.AdmissionEstimate(
                    admitted=False, reason=err.reason, message=err.message, metadata=err.metadata
                )
            log.warning("budget check unavailable for a dry run: %s", exc.code().name)
        return g.AdmissionEstimate(admitted=True, burst=checked.burst)


class TenantsServicer(gateway_pb2_grpc.TenantServiceServicer):
    def __init__(self, auth: Authenticator, backends: Backends):
        self.auth = auth
        self.b = backends

    async def GetQuota(self, request: g.GetQuotaRequest, context: grpc.aio.ServicerContext) -> object:
        require_tenant_access(self.auth(context), request.tenant_id)
        resp = await self.b.quota.GetQuota(qt.GetQuotaRequest(tenant_id=request.tenant_id), timeout=5.0)
        return resp.quota

    async def UpdateQuota(self, request: g.UpdateQuotaRequest, context: grpc.aio.ServicerContext) -> object:
        require_admin(self.auth(context))
        resp = await self.b.quota.UpdateQuota(
            qt.UpdateQuotaRequest(tenant_id=request.tenant_id, limits=request.limits), timeout=5.0
        )
        return resp.quota

    async def RequestBurst(self, request: g.RequestBurstRequest, context: grpc.aio.ServicerContext) -> object:
        principal = self.auth(context)
        require_tenant_access(principal, request.tenant_id)
        resp = await self.b.quota.RequestBurst(
            qt.RequestBurstRequest(
                tenant_id=request.tenant_id,
                cpu_millis=request.cpu_millis,
                memory_mb=request.memory_mb,
                concurrent_jobs=request.concurrent_jobs,
                duration_seconds=request.duration_seconds,
                requested_by=principal.subject,
            ),
            timeout=5.0,
        )
        return resp.session

    async def GetBudget(self, request: g.GetBudgetRequest, context: grpc.aio.ServicerContext) -> object:
        require_tenant_access(self.auth(context), request.tenant_id)
        resp = await self.b.cost.GetBudget(
            c.GetBudgetRequest(tenant_id=request.tenant_id), timeout=LEADER_FAILOVER_SECONDS
        )
        return resp.budget

    async def UpdateBudget(self, request: g.UpdateBudgetRequest, context: grpc.aio.ServicerContext) -> object:
        require_admin(self.auth(context))
        resp = await self.b.cost.UpdateBudget(
            c.UpdateBudgetRequest(
                tenant_id=request.tenant_id, monthly_limit=request.monthly_limit, policy=request.policy
            ),
            timeout=LEADER_FAILOVER_SECONDS,
        )
        return resp.budget

    async def UpdateFairShare(
        self, request: g.UpdateFairShareRequest, context: grpc.aio.ServicerContext
    ) -> g.UpdateFairShareResponse:
        require_admin(self.auth(context))
        resp = await self.b.queueing.SetTenantWeight(
            q.SetTenantWeightRequest(tenant_id=request.tenant_id, weight=request.weight), timeout=5.0
        )
        return g.UpdateFairShareResponse(tenant_id=resp.tenant_id, weight=resp.weight)


class PoolsServicer(gateway_pb2_grpc.PoolServiceServicer):
    def __init__(self, auth: Authenticator, backends: Backends):
        self.auth = auth
        self.b = backends

    async def ListPools(self, request: g.ListPoolsRequest, context: grpc.aio.ServicerContext) -> g.ListPoolsResponse:
        self.auth(context)
        resp = await self.b.poolmanager.ListPools(pm.ListPoolsRequest(), timeout=5.0)
        return g.ListPoolsResponse(pools=resp.pools)

    async def GetPoolMetrics(self, request: g.GetPoolMetricsRequest, context: grpc.aio.ServicerContext) -> object:
        self.auth(context)
        resp = await self.b.poolmanager.GetPoolMetrics(pm.GetPoolMetricsRequest(pool_id=request.pool_id), timeout=5.0)
        return resp.metrics

    async def GetScalingHistory(
        self, request: g.GetScalingHistoryRequest, context: grpc.aio.ServicerContext
    ) -> g.GetScalingHistoryResponse:
        self.auth(context)
        resp = await self.b.poolmanager.GetScalingHistory(
            pm.GetScalingHistoryRequest(pool_id=request.pool_id, page_size=request.page_size), timeout=5.0
        )
        return g.GetScalingHistoryResponse(events=resp.events)


class CostReportsServicer(gateway_pb2_grpc.CostServiceServicer):
    def __init__(self, auth: Authenticator, backends: Backends):
        self.auth = auth
        self.b = backends

    async def GetCostReports(
        self, request: g.GetCostReportsRequest, context: grpc.aio.ServicerContext
    ) -> g.GetCostReportsResponse:
        principal = self.auth(context)
        tenant_id = request.tenant_id
        if principal.is_admin:
            pass  # empty: every tenant
        elif not tenant_id:
            tenant_id = principal.tenant_id
        else:
            require_tenant_access(principal, tenant_id)
        resp = await self.b.cost.GetCostReports(
            c.GetCostReportsRequest(tenant_id=tenant_id, start=request.start, end=request.end),
            timeout=LEADER_FAILOVER_SECONDS,
        )
        out = g.GetCostReportsResponse(reports=resp.reports)
        if principal.is_admin and resp.HasField("idle_cost"):
            out.idle_cost.CopyFrom(resp.idle_cost)
        return out


class MetricsServicer(gateway_pb2_grpc.MetricsServiceServicer):
    def __init__(
        self, auth: Authenticator, targets: tuple[str, ...], own_metrics: CollectorRegistry, own_address: str = ""
    ):
        self.auth = auth
        self.targets = targets
        self.own_metrics = own_metrics
        self.own_address = own_address  # host:port of this gateway's own /metrics

    async def GetPrometheusMetrics(
        self, request: g.GetPrometheusMetricsRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        require_admin(self.auth(context))
        own = generate_latest(self.own_metrics).decode()
        text = await scrape_all(self.targets, own, own_address=self.own_address)
        return httpbody_pb2.HttpBody(content_type="text/plain; version=0.0.4; charset=utf-8", data=text.encode())


class ApiServicer(gateway_pb2_grpc.ApiServiceServicer):
    """Serves docs/openapi.yaml (read once); open to every caller, like any API's description."""

    def __init__(self, document: bytes | None):
        self.document = document

    async def GetOpenApiDocument(
        self, request: g.GetOpenApiDocumentRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        if self.document is None:
            raise NotFound("this gateway has no OpenAPI document (docs/openapi.yaml)", reason="OPENAPI_MISSING")
        return httpbody_pb2.HttpBody(content_type="application/yaml; charset=utf-8", data=self.document)
