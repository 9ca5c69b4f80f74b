"""gRPC adapter for the queueing service: proto in, the core, proto out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.clock import Clock
from libs.errors import InvalidArgument, JobMeshError, NotFound, item_error
from libs.keys import safe_segment
from libs.lifecycle.store import JobStore
from libs.lifecycle.transitions import TERMINAL
from libs.telemetry import job_id_var, tenant_id_var
from services.queueing.manager import QueueManager
from services.queueing.watch import JobWatchers, RecentActivity

# A watched pending job is looked at again this often for a change of its queue position.
POSITION_REFRESH_SECONDS = 2.0

log = logging.getLogger(__name__)


class QueueingServicer(queueing_pb2_grpc.QueueingServiceServicer):
    def __init__(
        self,
        manager: QueueManager,
        store: JobStore,
        clock: Clock,
        watchers: JobWatchers | None = None,
        activity: RecentActivity | None = None,
    ):
        self.manager = manager
        self.store = store
        self.clock = clock
        self.watchers = watchers if watchers is not None else JobWatchers()
        self.activity = activity if activity is not None else RecentActivity(clock.now())

    async def Enqueue(self, request: q.EnqueueRequest, context: grpc.aio.ServicerContext) -> q.EnqueueResponse:
        job_id_var.set(request.job.job_id)
        tenant_id_var.set(request.job.tenant_id)
        job, created = await self.manager.enqueue(request.job, request.quota_fence)
        return q.EnqueueResponse(job=job, created=created)

    async def EnqueueMany(
        self, request: q.EnqueueManyRequest, context: grpc.aio.ServicerContext
    ) -> q.EnqueueManyResponse:
        """Stored together: the jobs' writes share the store's group commit."""
        results = await asyncio.gather(
            *(self.manager.enqueue(item.job, item.quota_fence) for item in request.items), return_exceptions=True
        )
        outcomes = []
        for result in results:
            if isinstance(result, JobMeshError):
                outcomes.append(q.EnqueueOutcome(error=item_error(result)))
            elif isinstance(result, Exception):
                log.error("enqueue failed", exc_info=result)
                outcomes.append(q.EnqueueOutcome(error=item_error(JobMeshError("internal error"))))
            elif isinstance(result, BaseException):
                raise result
            else:
                job, created = result
                outcomes.append(q.EnqueueOutcome(enqueued=q.EnqueueResponse(job=job, created=created)))
        return q.EnqueueManyResponse(outcomes=outcomes)

    async def GetJob(self, request: q.GetJobRequest, context: grpc.aio.ServicerContext) -> q.GetJobResponse:
        job_id_var.set(request.job_id)
        return q.GetJobResponse(job=await self.manager.get_job(request.tenant_id, request.job_id))

    async def ListJobs(self, request: q.ListJobsRequest, context: grpc.aio.ServicerContext) -> q.ListJobsResponse:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "is required")
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        page_size = min(request.page_size or 50, 500)
        jobs, token = await self.store.list(
            request.tenant_id, request.state, page_size, request.page_token, newest_first=request.newest_first
        )
        return q.ListJobsResponse(jobs=[self.manager.show_late_start(job) for job in jobs], next_page_token=token)

    async def CancelJob(self, request: q.CancelJobRequest, context: grpc.aio.ServicerContext) -> q.CancelJobResponse:
        job_id_var.set(request.job_id)
        return q.CancelJobResponse(job=await self.store.cancel(request.tenant_id, request.job_id, self.clock.now()))

    async def NextJobs(self, request: q.NextJobsRequest, context: grpc.aio.ServicerContext) -> q.NextJobsResponse:
        jobs, version = await self.manager.next_jobs(
            request.limit, request.after_version, min(request.wait_millis, 10_000) / 1000.0
        )
        return q.NextJobsResponse(jobs=[q.QueuedJob(job=job, mod_revision=rev) for job, rev in jobs], version=version)

    async def GetQueueStats(
        self, request: q.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> q.GetQueueStatsResponse:
        by_queue, by_tenant = self.manager.stats()
        burst, oldest_wait = self.manager.demand_by_queue()
        return q.GetQueueStatsResponse(
            depth_by_queue=by_queue,
            depth_by_tenant=by_tenant,
            burst_depth_by_queue=burst,
            oldest_wait_seconds_by_queue=oldest_wait,
        )

    async def SetTenantWeight(
        self, request: q.SetTenantWeightRequest, context: grpc.aio.ServicerContext
    ) -> q.SetTenantWeightResponse:
        tenant_id_var.set(request.tenant_id)
        weight = await self.manager.set_weight(request.tenant_id, request.weight)
        return q.SetTenantWeightResponse(tenant_id=request.tenant_id, weight=weight)

    async def WatchJob(
        self, request: q.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[q.WatchJobResponse]:
        """The job as GetJob shows it, then again at each change until it ends. Subscribed before the first read,
        so that no change between the two is missed."""
        job_id_var.set(request.job_id)
        if not safe_segment(request.job_id):
            raise NotFound(f"job {request.job_id!r} not found", reason="JOB_NOT_FOUND")
        changes = self.watchers.subscribe(request.job_id)
        try:
            job = await self.manager.get_job(request.tenant_id, request.job_id)
            yield q.WatchJobResponse(job=job)
            last = job
            while last.state not in TERMINAL:
                try:
                    change = await asyncio.wait_for(changes.get(), POSITION_REFRESH_SECONDS)
                except TimeoutError:
                    job = t.Job()
                    job.CopyFrom(last)  # the same record: only its place in the queue may have moved
                else:
                    if change is None:
                        return  # deleted (past its retention)
                    job = change[0]
                if job.state == t.JOB_STATE_PENDING:
                    self.manager.annotate(job)
                job = self.manager.show_late_start(job)
                if job != last:
                    yield q.WatchJobResponse(job=job)
                    last = job
        finally:
            self.watchers.unsubscribe(request.job_id, changes)

    async def EstimateStart(
        self, request: q.EstimateStartRequest, context: grpc.aio.ServicerContext
    ) -> q.EstimateStartResponse:
        by_queue, _ = self.manager.stats()
        rate, window = self.activity.dispatch_rate(request.queue, self.clock.now())
        median, samples = self.activity.median_runtime(request.tenant_id)
        return q.EstimateStartResponse(
            pending=by_queue.get(request.queue, 0),
            dispatch_rate_per_second=rate,
            window_seconds=window,
            median_runtime_seconds=median,
            runtime_samples=samples,
        )
