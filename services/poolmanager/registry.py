"""Worker registration, heartbeats, assignment streams and results; any replica serves these."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.batching import GroupCommit
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import FailedPrecondition, InvalidArgument
from libs.etcd.client import Etcd, KeyValue, WatchEvent, cmp_mod, op_put
from libs.etcd.informer import Informer
from libs.identity import peer_identity
from libs.jobs import RESULT_REASONS, ts
from libs.jobstore import Completion, JobStore
from libs.keys import Keys, safe_segment
from libs.logstore import LogStore
from libs.telemetry import job_id_var, tenant_id_var
from services.poolmanager.binding import (
    ResultBounds,
    ResultOutOfRange,
    WorkerIdentityMismatch,
    check_result_numbers,
    check_speaks_for,
    clamp_to_pool,
)
from services.poolmanager.outcomes import JobOutcomes

log = logging.getLogger(__name__)


# Ended attempts remembered until their assignment's delete is seen (a bound, not a working set).
_ENDED_KEPT = 10_000


# Largest chunk of output one AppendJobLog may carry (workers send at most 256 KiB).
MAX_LOG_CHUNK = 1024 * 1024


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.connected = Gauge(
            "jobmesh_poolmanager_connected_workers", "Workers streaming from this replica.", registry=registry
        )
        self.cancels = Counter(
            "jobmesh_poolmanager_cancels_sent_total",
            "Running jobs a worker was told to stop (cancelled, or taken back from it).",
            registry=registry,
        )
        self.results = Counter(
            "jobmesh_poolmanager_results_total",
            "Results reported by workers.",
            ["pool", "outcome"],
            registry=registry,
        )
        self.refusals = Counter(
            "jobmesh_poolmanager_worker_refusals_total",
            "Worker messages refused: another worker's id or lease, or a result whose numbers cannot be true.",
            ["method", "reason"],
            registry=registry,
        )


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
    ):
        self.etcd = etcd
        self.keys = keys
        self.store = store
        self.config = config
        self.clock = clock
        self.lease_ttl = lease_ttl
        self.assignments = assignments
        self.workers = workers
        self.metrics = metrics
        self.outcomes = outcomes
        self.logs = logs
        self.streams: dict[str, asyncio.Queue[pm.ConnectResponse | pm.ResultAck]] = {}
        self._acks: set[asyncio.Task[None]] = set()  # results from Attach streams being recorded
        # Attempts whose results we are recording or have recorded, until their assignment's delete comes by:
        # that delete means the job ended, not that it was cancelled, so the worker needs no word of it.
        self._ended: dict[tuple[str, int], None] = {}
        # Results that arrive while one transaction is in flight are recorded together in the next.
        self.results: GroupCommit[Completion, str | None] = GroupCommit(
            self._record_results, max_batch=32, name="result-writer", linger=result_linger
        )

    async def _record_results(self, batch: list[Completion]) -> list[str | Exception | None]:
        for done in batch:
            self._ended[(done.job_id, done.attempt)] = None
        while len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        pools = await self.store.complete_attempts(batch, self.clock.now(), cached=self._cached)
        # Counted here, where the transaction landed, not by the caller: a report whose RPC was cancelled
        # after its result was written still counts (its retry is refused as stale).
        for done, pool in zip(batch, pools, strict=True):
            if isinstance(pool, Exception):
                continue  # not recorded: the worker retries it
            if pool is None:
                self.metrics.results.labels("unknown", "stale").inc()
                continue
            succeeded = done.result.get("exit_code") == 0 and done.result.get("reason") == "EXITED"
            self.metrics.results.labels(pool, "succeeded" if succeeded else "failed").inc()
            self.outcomes.record(pool, succeeded)
        return pools

    def _cached(self, key: str) -> KeyValue | None:
        return self.assignments.cache.get(key) or self.workers.cache.get(key)

    def on_assignment(self, event: WatchEvent) -> None:
        """Routes assignment changes to the worker's stream, if it is connected to this replica."""
        worker_id = Keys.assignment_worker(event.kv.key)
        queue = self.streams.get(worker_id)
        if queue is None:
            return
        assignment = _for_worker(event.kv.value)
        if event.kind == "put":
            queue.put_nowait(pm.ConnectResponse(assignment=assignment))
        elif assignment.job_id:
            attempt = (assignment.job_id, assignment.attempt)
            if attempt in self._ended:
                del self._ended[attempt]  # it ended: nothing to tell the worker
            else:
                queue.put_nowait(pm.ConnectResponse(cancel_job_id=assignment.job_id))  # withdrawn: cancel it
                self.metrics.cancels.inc()

    async def Connect(
        self, request: pm.ConnectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pm.ConnectResponse]:
        self._bind(context, request.worker.worker_id, request.worker.pool_id, "Connect")
        async for item in self._session(request.worker):
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
            async for item in self._session(first.connect.worker):
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
            accepted = await self._record(result)
        except ResultOutOfRange:
            accepted = False  # refused for good: sending it again changes nothing
        except Exception as exc:  # unacknowledged: the worker sends it again with ReportResult
            log.warning("result on the stream not recorded: %s", exc, extra={"job_id": result.job_id})
            return
        queue = self.streams.get(worker_id)
        if queue is not None:
            queue.put_nowait(pm.ResultAck(job_id=result.job_id, attempt=result.attempt, accepted=accepted))

    async def _session(self, worker: t.Worker) -> AsyncIterator[pm.ConnectResponse | pm.ResultAck]:
        """Registers the worker and streams what it must hear: its registration, its current assignment, then
        assignments, cancellations and (on an Attach stream) acknowledgements of its results."""
        if not safe_segment(worker.worker_id):
            raise InvalidArgument("worker.worker_id", "is not a valid id")
        pool = self.config.pool(worker.pool_id)
        if pool is None:
            raise InvalidArgument("worker.pool_id", f"unknown pool {worker.pool_id!r}")
        cut = clamp_to_pool(worker, pool)
        if cut:
            log.warning("worker %s declared more than pool %s grants: %s", worker.worker_id, pool.pool_id, cut)
        key = self.keys.worker(worker.worker_id)
        existing = await self.etcd.get(key)
        # A worker that reconnects through another replica keeps its lease, and so its identity and job; only its
        # own lease, the one its record is bound to (any other would be kept alive by someone else's word).
        lease_id = worker.lease_id
        if lease_id and (existing is None or existing.lease != lease_id):
            if existing is not None:  # (no record: its lease ran out, the common case of a lost worker)
                log.warning(
                    "worker %s presented lease %x, not its own: registering it afresh", worker.worker_id, lease_id
                )
                self.metrics.refusals.labels("Connect", "LEASE_NOT_OWNED").inc()
            lease_id = 0
        if not lease_id or await self.etcd.refresh(lease_id) <= 0:
            # A new incarnation (restarted, or declared lost): whatever was assigned to the old one is not ours
            # to run again. Take it back as a lost worker's, so that attempt never runs twice.
            await self._reclaim_previous(worker.worker_id)
            lease_id = await self.etcd.grant(self.lease_ttl)
        worker.lease_id = lease_id
        worker.register_time.CopyFrom(ts(self.clock.now()))
        if existing is not None and existing.lease == lease_id:
            known = t.Worker()
            known.ParseFromString(existing.value)
            if worker.state != t.WORKER_STATE_DRAINING:  # a draining worker says so when it registers again
                worker.state = known.state
            worker.jobs_run = max(worker.jobs_run, known.jobs_run)
        await self.etcd.put(key, worker.SerializeToString(), lease=lease_id)
        queue: asyncio.Queue[pm.ConnectResponse | pm.ResultAck] = asyncio.Queue()
        self.streams[worker.worker_id] = queue
        self.metrics.connected.set(len(self.streams))
        log.info("worker %s registered (pool %s, lease %x)", worker.worker_id, worker.pool_id, lease_id)
        pool = self.config.pool(worker.pool_id)
        grace = pool.drain_grace_seconds if pool is not None else 0.0
        try:
            yield pm.ConnectResponse(registered=worker, lease_ttl_seconds=self.lease_ttl, drain_grace_seconds=grace)
            held = self.keys.worker_assignments(worker.worker_id)
            for key, current in list(self.assignments.cache.items()):
                if key.startswith(held):
                    yield pm.ConnectResponse(assignment=_for_worker(current.value))
            while True:
                yield await queue.get()
        finally:
            if self.streams.get(worker.worker_id) is queue:
                del self.streams[worker.worker_id]
            self.metrics.connected.set(len(self.streams))

    async def _reclaim_previous(self, worker_id: str) -> None:
        held, _, _ = await self.etcd.get_prefix(self.keys.worker_assignments(worker_id))
        for assign_kv in held:
            await self._reclaim_one(worker_id, assign_kv)

    async def _reclaim_one(self, worker_id: str, assign_kv: KeyValue) -> None:
        compares, ops, job = await self.store.reclaim_plan(worker_id, assign_kv, self.clock.now())
        result = await self.etcd.txn(compares, ops)
        if result.succeeded and job is not None:
            log.warning(
                "worker %s came back without its lease; attempt %d %s",
                worker_id,
                job.attempt,
                "will be retried" if job.state == t.JOB_STATE_PENDING else "failed (WORKER_LOST)",
                extra={"job_id": job.job_id, "tenant_id": job.tenant_id},
            )
            if job.state == t.JOB_STATE_FAILED:
                self.outcomes.record(job.pool_id, False)

    async def Heartbeat(self, request: pm.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pm.HeartbeatResponse:
        self._bind(context, request.worker_id, None, "Heartbeat")
        ttl = 0
        if request.lease_id:
            # Only the lease the worker's record is bound to; any other is not refreshed and the worker hears it
            # is not alive (a worker that lost its lease registers again).
            bound = await self._lease_of(request.worker_id, request.lease_id)
            if bound == request.lease_id:
                ttl = await self.etcd.refresh(request.lease_id)
            elif bound:
                log.warning(
                    "heartbeat of worker %s for lease %x, not its own: not refreshed",
                    request.worker_id,
                    request.lease_id,
                )
                self.metrics.refusals.labels("Heartbeat", "LEASE_NOT_OWNED").inc()
        if ttl > 0 and (request.unhealthy_reason or request.draining) and safe_segment(request.worker_id):
            why = f"failed its health check ({request.unhealthy_reason[:200]})" if request.unhealthy_reason else ""
            await self._mark_draining(request.worker_id, request.lease_id, why or "is stopping")
        return pm.HeartbeatResponse(alive=ttl > 0)

    async def _lease_of(self, worker_id: str, expected: int) -> int:
        """The lease `worker_id`'s record is bound to (0: no record): the watch cache when it agrees with
        `expected`, else etcd (the cache may lag a registration)."""
        if not safe_segment(worker_id):
            return 0
        key = self.keys.worker(worker_id)
        cached = self.workers.cache.get(key)
        if cached is not None and cached.lease == expected:
            return expected
        current = await self.etcd.get(key)
        return current.lease if current is not None else 0

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

    async def _mark_draining(self, worker_id: str, lease_id: int, why: str) -> None:
        """DRAINING takes the worker out of scheduling; the leader stops it once it has no job, and the pool's
        policy replaces it. Written only under the worker's own lease, so a record of a later incarnation is never
        touched."""
        key = self.keys.worker(worker_id)
        kv = await self.etcd.get(key)
        if kv is None or kv.lease != lease_id:
            return
        worker = t.Worker()
        worker.ParseFromString(kv.value)
        if worker.state == t.WORKER_STATE_DRAINING:
            return
        worker.state = t.WORKER_STATE_DRAINING
        if (
            await self.etcd.txn([cmp_mod(key, kv.mod_revision)], [op_put(key, worker.SerializeToString(), lease_id)])
        ).succeeded:
            log.warning("worker %s %s: draining it", worker_id, why)

    async def ReportResult(
        self, request: pm.ReportResultRequest, context: grpc.aio.ServicerContext
    ) -> pm.ReportResultResponse:
        self._bind(context, request.worker_id, None, "ReportResult")
        return pm.ReportResultResponse(accepted=await self._record(request))

    async def _record(self, request: pm.ReportResultRequest) -> bool:
        """Records a worker's result: True, or False when it was stale (and refused)."""
        job_id_var.set(request.job_id)
        tenant_id_var.set(request.tenant_id)
        if request.reason not in RESULT_REASONS:
            raise InvalidArgument("reason", f"must be one of {sorted(RESULT_REASONS)}")
        bounds = await self._result_bounds(request)
        if bounds is None:  # no such assignment: stale, as the transaction would find
            log.warning("rejected stale result for attempt %d from %s", request.attempt, request.worker_id)
            return False
        try:
            check_result_numbers(request.run_seconds, request.cpu_seconds, request.max_memory_mb, bounds)
        except ResultOutOfRange as err:
            log.warning("refused a result from worker %s: %s", request.worker_id, err.message)
            self.metrics.refusals.labels("ReportResult", err.reason).inc()
            raise
        pool = await self.results.submit(
            Completion(
                request.tenant_id,
                request.job_id,
                request.attempt,
                request.worker_id,
                {
                    "exit_code": request.exit_code,
                    "reason": request.reason,
                    "message": request.message,
                    "cpu_seconds": request.cpu_seconds,
                    "max_memory_mb": request.max_memory_mb,
                },
                request.unhealthy_reason,
            )
        )
        if pool is None:
            log.warning("rejected stale result for attempt %d from %s", request.attempt, request.worker_id)
            return False
        return True

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
        held = await self._held(request.worker_id, request.job_id)
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

    async def _held(self, worker_id: str, job_id: str) -> t.Assignment | None:
        """The assignment `worker_id` holds for `job_id`, if any."""
        if not (safe_segment(worker_id) and safe_segment(job_id)):
            return None
        key = self.keys.assignment(worker_id, job_id)
        kv = self.assignments.cache.get(key) or await self.etcd.get(key)
        if kv is None:
            return None
        held = t.Assignment()
        held.ParseFromString(kv.value)
        return held

    async def _result_bounds(self, request: pm.ReportResultRequest) -> ResultBounds | None:
        """What the attempt being reported could have used, from the assignment the worker holds (None: it holds
        none for that job)."""
        held = await self._held(request.worker_id, request.job_id)
        if held is None:
            return None
        pool = self.config.pool(held.job.pool_id)
        if pool is None:
            return None
        assigned = held.assign_time.ToNanoseconds() / 1e9 if held.HasField("assign_time") else None
        return ResultBounds.of(pool, assigned, self.clock.now())


def _for_worker(stored: bytes) -> t.Assignment:
    """An assignment as its worker gets it: without the job record it carries for recording the result."""
    assignment = t.Assignment()
    assignment.ParseFromString(stored)
    assignment.ClearField("job")
    return assignment
