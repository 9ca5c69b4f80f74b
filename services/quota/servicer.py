"""gRPC adapter for the quota service."""

from __future__ import annotations

import asyncio
import json

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobmesh.common.v1 import quota_pb2 as qt
from jobmesh.quota.v1 import quota_pb2 as q
from jobmesh.quota.v1 import quota_pb2_grpc
from libs.errors import JobMeshError, NotLeader, ResourceExhausted, Unavailable, item_error
from libs.etcd.client import Etcd, RequestOp, op_put
from libs.etcd.election import LeaderElection, Leadership
from libs.jobs import ts
from libs.keys import Keys
from libs.leadergate import LeaderGate
from services.quota.manager import BurstSession, QuotaManager


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter(
            "jobmesh_quota_decisions_total", "Admission decisions.", ["tenant", "result", "reason"], registry=registry
        )
        self.latency = Histogram(
            "jobmesh_quota_check_seconds",
            "Time to decide one admission.",
            registry=registry,
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01),
        )
        self.usage = Gauge("jobmesh_quota_usage", "Admitted usage.", ["tenant", "resource"], registry=registry)
        self.limit = Gauge("jobmesh_quota_limit", "Quota limit.", ["tenant", "resource"], registry=registry)
        self.utilization = Gauge(
            "jobmesh_quota_utilization_ratio", "Usage over limit.", ["tenant", "resource"], registry=registry
        )
        self.burst_active = Gauge("jobmesh_quota_burst_sessions_active", "Active burst sessions.", registry=registry)
        self.burst_left = Gauge(
            "jobmesh_quota_burst_capacity_left", "Burst pool left.", ["resource"], registry=registry
        )
        self.audit_pruned = Counter(
            "jobmesh_quota_burst_audit_pruned_total",
            "Burst audit entries deleted for age or count ([retention] burst_audit_*).",
            registry=registry,
        )


def session_proto(s: BurstSession) -> qt.BurstSession:
    return qt.BurstSession(
        session_id=s.session_id,
        tenant_id=s.tenant_id,
        cpu_millis=s.cpu_millis,
        memory_mb=s.memory_mb,
        concurrent_jobs=s.concurrent_jobs,
        start_time=ts(s.start),
        expire_time=ts(s.expire),
        requested_by=s.requested_by,
    )


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    """Served by the leading replica only (`gate`): every call runs under its term, every write is fenced by it,
    and each admission carries the term so that the enqueue can refuse a deposed leader's admissions."""

    def __init__(
        self,
        manager: QuotaManager,
        etcd: Etcd,
        keys: Keys,
        metrics: QuotaMetrics,
        election: LeaderElection,
        gate: LeaderGate,
    ):
        self.manager = manager
        self.etcd = etcd
        self.keys = keys
        self.metrics = metrics
        self.election = election
        self.gate = gate
        # One implicit session at a time per tenant: concurrent burst submits wait for it and then join it.
        self._opening: dict[str, asyncio.Lock] = {}

    async def _fenced(self, ops: list[RequestOp], term: Leadership) -> None:
        try:
            await self.election.fenced_txn([], ops, token=term)
        except NotLeader as exc:
            raise Unavailable(f"{exc.message}; retry", reason="NOT_LEADER") from exc

    async def Reserve(self, request: q.ReserveRequest, context: grpc.aio.ServicerContext) -> q.ReserveResponse:
        term = self.gate.token()
        await self._session_if_needed(request, term)
        return self._reserve(request, term)

    async def _session_if_needed(self, request: q.ReserveRequest, term: Leadership) -> None:
        """A burst submit beyond the quota with no active session opens one (stored before it is used)."""
        res = request.resources
        args = (request.tenant_id, request.job_id, res.cpu_millis, res.memory_mb, request.burst)
        if not self.manager.needs_session(*args):
            return
        async with self._opening.setdefault(request.tenant_id, asyncio.Lock()):
            if self.manager.needs_session(*args):
                self.manager.check_tenant(request.tenant_id)
                await self._open(self.manager.session_at_submit(request.tenant_id), term)

    async def ReserveMany(
        self, request: q.ReserveManyRequest, context: grpc.aio.ServicerContext
    ) -> q.ReserveManyResponse:
        term = self.gate.token()
        outcomes = []
        for item in request.reservations:
            try:
                await self._session_if_needed(item, term)
                outcomes.append(q.ReserveOutcome(reserved=self._reserve(item, term)))
            except JobMeshError as err:
                outcomes.append(q.ReserveOutcome(error=item_error(err)))
        return q.ReserveManyResponse(outcomes=outcomes)

    async def CheckAdmission(
        self, request: q.CheckAdmissionRequest, context: grpc.aio.ServicerContext
    ) -> q.CheckAdmissionResponse:
        """What Reserve would answer now, holding nothing: a burst job beyond the quota with no active session is
        admitted if the submit could open one."""
        self.gate.token()
        r = request.reservation
        res = r.resources
        try:
            self.manager.check_tenant(r.tenant_id)
            # A job that could never fit is not one that needs a session: the dry reservation refuses it NEVER_FITS.
            if self.manager.needs_session(r.tenant_id, r.job_id, res.cpu_millis, res.memory_mb, r.burst):
                left = self.manager.burst_left()
                cap = self.manager.burst_policy.tenant_cap()
                if min(left.cpu_millis, cap.cpu_millis) <= 0 or min(left.memory_mb, cap.memory_mb) <= 0:
                    raise ResourceExhausted("no burst capacity left", reason="BURST_UNAVAILABLE")
                return q.CheckAdmissionResponse(admitted=True, burst=True)
            session_id = self.manager.reserve(r.tenant_id, r.job_id, res.cpu_millis, res.memory_mb, r.burst, dry=True)
        except JobMeshError as err:
            return q.CheckAdmissionResponse(admitted=False, refusal=item_error(err))
        return q.CheckAdmissionResponse(admitted=True, burst=bool(session_id))

    def _reserve(self, request: q.ReserveRequest, term: Leadership) -> q.ReserveResponse:
        with self.metrics.latency.time():
            try:
                session_id = self.manager.reserve(
                    request.tenant_id,
                    request.job_id,
                    request.resources.cpu_millis,
                    request.resources.memory_mb,
                    request.burst,
                )
            except Exception as exc:
                self.metrics.decisions.labels(request.tenant_id, "rejected", getattr(exc, "reason", "ERROR")).inc()
                raise
        self.metrics.decisions.labels(request.tenant_id, "admitted", "BURST" if session_id else "QUOTA").inc()
        return q.ReserveResponse(burst_session_id=session_id, admission_fence=term.revision)

    async def Release(self, request: q.ReleaseRequest, context: grpc.aio.ServicerContext) -> q.ReleaseResponse:
        self.gate.token()
        self.manager.release(request.tenant_id, request.job_id)
        return q.ReleaseResponse()

    def quota(self, tenant_id: str) -> qt.Quota:
        limits = self.manager.limits(tenant_id)
        usage = self.manager.usage(tenant_id)
        quota = qt.Quota(
            tenant_id=tenant_id,
            limits=qt.QuotaLimits(
                cpu_millis=limits.cpu_millis, memory_mb=limits.memory_mb, concurrent_jobs=limits.concurrent_jobs
            ),
            usage=qt.QuotaLimits(
                cpu_millis=usage.cpu_millis, memory_mb=usage.memory_mb, concurrent_jobs=usage.concurrent_jobs
            ),
        )
        for name in ("cpu_millis", "memory_mb", "concurrent_jobs"):
            quota.utilization[name] = round(getattr(usage, name) / max(getattr(limits, name), 1), 4)
        session = self.manager.active_session(tenant_id)
        if session is not None:
            quota.burst.CopyFrom(session_proto(session))
        quota.burst_sessions.extend(session_proto(s) for s in self.manager.audit_for(tenant_id))
        return quota

    async def GetQuota(self, request: q.GetQuotaRequest, context: grpc.aio.ServicerContext) -> q.GetQuotaResponse:
        self.gate.token()  # the standby's usage lacks the leader's in-flight reservations
        self.manager.check_tenant(request.tenant_id)
        return q.GetQuotaResponse(quota=self.quota(request.tenant_id))

    async def UpdateQuota(
        self, request: q.UpdateQuotaRequest, context: grpc.aio.ServicerContext
    ) -> q.UpdateQuotaResponse:
        term = self.gate.token()
        lim = request.limits
        updated = self.manager.limits_after(
            request.tenant_id,
            lim.cpu_millis if lim.HasField("cpu_millis") else None,
            lim.memory_mb if lim.HasField("memory_mb") else None,
            lim.concurrent_jobs if lim.HasField("concurrent_jobs") else None,
        )
        record = {
            "cpu_millis": updated.cpu_millis,
            "memory_mb": updated.memory_mb,
            "concurrent_jobs": updated.concurrent_jobs,
        }
        await self._fenced([op_put(self.keys.quota_limits(request.tenant_id), json.dumps(record).encode())], term)
        self.manager.apply_limits(request.tenant_id, updated)  # stored first: a failed write changes nothing
        return q.UpdateQuotaResponse(quota=self.quota(request.tenant_id))

    async def RequestBurst(
        self, request: q.RequestBurstRequest, context: grpc.aio.ServicerContext
    ) -> q.RequestBurstResponse:
        term = self.gate.token()
        session = self.manager.plan_burst(
            request.tenant_id,
            request.cpu_millis,
            request.memory_mb,
            request.concurrent_jobs,
            request.duration_seconds,
            request.requested_by,
        )
        await self._open(session, term)
        return q.RequestBurstResponse(session=session_proto(session))

    async def _open(self, session: BurstSession, term: Leadership) -> None:
        """Stores a claimed session and its audit record (together, fenced by the term), then opens it: a failed
        write opens nothing and gives its claim back."""
        record = json.dumps(session.__dict__).encode()
        try:
            # The session key lives on a lease as long as the session, so etcd itself ends it on time.
            lease = await self.etcd.grant(max(1, int(session.expire - session.start) + 1))
            ops = [
                op_put(self.keys.burst_session(session.session_id), record, lease),
                op_put(self.keys.burst_audit(int(session.start * 1000), session.session_id), record),
            ]
            await self._fenced(ops, term)
        except BaseException:
            self.manager.drop_claim(session)
            raise
        self.manager.open_session(session)
        self.manager.audit.append(session)
