"""The queueing service as a real process over a real etcd: fair order, positions, deadlines, weights, batching,
and the same queue after a SIGKILL. The tests play the gateway (Enqueue) and the scheduler (NextJobs, then a
PENDING -> RUNNING transaction in etcd) themselves."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from devtools.launcher import Ports, Stack
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.etcd.client import cmp_mod, op_put
from libs.jobs import new_job_id, ts
from libs.keys import Keys
from libs.lifecycle.codec import decode_job
from libs.lifecycle.transitions import apply_dispatch
from tests.helpers import FIXTURE_CONFIG, stand_in_quota_term

KEYS = Keys("/jobmesh")
# One replica of the active/standby pair: it leads (after a restart, once the killed one's lease is over).
QUEUEING = "queueing-1"


def restart_queueing(stack: Stack) -> None:
    stack.restart(QUEUEING)
    stack.wait_leader("queueing", 30)


def start_queueing(data_dir: Path, env: dict[str, str] | None = None, config: Path = FIXTURE_CONFIG) -> Stack:
    env = {"JOBMESH_LEADER_TTL": "3", **(env or {})}
    stack = Stack(data_dir=data_dir, config_path=config, ports=Ports.free(), env=env)
    try:
        stack.start_etcd()
        stack.wait_etcd(30)
        stack.start_named(QUEUEING)
        stack.wait_healthy(QUEUEING, 30)
        stack.wait_leader("queueing", 30)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture()
def queueing(tmp_path: Path) -> Iterator[Stack]:
    """etcd and the queueing service, nothing else: the tests play gateway and scheduler themselves."""
    stack = start_queueing(tmp_path / "stack")
    try:
        yield stack
    finally:
        stack.stop()


def pending_job(tenant: str, *, priority: int = 0, tier: str = "", deadline_in: float | None = None) -> t.Job:
    now = time.time()
    job = t.Job(
        job_id=new_job_id(now),
        tenant_id=tenant,
        state=t.JOB_STATE_PENDING,
        create_time=ts(now),
        update_time=ts(now),
        waiting_reason="QUEUED",
        queue="default",
        spec=t.JobSpec(
            name="job",
            command=["true"],
            resources=t.Resources(cpu_millis=100, memory_mb=64),
            priority=priority,
            sla_tier=tier,
        ),
    )
    if deadline_in is not None:
        job.spec.deadline.CopyFrom(ts(now + deadline_in))
    return job


class Client:
    """The queueing service's RPCs as the gateway (`stub`) and the scheduler (`scheduler`) call them, each with
    its own identity (the authorization table lets only the scheduler take jobs), plus direct etcd access."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.etcd = stack.etcd_client()
        self._connect()

    def _connect(self) -> None:
        self.channels = [self.stack.aio_channel(self.stack.ports.queueing[0], who) for who in ("gateway", "scheduler")]
        self.stub = queueing_pb2_grpc.QueueingServiceStub(self.channels[0])
        self.scheduler = queueing_pb2_grpc.QueueingServiceStub(self.channels[1])

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        await self.etcd.close()

    async def reconnect(self) -> None:
        for ch in self.channels:
            await ch.close()
        self._connect()

    async def enqueue(self, job: t.Job) -> t.Job:
        fence = await stand_in_quota_term(self.etcd)
        resp = await self.stub.Enqueue(q.EnqueueRequest(job=job, quota_fence=fence), timeout=10)
        assert resp.created
        return resp.job

    async def submit(self, tenant: str, count: int, **fields: object) -> list[str]:
        ids = []
        for _ in range(count):
            ids.append((await self.enqueue(pending_job(tenant, **fields))).job_id)  # type: ignore[arg-type]
        return ids

    async def heads(self, limit: int = 1000) -> list[q.QueuedJob]:
        return list((await self.scheduler.NextJobs(q.NextJobsRequest(limit=limit), timeout=10)).jobs)

    async def order(self) -> list[str]:
        return [h.job.job_id for h in await self.heads()]

    async def get(self, job_id: str) -> t.Job:
        return (await self.stub.GetJob(q.GetJobRequest(job_id=job_id), timeout=10)).job

    async def record(self, tenant: str, job_id: str) -> tuple[t.Job, int]:
        kv = await self.etcd.get(KEYS.job(tenant, job_id))
        assert kv is not None
        return decode_job(kv.value), kv.mod_revision

    async def dispatch(self, queued: q.QueuedJob) -> int:
        """PENDING -> RUNNING with a compare on the revision NextJobs gave, as the scheduler does."""
        job = t.Job()
        job.CopyFrom(queued.job)
        apply_dispatch(job, t.Worker(worker_id="w-test", pool_id="static-general"), time.time())
        key = KEYS.job(job.tenant_id, job.job_id)
        result = await self.etcd.txn([cmp_mod(key, queued.mod_revision)], [op_put(key, job.SerializeToString())])
        assert result.succeeded
        return result.revision

    async def wait_gone(self, job_ids: set[str], timeout: float = 10.0) -> None:
        """Until the service has seen the jobs leave (its informer lags the write a little)."""
        end = time.monotonic() + timeout
        while job_ids & set(await self.order()):
            assert time.monotonic() < end, "the queue kept jobs that left"
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture()
async def client(queueing: Stack) -> AsyncIterator[Client]:
    c = Client(queueing)
    try:
        yield c
    finally:
        await c.close()


def metric(stack: Stack, name: str) -> float:
    """One sample (summed over labels) from the queueing process's /metrics."""
    port = stack.procs[QUEUEING].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# Order and what GetJob shows -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_next_jobs_hands_out_tenants_weighted_1_2_3_in_fair_order(client: Client) -> None:
    for tenant in ("acme", "globex", "initech"):
        await client.submit(tenant, 12)

    heads = [h.job.tenant_id for h in await client.heads(12)]

    assert {tenant: heads.count(tenant) for tenant in set(heads)} == {"acme": 2, "globex": 4, "initech": 6}


@pytest.mark.asyncio
async def test_get_job_shows_the_queue_position_and_reason_and_a_dispatch_moves_everyone_up(client: Client) -> None:
    acme = await client.submit("acme", 3)
    await client.submit("initech", 3)
    last = await client.get(acme[2])
    assert (last.queue, last.queue_position, last.waiting_reason) == ("default", 6, "BEHIND_FAIR_SHARE")

    heads = await client.heads(1)
    offered = await client.get(heads[0].job.job_id)
    await client.dispatch(heads[0])
    await client.wait_gone({heads[0].job.job_id})

    assert offered.waiting_reason == "WAITING_FOR_WORKER"
    assert (await client.get(acme[2])).queue_position == 5
    running = await client.get(heads[0].job.job_id)
    assert (running.state, running.queue_position) == (t.JOB_STATE_RUNNING, 0)


@pytest.mark.asyncio
async def test_a_deadline_that_passes_while_the_job_waits_is_written_into_its_record(client: Client) -> None:
    [job_id] = await client.submit("acme", 1, deadline_in=1.0)

    end = time.monotonic() + 10
    while not (record := (await client.record("acme", job_id))[0]).sla_miss:
        assert time.monotonic() < end, "the missed deadline was never recorded"
        await asyncio.sleep(0.1)

    assert (record.state, record.waiting_reason) == (t.JOB_STATE_PENDING, "DEADLINE_MISSED")
    shown = await client.get(job_id)
    assert (shown.sla_miss, shown.waiting_reason, shown.queue_position) == (True, "DEADLINE_MISSED", 1)


@pytest.mark.asyncio
async def test_concurrent_enqueues_share_transactions_and_every_job_is_durable(client: Client, queueing: Stack) -> None:
    jobs = [pending_job(("acme", "globex", "initech")[i % 3]) for i in range(300)]

    stored = await asyncio.gather(*(client.enqueue(job) for job in jobs))

    for job in stored:
        record, _ = await client.record(job.tenant_id, job.job_id)
        assert record.state == t.JOB_STATE_PENDING
    assert len(await client.order()) == 300
    transactions = metric(queueing, "jobmesh_queueing_enqueue_batch_jobs_count")
    assert metric(queueing, "jobmesh_queueing_enqueue_batch_jobs_sum") == 300
    assert transactions < 300  # fewer etcd transactions than jobs: batched


# Weights ---------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_set_tenant_weight_is_stored_in_etcd_and_changes_the_order(client: Client) -> None:
    acme = await client.submit("acme", 4)
    await client.submit("initech", 4)

    resp = await client.stub.SetTenantWeight(q.SetTenantWeightRequest(tenant_id="acme", weight=9.0), timeout=5)

    assert (resp.tenant_id, resp.weight) == ("acme", 9.0)
    stored = await client.etcd.get(f"{KEYS.p}/queueing/weights/acme")
    assert stored is not None and float(stored.value.decode()) == 9.0
    # acme finishes at 1/9, 2/9, 3/9 (tying initech's first 1/3, submitted later); at weight 1 initech led.
    assert (await client.order())[:3] == acme[:3]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("tenant", "weight", "code"),
    [
        pytest.param("nobody", 2.0, grpc.StatusCode.NOT_FOUND, id="unknown-tenant"),
        pytest.param("acme", 0.0, grpc.StatusCode.INVALID_ARGUMENT, id="zero"),
        pytest.param("acme", 1001.0, grpc.StatusCode.INVALID_ARGUMENT, id="above-1000"),
    ],
)
async def test_set_tenant_weight_refuses_unknown_tenants_and_weights_outside_0_to_1000(
    client: Client, tenant: str, weight: float, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.stub.SetTenantWeight(q.SetTenantWeightRequest(tenant_id=tenant, weight=weight), timeout=5)

    assert raised.value.code() == code
    assert await client.etcd.get(f"{KEYS.p}/queueing/weights/{tenant}") is None


# Durability: the same queue after a crash ---------------------------------------------------------------------------


async def wait_for_final_tags(client: Client, revision: int, timeout: float = 10.0) -> None:
    """Until a tag snapshot written after `revision` has stayed the latest for three of the service's snapshot
    intervals (0.5 s, written when the tags changed): then it holds every change the queue made. (Waiting for one
    written after the store's revision at some later moment instead never ends when the final snapshot landed
    just before that moment.)"""
    end = time.monotonic() + timeout
    seen, since = 0, time.monotonic()
    while True:
        kv = await client.etcd.get(f"{KEYS.p}/queueing/tags/default")
        written = kv.mod_revision if kv is not None else 0
        if written != seen:
            seen, since = written, time.monotonic()
        if seen > revision and time.monotonic() - since >= 1.5:
            return
        assert time.monotonic() < end, "the fair-queue tags were never saved"
        await asyncio.sleep(0.1)


async def restart(client: Client, queueing: Stack, sig: int) -> None:
    queueing.kill(QUEUEING, sig)
    if sig != signal.SIGKILL:
        queueing.procs[QUEUEING].popen.wait(15)  # type: ignore[union-attr]
    restart_queueing(queueing)
    await client.reconnect()


@pytest.mark.asyncio
async def test_after_a_sigkill_the_rebuilt_queue_has_the_same_jobs_in_the_same_order(
    client: Client, queueing: Stack
) -> None:
    for tenant, priority in (("acme", 0), ("globex", 0), ("initech", 0), ("acme", 5), ("globex", -1)):
        await client.submit(tenant, 15, priority=priority)
    taken = (await client.heads(20))[:20]
    for queued in taken:
        last = await client.dispatch(queued)
    await client.wait_gone({queued.job.job_id for queued in taken})
    await wait_for_final_tags(client, last)
    before = await client.order()
    positions = {job_id: (await client.get(job_id)).queue_position for job_id in before[::7]}

    await restart(client, queueing, signal.SIGKILL)

    after = await client.order()
    assert after == before
    assert len(after) == len(set(after)) == 75 - 20
    assert {job_id: (await client.get(job_id)).queue_position for job_id in before[::7]} == positions


@pytest.mark.asyncio
async def test_jobs_that_left_while_the_service_was_down_are_not_queued_again_and_none_is_lost(
    client: Client, queueing: Stack
) -> None:
    ids = set()
    for tenant in ("acme", "globex"):
        ids |= set(await client.submit(tenant, 10))
    taken = (await client.heads(4))[:4]
    queueing.kill(QUEUEING, signal.SIGKILL)
    for queued in taken:  # a scheduler with these heads in hand keeps dispatching while queueing is down
        await client.dispatch(queued)

    restart_queueing(queueing)
    await client.reconnect()

    after = await client.order()
    assert set(after) == ids - {queued.job.job_id for queued in taken}
    assert len(after) == len(set(after))


@pytest.mark.asyncio
async def test_a_weight_set_before_a_graceful_restart_still_holds_after_it(client: Client, queueing: Stack) -> None:
    await client.submit("acme", 6)
    await client.submit("initech", 6)
    await client.stub.SetTenantWeight(q.SetTenantWeightRequest(tenant_id="acme", weight=6.0), timeout=5)
    before = await client.order()

    await restart(client, queueing, signal.SIGTERM)

    assert await client.order() == before
    assert [h.job.tenant_id for h in await client.heads(3)] == ["acme", "acme", "initech"]


@pytest.mark.asyncio
async def test_a_tenant_at_its_stored_jobs_cap_gets_too_many_jobs_until_records_are_deleted(tmp_path: Path) -> None:
    config = tmp_path / "capped.toml"
    config.write_text(FIXTURE_CONFIG.read_text() + "\n[limits]\nmax_jobs_per_tenant = 5\n")
    stack = start_queueing(tmp_path / "stack-capped", config=config)
    try:
        client = Client(stack)
        try:
            acme = await client.submit("acme", 5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.enqueue(pending_job("acme"))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "TOO_MANY_JOBS" in str(refused.value.trailing_metadata())
            await client.submit("globex", 1)  # the others are not held back

            # A record deleted (as retention deletes finished ones) frees a place, seen through the informer.
            await client.etcd.delete(KEYS.job("acme", acme[0]))
            for _ in range(100):
                try:
                    await client.enqueue(pending_job("acme"))
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the deleted record's place never came back")

            # After a restart the count is rebuilt from the store: still at the cap.
            stack.kill(QUEUEING)
            restart_queueing(stack)
            await client.reconnect()
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await client.enqueue(pending_job("acme"))
            assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await client.close()
    finally:
        stack.stop()
