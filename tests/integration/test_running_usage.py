"""Running jobs' usage from a worker's heartbeat to the cost of the running attempt, on a real etcd and the
pool-manager's registry over mTLS: samples of the worker's own attempts are stored under its lease (with the
assignment's tenant), at most once per interval, and gone with its lease; a sample of another worker's attempt or
with impossible numbers is not stored; and the cost service's informer prices the running attempt at
max(requested, used) from what was stored, and at its request again once the worker is gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.clock import FakeClock
from libs.config import load_config
from libs.etcd.client import Etcd, KeyValue
from libs.etcd.informer import Informer
from libs.lifecycle.codec import decode_worker_usage
from libs.pki import CertificateAuthority
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.usage import RunningUsage
from tests.helpers import FIXTURE_CONFIG
from tests.integration.mtls_mesh import KEYS, LEASE_TTL, Mesh, connect_request, register, running_job, serve_mesh

pytestmark = pytest.mark.asyncio


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def stored_usage(etcd: Etcd, worker_id: str) -> KeyValue | None:
    return await etcd.get(KEYS.worker_usage(worker_id))


def beat(worker: t.Worker, *samples: pm.RunningUsage) -> pm.HeartbeatRequest:
    return pm.HeartbeatRequest(worker_id=worker.worker_id, lease_id=worker.lease_id, usage=samples)


def usage_of(job: t.Job, cpu_seconds: float, max_memory_mb: int = 40) -> pm.RunningUsage:
    return pm.RunningUsage(
        job_id=job.job_id, attempt=job.attempt, cpu_seconds=cpu_seconds, max_memory_mb=max_memory_mb, tenant_id="acme"
    )


async def test_a_workers_samples_of_its_own_attempts_are_stored_under_its_lease_once_per_interval(
    mesh: Mesh, etcd: Etcd
) -> None:
    victims = await running_job(etcd, "w-victim", started=time.time() - 20)
    async with mesh.channel(mesh.worker("w-1")) as ch:
        session = await register(mesh, ch, connect_request("w-1"))
        own = await running_job(etcd, "w-1", started=time.time() - 20)  # older than the interval (15 s)
        stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
        heartbeat = beat(session.worker, usage_of(own, 2.0), usage_of(victims, 2.0))

        async def beaten() -> bool:  # until the registry has seen the assignment
            assert (await stub.Heartbeat(heartbeat)).alive
            return await _exists(etcd, "w-1")

        await eventually(beaten, "the worker's usage")
        for _ in range(3):  # within the interval (15 s): nothing more is written
            assert (await stub.Heartbeat(heartbeat)).alive
        await asyncio.sleep(0.3)
        kv = await stored_usage(etcd, "w-1")
        session.call.cancel()

    assert kv is not None and kv.version == 1
    assert kv.lease == session.worker.lease_id
    (sample,) = decode_worker_usage(kv.value).attempts  # not the victim's job
    assert (sample.job_id, sample.attempt, sample.cpu_seconds) == (own.job_id, own.attempt, 2.0)
    assert sample.tenant_id == "globex"  # the assignment's tenant, not what the worker wrote
    assert await stored_usage(etcd, "w-victim") is None
    assert mesh.sample("jobmesh_poolmanager_usage_writes_total", {"outcome": "written"}) == 1
    # The worker stops heartbeating: its samples go with its lease.
    await eventually(lambda: _gone(etcd, "w-1"), "the lease to run out", timeout=LEASE_TTL + 8)


async def test_a_sample_with_impossible_numbers_is_refused_and_counted_and_the_heartbeat_still_answers(
    mesh: Mesh, etcd: Etcd
) -> None:
    refused = {"method": "Heartbeat", "reason": "RESULT_OUT_OF_RANGE"}
    async with mesh.channel(mesh.worker("w-1")) as ch:
        session = await register(mesh, ch, connect_request("w-1"))
        job = await running_job(etcd, "w-1", started=time.time() - 20)
        stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)

        async def refused_once() -> bool:
            # 20 s on a 1-core worker cannot have used 1,000 CPU-seconds.
            assert (await stub.Heartbeat(beat(session.worker, usage_of(job, 1000.0)))).alive
            return mesh.sample("jobmesh_poolmanager_worker_refusals_total", refused) >= 1

        await eventually(refused_once, "the refusal")
        session.call.cancel()

    assert await stored_usage(etcd, "w-1") is None


async def test_the_cost_service_prices_a_running_attempt_at_its_stored_sample_until_the_worker_is_gone(
    etcd: Etcd, ca: CertificateAuthority
) -> None:
    config = load_config(FIXTURE_CONFIG)
    ledger = CostLedger(
        etcd, KEYS, config, FakeClock(time.time()), CostMetrics(CollectorRegistry()), usage=RunningUsage()
    )
    informer = Informer(etcd, KEYS.usage, ledger.usage.on_usage_event, "running-usage")
    informer.start()
    await informer.wait_synced()

    def running_cost() -> int:
        (record,) = ledger.accruing()  # at the ledger's clock: stopped, so the two prices compare like for like
        return record.cost_micros

    try:
        async with serve_mesh(etcd, ca, usage_interval=0.5) as mesh, mesh.channel(mesh.worker("w-1")) as ch:
            session = await register(mesh, ch, connect_request("w-1"))
            job = await running_job(etcd, "w-1", started=time.time() - 10)
            ledger.observe(KEYS.job(job.tenant_id, job.job_id), job)
            at_request = running_cost()
            assert job.spec.resources.cpu_millis == 100
            stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)

            async def priced_at_use() -> bool:
                # A tenth of a core requested, a whole one used: 10 s of it by now.
                assert (await stub.Heartbeat(beat(session.worker, usage_of(job, 10.0)))).alive
                return running_cost() > at_request

            await eventually(priced_at_use, "the sample to reach the ledger")
            session.call.cancel()  # the worker is gone: its lease, and its samples with it
            await eventually(lambda: _gone(etcd, "w-1"), "the lease to run out", timeout=LEASE_TTL + 8)
            await eventually(lambda: _true(running_cost() == at_request), "the ledger to forget the sample")
    finally:
        await informer.stop()


async def _exists(etcd: Etcd, worker_id: str) -> bool:
    return await stored_usage(etcd, worker_id) is not None


async def _gone(etcd: Etcd, worker_id: str) -> bool:
    return await stored_usage(etcd, worker_id) is None


async def _true(value: bool) -> bool:
    return value
