"""Attacks on the mesh's internal API, against real grpc.aio servers over mTLS (certificates from libs/pki.py) and a
real etcd: callers the authorization table does not name are refused before anything runs, and a worker can speak
only for itself (its id, its pool, its lease, the attempts it holds, results that could be true)."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2, cost_pb2_grpc
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2, queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from libs.clock import SystemClock
from libs.config import load_config
from libs.etcd.client import Etcd
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.records import CostRecord
from tests.helpers import FIXTURE_CONFIG
from tests.integration.mtls_mesh import (
    KEYS,
    LEASE_TTL,
    Mesh,
    connect_request,
    job_state,
    reason_of,
    refused,
    register,
    result_for,
    running_job,
)
from tests.unit.cost_builders import JobBuilder

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
