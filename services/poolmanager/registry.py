"""The worker registry's gRPC adapter (any replica serves it): registration and the Attach stream, heartbeats and
results, each checked against the caller's certificate, then handed to the sessions (sessions.py, which pass the
heartbeats' usage samples to usage.py) and the result recorder (results.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import FailedPrecondition, InvalidArgument
from libs.etcd.client import Etcd, WatchEvent
from libs.etcd.informer import Informer
from libs.identity import peer_identity
from libs.keys import Keys
from libs.lifecycle.store import JobStore
from libs.logstore import LogStore
from libs.telemetry import job_id_var, tenant_id_var
from services.poolmanager.binding import ResultOutOfRange, WorkerIdentityMismatch, check_speaks_for
from services.poolmanager.metrics import RegistryMetrics
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.results import EndedAttempts, RegistryParts, ResultRecorder
from services.poolmanager.sessions import WorkerSessions
from services.poolmanager.usage import DEFAULT_INTERVAL as DEFAULT_USAGE_INTERVAL
from services.poolmanager.usage import UsageRecorder

__all__ = ["RegistryMetrics", "WorkerRegistry"]

log = logging.getLogger(__name__)

# Largest chunk of output one AppendJobLog may carry (workers send at most 256 KiB).
MAX_LOG_CHUNK = 1024 * 1024


class WorkerRegistry(poolmanager_pb2_grpc.WorkerRegistryServiceServicer):
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        store: JobStore,
        config: MeshConfig,
        clock: Clock,
        lease_ttl: int,
        assignments: Informer,
        workers: Informer,
        metrics: RegistryMetrics,
        outcomes: JobOutcomes,
        result_linger: float = 0.0,
        logs: LogStore | None = None,
        usage_interval: float = DEFAULT_USAGE_INTERVAL,
    ):
        self.metrics = metrics
        self.logs = logs
        parts = RegistryParts(etcd, keys, store, config, clock, assignments, workers, metrics, outcomes)
        ended = EndedAttempts()
        self.usage = UsageRecorder(parts, usage_interval)
        self.sessions = WorkerSessions(parts, lease_ttl, ended, self.usage)
        self.results = ResultRecorder(parts, ended, result_linger)
        self._acks: set[asyncio.Task[None]] = set()  # results from Attach streams being recorded

    def on_assignment(self, event: WatchEvent) -> None:
        self.sessions.on_assignment(event)

    async def Connect(
        self, request: pm.ConnectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pm.ConnectResponse]:
        self._bind(context, request.worker.worker_id, request.worker.pool_id, "Connect")
        async for item in self.sessions.session(request.worker):
            if isinstance(item, pm.ConnectResponse):
                yield item

    async def Attach(
        self, request_iterator: AsyncIterator[pm.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pm.AttachResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("connect"):
            raise InvalidArgument("connect", "must be the first message of a session")
        worker_id = first.connect.worker.worker_id
        self._bind(context, worker_id, first.connect.worker.pool_id, "Attach")
        reader: asyncio.Task[None] | None = None
        try:
            async for item in self.sessions.session(first.connect.worker):
                if reader is None:  # registered: results may come from now on
                    reader = asyncio.create_task(self._read_results(request_iterator, worker_id))
                if isinstance(item, pm.ResultAck):
                    yield pm.AttachResponse(result_ack=item)
                else:
                    yield pm.AttachResponse(event=item)
        finally:
            if reader is not None:
                reader.cancel()

    async def _read_results(self, requests: AsyncIterator[pm.AttachRequest], worker_id: str) -> None:
        """Records each result that comes on a session's stream, and acknowledges it on the same stream."""
        async for message in requests:
            if message.HasField("result"):
                if message.result.worker_id != worker_id:
                    log.warning("ignored a result for worker %r on %s's stream", message.result.worker_id, worker_id)
                    continue
                task = asyncio.create_task(self._acknowledge(message.result, worker_id))
                self._acks.add(task)
                task.add_done_callback(self._acks.discard)

    async def _acknowledge(self, result: pm.ReportResultRequest, worker_id: str) -> None:
        try:
            accepted = await self.results.record(result)
        except ResultOutOfRange:
            accepted = False  # refused for good: sending it again changes nothing
        except Exception as exc:  # unacknowledged: the worker sends it again with ReportResult
            log.warning("result on the stream not recorded: %s", exc, extra={"job_id": result.job_id})
            return
        self.sessions.acknowledge(
            worker_id, pm.ResultAck(job_id=result.job_id, attempt=result.attempt, accepted=accepted)
        )

    async def Heartbeat(self, request: pm.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pm.HeartbeatResponse:
        self._bind(context, request.worker_id, None, "Heartbeat")
        return pm.HeartbeatResponse(alive=await self.sessions.heartbeat(request))

    async def ReportResult(
        self, request: pm.ReportResultRequest, context: grpc.aio.ServicerContext
    ) -> pm.ReportResultResponse:
        self._bind(context, request.worker_id, None, "ReportResult")
        return pm.ReportResultResponse(accepted=await self.results.record(request))

    async def AppendJobLog(
        self, request: pm.AppendJobLogRequest, context: grpc.aio.ServicerContext
    ) -> pm.AppendJobLogResponse:
        """Stores output of an attempt, only from the worker the attempt is assigned to now: a worker can write
        the log of no other job, and of its own only while it holds it. The tenant is the assignment's."""
        self._bind(context, request.worker_id, None, "AppendJobLog")
        job_id_var.set(request.job_id)
        if len(request.data) > MAX_LOG_CHUNK:
            raise InvalidArgument("data", f"at most {MAX_LOG_CHUNK} bytes per call")
        if request.offset < 0:
            raise InvalidArgument("offset", "must not be negative")
        held = await self.results.held(request.worker_id, request.job_id)
        if held is None or held.attempt != request.attempt:
            self.metrics.refusals.labels("AppendJobLog", "ATTEMPT_NOT_ASSIGNED").inc()
            raise FailedPrecondition(
                f"attempt {request.attempt} of job {request.job_id} is not assigned to {request.worker_id}",
                reason="ATTEMPT_NOT_ASSIGNED",
            )
        if self.logs is None:
            return pm.AppendJobLogResponse(next_offset=request.offset + len(request.data))
        tenant_id_var.set(held.tenant_id)
        stored = await asyncio.to_thread(
            self.logs.append, held.tenant_id, request.job_id, request.attempt, request.offset, request.data
        )
        return pm.AppendJobLogResponse(next_offset=stored)

    def _bind(self, context: grpc.aio.ServicerContext, worker_id: str, pool_id: str | None, method: str) -> None:
        """Refuses a message that names another worker than the caller's certificate (nothing is written)."""
        identity = peer_identity(context)
        try:
            check_speaks_for(identity, worker_id, pool_id, method)
        except WorkerIdentityMismatch as err:
            caller = identity.uri if identity is not None else "none"
            log.warning("refused: caller=%s method=%s worker_id=%s: %s", caller, method, worker_id, err.message)
            self.metrics.refusals.labels(method, err.reason).inc()
            raise
