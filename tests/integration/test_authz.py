"""Attacks on the mesh's internal API, against real grpc.aio servers over mTLS (certificates from libs/pki.py) and a
real etcd: callers the authorization table does not name are refused before anything runs, and a worker can speak
only for itself (its id, its pool, its lease, the attempts it holds, results that could be true)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2, cost_pb2_grpc
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2, queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from libs.authz import AuthorizationInterceptor
from libs.clock import SystemClock
from libs.config import load_config
from libs.etcd.client import Etcd, op_put
from libs.etcd.informer import Informer
from libs.interceptors import ServerInterceptor
from libs.jobs import apply_dispatch, decode_job, new_job_id, ts
from libs.jobstore import JobStore
from libs.keys import Keys
from libs.launcher import Ports, Stack
from libs.pki import SERVICE_LIFETIME, WORKER_LIFETIME, Bundle, CertificateAuthority, service_id, worker_id_uri
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.records import CostRecord
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.registry import RegistryMetrics, WorkerRegistry
from tests.helpers import FIXTURE_CONFIG
from tests.unit.cost_builders import JobBuilder

KEYS = Keys("/jobmesh")
POOL = "static-general"  # 1000 millicores, 1024 MB, labels arch=x86_64 class=general
LEASE_TTL = 2


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture()
def etcd_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(data_dir=tmp_path / "stack", config_path=FIXTURE_CONFIG, ports=Ports.free(), env={})
    try:
        stack.start_etcd()
        stack.wait_etcd(30)
        yield stack
    finally:
        stack.stop()


@pytest_asyncio.fixture()
async def etcd(etcd_stack: Stack) -> AsyncIterator[Etcd]:
    client = Etcd([f"127.0.0.1:{etcd_stack.ports.etcd}"])
    try:
        yield client
    finally:
        await client.close()


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


@pytest_asyncio.fixture()
async def mesh(etcd: Etcd, ca: CertificateAuthority) -> AsyncIterator[Mesh]:
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
    )
    assignments.handler = registry.on_assignment
    for informer in (assignments, workers):
        informer.start()
        await informer.wait_synced()
    server = grpc.aio.server(
        interceptors=[AuthorizationInterceptor("poolmanager", metrics), ServerInterceptor("poolmanager", metrics)]
    )
    poolmanager_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(registry, server)
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


# ------------------------------------------------------------------------------------------- the table


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "call",
    [
        lambda ch: quota_pb2_grpc.QuotaServiceStub(ch).Reserve(quota_pb2.ReserveRequest(tenant_id="globex")),
        lambda ch: quota_pb2_grpc.QuotaServiceStub(ch).UpdateQuota(quota_pb2.UpdateQuotaRequest(tenant_id="acme")),
        lambda ch: queueing_pb2_grpc.QueueingServiceStub(ch).NextJobs(queueing_pb2.NextJobsRequest()),
        lambda ch: queueing_pb2_grpc.QueueingServiceStub(ch).Enqueue(queueing_pb2.EnqueueRequest()),
        lambda ch: cost_pb2_grpc.CostServiceStub(ch).GetCostReports(cost_pb2.GetCostReportsRequest()),
    ],
    ids=["quota-reserve", "quota-update", "queueing-next-jobs", "queueing-enqueue", "cost-reports"],
)
async def test_a_worker_identity_cannot_call_quota_queueing_or_cost(mesh: Mesh, call: object) -> None:
    async with mesh.channel(mesh.worker("w-evil")) as ch:
        err = await refused(call(ch))  # type: ignore[operator]

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "CALLER_NOT_ALLOWED"
    denied = [
        s for m in mesh.metrics.collect() for s in m.samples if s.name == "jobmesh_authz_denied_total" and s.value
    ]
    assert [s.labels["caller_kind"] for s in denied] == ["worker"]


@pytest.mark.asyncio
async def test_only_the_scheduler_may_take_jobs_and_a_caller_without_a_certificate_may_call_nothing(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    next_jobs = queueing_pb2.NextJobsRequest()
    async with mesh.channel(mesh.service("scheduler")) as ch:
        assert await queueing_pb2_grpc.QueueingServiceStub(ch).NextJobs(next_jobs) == queueing_pb2.NextJobsResponse()
    async with mesh.channel(mesh.service("gateway")) as ch:
        err = await refused(queueing_pb2_grpc.QueueingServiceStub(ch).NextJobs(next_jobs))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    async with mesh.channel(None) as ch:
        err = await refused(poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch).Connect(connect_request("w-1")).read())
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # Health checks need a mesh identity too; any one will do.
        err = await refused(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    async with mesh.channel(mesh.worker("w-1")) as ch:
        answer = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("denied:")]
    assert (
        "denied: caller=spiffe://jobmesh/service/gateway method=/jobmesh.queueing.v1.QueueingService/NextJobs" in lines
    )
    assert "denied: caller=none method=/jobmesh.poolmanager.v1.WorkerRegistryService/Connect" in lines


# --------------------------------------------------------------------------------- workers bound to identity


@pytest.mark.asyncio
async def test_a_worker_cannot_register_as_another_worker_or_in_another_pool(
    mesh: Mesh, etcd: Etcd, caplog: pytest.LogCaptureFixture
) -> None:
    async with mesh.channel(mesh.worker("w-evil")) as ch:
        stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
        as_victim = await refused(stub.Connect(connect_request("w-victim")).read())
        other_pool = await refused(stub.Connect(connect_request("w-evil", pool="dynamic-large")).read())
        attach = stub.Attach()
        await attach.write(pm.AttachRequest(connect=connect_request("w-victim")))
        on_attach = await refused(attach.read())

    for err in (as_victim, other_pool, on_attach):
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err) == "WORKER_IDENTITY_MISMATCH"
    assert await etcd.get(KEYS.worker("w-victim")) is None  # nothing written
    assert await etcd.get(KEYS.worker("w-evil")) is None
    assert any(
        "caller=spiffe://jobmesh/worker/static-general/w-evil method=Connect worker_id=w-victim" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.asyncio
async def test_declared_capacity_and_labels_are_clamped_to_the_pool(mesh: Mesh, etcd: Etcd) -> None:
    greedy = connect_request(
        "w-greedy", capacity=t.Resources(cpu_millis=64_000, memory_mb=1_000_000), labels={"gpu": "a100"}
    )
    async with mesh.channel(mesh.worker("w-greedy")) as ch:
        session = await register(mesh, ch, greedy)
        session.call.cancel()

    kv = await etcd.get(KEYS.worker("w-greedy"))
    assert kv is not None
    stored = t.Worker()
    stored.ParseFromString(kv.value)
    assert (stored.capacity.cpu_millis, stored.capacity.memory_mb) == (1000, 1024)
    assert dict(stored.labels) == {"arch": "x86_64", "class": "general"}


@pytest.mark.asyncio
async def test_a_worker_cannot_heartbeat_as_another_or_keep_another_workers_lease_alive(mesh: Mesh, etcd: Etcd) -> None:
    async with mesh.channel(mesh.worker("w-victim")) as victim_ch, mesh.channel(mesh.worker("w-evil")) as evil_ch:
        victim = await register(mesh, victim_ch, connect_request("w-victim"))
        evil = poolmanager_pb2_grpc.WorkerRegistryServiceStub(evil_ch)
        err = await refused(evil.Heartbeat(pm.HeartbeatRequest(worker_id="w-victim", lease_id=victim.worker.lease_id)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # Under its own name, with the victim's lease: not refreshed, and told it is not alive.
        stolen = pm.HeartbeatRequest(worker_id="w-evil", lease_id=victim.worker.lease_id)
        # Registering with the victim's lease gets a lease of its own, not the victim's.
        own = await register(mesh, evil_ch, connect_request("w-evil", lease_id=victim.worker.lease_id))
        assert own.worker.lease_id != victim.worker.lease_id
        victim.call.cancel()  # the victim stops heartbeating: its lease must run out whatever the attacker sends
        deadline = time.monotonic() + LEASE_TTL + 4
        while time.monotonic() < deadline and await etcd.get(KEYS.worker("w-victim")) is not None:
            assert (await evil.Heartbeat(stolen)).alive is False
            await asyncio.sleep(0.3)
        own.call.cancel()

    assert await etcd.get(KEYS.worker("w-victim")) is None, "the victim's lease was kept alive by another worker"
    assert (
        mesh.sample("jobmesh_poolmanager_worker_refusals_total", {"method": "Heartbeat", "reason": "LEASE_NOT_OWNED"})
        >= 1
    )


@pytest.mark.asyncio
async def test_a_worker_cannot_report_for_another_or_for_an_attempt_it_does_not_hold(mesh: Mesh, etcd: Etcd) -> None:
    victims_job = await running_job(etcd, "w-victim")
    async with mesh.channel(mesh.worker("w-evil")) as ch:
        stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
        err = await refused(stub.ReportResult(result_for(victims_job, "w-victim")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(err) == "WORKER_IDENTITY_MISMATCH"
        # Under its own name: it holds no such attempt, so the result is stale.
        assert (await stub.ReportResult(result_for(victims_job, "w-evil"))).accepted is False
        # Nor on a session stream of its own.
        attach = stub.Attach()
        await attach.write(pm.AttachRequest(connect=connect_request("w-evil")))
        assert (await asyncio.wait_for(attach.read(), 10)).event.HasField("registered")
        await attach.write(pm.AttachRequest(result=result_for(victims_job, "w-evil")))
        ack = await asyncio.wait_for(attach.read(), 10)
        assert ack.HasField("result_ack") and ack.result_ack.accepted is False
        attach.cancel()

    assert await job_state(etcd, victims_job) == t.JOB_STATE_RUNNING


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "numbers",
    [
        {"cpu_seconds": math.nan},
        {"cpu_seconds": math.inf},
        {"cpu_seconds": 1e9},
        {"cpu_seconds": -1.0},
        {"run_seconds": math.nan},
        {"run_seconds": 1e9, "cpu_seconds": 1e9},
        {"max_memory_mb": 10_000_000},
        {"max_memory_mb": -5},
    ],
    ids=["nan-cpu", "inf-cpu", "huge-cpu", "negative-cpu", "nan-run", "huge-run", "huge-memory", "negative-memory"],
)
async def test_a_result_whose_numbers_cannot_be_true_is_refused_and_counted(
    mesh: Mesh, etcd: Etcd, numbers: dict[str, float]
) -> None:
    job = await running_job(etcd, "w-1")
    async with mesh.channel(mesh.worker("w-1")) as ch:
        stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
        err = await refused(stub.ReportResult(result_for(job, "w-1", **numbers)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err) == "RESULT_OUT_OF_RANGE"
        assert await job_state(etcd, job) == t.JOB_STATE_RUNNING  # nothing written
        # The same attempt's true result is still taken.
        assert (await stub.ReportResult(result_for(job, "w-1"))).accepted is True

    assert await job_state(etcd, job) == t.JOB_STATE_SUCCEEDED
    counted = {"method": "ReportResult", "reason": "RESULT_OUT_OF_RANGE"}
    assert mesh.sample("jobmesh_poolmanager_worker_refusals_total", counted) == 1


@pytest.mark.asyncio
async def test_the_cost_ledger_keeps_recording_when_a_stored_result_is_not_finite(etcd: Etcd) -> None:
    # Defence in depth: a NaN or infinite usage already in etcd (written before results were checked) neither
    # stops the ledger nor charges the tenant for it; the jobs after it are charged as usual.
    config = load_config(FIXTURE_CONFIG)
    metrics = CollectorRegistry()
    ledger = CostLedger(etcd, KEYS, config, SystemClock(), CostMetrics(metrics))
    now = time.time()
    jobs = {
        "job-nan": JobBuilder("job-nan").ended(now - 10, now - 8, cpu_seconds=math.nan).build(),
        "job-inf": JobBuilder("job-inf").ended(now - 10, now - 8, cpu_seconds=math.inf).build(),
        "job-ok": JobBuilder("job-ok").ended(now - 10, now - 8, cpu_seconds=1.0).build(),
    }
    for job_id, job in jobs.items():
        ledger.observe(KEYS.job("acme", job_id), job)

    assert await ledger.flush() == 0

    kvs, _, _ = await etcd.get_prefix(KEYS.cost_records)
    records = {r.job_id: r for r in (CostRecord.from_json(kv.value) for kv in kvs)}
    assert set(records) == set(jobs)
    assert records["job-nan"].cost_micros == records["job-inf"].cost_micros > 0
    assert records["job-nan"].used_cpu_seconds == 0.0
