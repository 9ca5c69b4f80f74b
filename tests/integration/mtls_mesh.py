"""A pool-manager's registry and internal APIs behind the authorization interceptor, served over mTLS with
certificates from libs/pki.py on a real etcd: the stage for attack tests (test_authz.py, test_worker_join.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2_grpc
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2, queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2_grpc
from libs.authz import AuthorizationInterceptor
from libs.clock import SystemClock
from libs.config import load_config
from libs.etcd.client import Etcd, op_put
from libs.etcd.informer import Informer
from libs.interceptors import ServerInterceptor
from libs.jobs import new_job_id, ts
from libs.keys import Keys
from libs.lifecycle.codec import decode_job
from libs.lifecycle.store import JobStore
from libs.lifecycle.transitions import apply_dispatch
from libs.pki import SERVICE_LIFETIME, WORKER_LIFETIME, Bundle, CertificateAuthority, service_id, worker_id_uri
from services.poolmanager.join import WorkerCertificateServicer
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.registry import RegistryMetrics, WorkerRegistry
from tests.helpers import FIXTURE_CONFIG

KEYS = Keys("/jobmesh")
POOL = "static-general"  # 1000 millicores, 1024 MB, labels arch=x86_64 class=general
LEASE_TTL = 2


@dataclass
class Mesh:
    """A pool-manager's registry plus the quota, queueing and cost APIs (empty servicers: a call that reaches one
    was let through), behind the authorization interceptor."""

    ca: CertificateAuthority
    port: int  # mTLS
    open_port: int  # server-only TLS, for callers without a certificate
    registry: WorkerRegistry
    metrics: CollectorRegistry

    def channel(self, bundle: Bundle | None) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            self.ca.cert_pem, bundle.key_pem if bundle else None, bundle.cert_pem if bundle else None
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port if bundle else self.open_port}", creds)

    def worker(self, worker_id: str, pool: str = POOL) -> Bundle:
        return self.ca.issue(worker_id_uri(pool, worker_id), WORKER_LIFETIME)

    def service(self, name: str) -> Bundle:
        return self.ca.issue(service_id(name), SERVICE_LIFETIME)

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


class Queueing(queueing_pb2_grpc.QueueingServiceServicer):
    """Answers NextJobs with nothing: a caller that gets an answer was let through."""

    async def NextJobs(self, request: queueing_pb2.NextJobsRequest, context: object) -> queueing_pb2.NextJobsResponse:
        return queueing_pb2.NextJobsResponse()


@asynccontextmanager
async def serve_mesh(etcd: Etcd, ca: CertificateAuthority, usage_interval: float = 15.0) -> AsyncIterator[Mesh]:
    """The servers, up until the block ends (a busy worker's usage samples written every `usage_interval`)."""
    config = load_config(FIXTURE_CONFIG)
    metrics = CollectorRegistry()
    assignments = Informer(etcd, KEYS.assignments, name="assignments")
    workers = Informer(etcd, KEYS.workers, name="workers")
    registry = WorkerRegistry(
        etcd,
        KEYS,
        JobStore(etcd, KEYS),
        config,
        SystemClock(),
        LEASE_TTL,
        assignments,
        workers,
        RegistryMetrics(metrics),
        JobOutcomes(etcd, KEYS, "test"),
        usage_interval=usage_interval,
    )
    assignments.handler = registry.on_assignment
    for informer in (assignments, workers):
        informer.start()
        await informer.wait_synced()
    server = grpc.aio.server(
        interceptors=[AuthorizationInterceptor("poolmanager", metrics), ServerInterceptor("poolmanager", metrics)]
    )
    poolmanager_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(registry, server)
    poolmanager_pb2_grpc.add_WorkerCertificateServiceServicer_to_server(WorkerCertificateServicer(ca, config), server)
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(quota_pb2_grpc.QuotaServiceServicer(), server)
    queueing_pb2_grpc.add_QueueingServiceServicer_to_server(Queueing(), server)
    cost_pb2_grpc.add_CostServiceServicer_to_server(cost_pb2_grpc.CostServiceServicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    own = ca.issue(service_id("poolmanager"), SERVICE_LIFETIME)
    mtls = grpc.ssl_server_credentials([(own.key_pem, own.cert_pem)], ca.cert_pem, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", mtls)
    # A second port without client certificates (gRPC then asks for none), so that a caller without one reaches
    # the interceptor: what it is refused there is the table's doing, not the handshake's.
    server_only = grpc.ssl_server_credentials([(own.key_pem, own.cert_pem)])
    open_port = server.add_secure_port("127.0.0.1:0", server_only)
    await server.start()
    try:
        yield Mesh(ca, port, open_port, registry, metrics)
    finally:
        await server.stop(0)
        await registry.usage.close()
        for informer in (assignments, workers):
            await informer.stop()


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo in {err}")


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def connect_request(worker_id: str, pool: str = POOL, lease_id: int = 0, **extra: object) -> pm.ConnectRequest:
    worker = t.Worker(
        worker_id=worker_id,
        pool_id=pool,
        capacity=t.Resources(cpu_millis=1000, memory_mb=1024),
        labels={"arch": "x86_64", "class": "general"},
        lease_id=lease_id,
    )
    for name, value in extra.items():
        if name == "capacity":
            worker.capacity.CopyFrom(value)  # type: ignore[arg-type]
        elif name == "labels":
            worker.labels.update(value)  # type: ignore[arg-type]
    return pm.ConnectRequest(worker=worker)


@dataclass
class Session:
    """A registered worker: its stream (kept open) and its lease."""

    call: grpc.aio.UnaryStreamCall  # type: ignore[type-arg]
    worker: t.Worker


async def register(mesh: Mesh, ch: grpc.aio.Channel, request: pm.ConnectRequest) -> Session:
    call = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch).Connect(request)
    first = await asyncio.wait_for(call.read(), 10)
    assert first.WhichOneof("event") == "registered"
    return Session(call, first.registered)


async def running_job(etcd: Etcd, worker_id: str, pool: str = POOL, started: float | None = None) -> t.Job:
    """A job RUNNING on `worker_id` with its assignment, as the scheduler leaves them."""
    now = started or time.time()
    worker = t.Worker(worker_id=worker_id, pool_id=pool)
    job = t.Job(job_id=new_job_id(now), tenant_id="globex", state=t.JOB_STATE_PENDING, create_time=ts(now))
    job.spec.name = "j"
    job.spec.resources.cpu_millis = 100
    job.spec.resources.memory_mb = 64
    apply_dispatch(job, worker, now)
    assignment = t.Assignment(
        job_id=job.job_id, tenant_id="globex", attempt=job.attempt, worker_id=worker_id, job=job, assign_time=ts(now)
    )
    await etcd.txn(
        [],
        [
            op_put(KEYS.job("globex", job.job_id), job.SerializeToString()),
            op_put(KEYS.assignment(worker_id, job.job_id), assignment.SerializeToString()),
        ],
    )
    return job


def result_for(job: t.Job, worker_id: str, **numbers: float) -> pm.ReportResultRequest:
    request = pm.ReportResultRequest(
        worker_id=worker_id,
        job_id=job.job_id,
        tenant_id=job.tenant_id,
        attempt=job.attempt,
        exit_code=0,
        reason="EXITED",
        message="exit code 0",
        run_seconds=2.0,
        cpu_seconds=0.5,
        max_memory_mb=32,
    )
    for name, value in numbers.items():
        setattr(request, name, value)
    return request


async def job_state(etcd: Etcd, job: t.Job) -> int:
    kv = await etcd.get(KEYS.job(job.tenant_id, job.job_id))
    assert kv is not None
    return decode_job(kv.value).state
