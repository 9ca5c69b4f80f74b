"""Finished-job retention over a real etcd and the real queueing service: a finished job's record, id index and
idempotency key go once its retention has passed; unfinished jobs, and a job that changed, stay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from devtools.launcher import Ports, Stack
from jobmesh.common.v1 import types_pb2 as t
from libs.etcd.client import Etcd, op_put
from libs.jobs import new_job_id, ts
from libs.keys import Keys
from tests.helpers import FIXTURE_CONFIG

KEYS = Keys("/jobmesh")


@pytest.fixture()
def queueing(tmp_path: Path) -> Iterator[Stack]:
    config = tmp_path / "mesh.toml"
    config.write_text(FIXTURE_CONFIG.read_text() + "\n[retention]\nfinished_job_seconds = 2\n")
    env = {"JOBMESH_QUEUEING_RETENTION_SWEEP_SECONDS": "0.2"}
    stack = Stack(data_dir=tmp_path / "stack", config_path=config, ports=Ports.free(), env=env)
    try:
        stack.start_etcd()
        stack.wait_etcd(30)
        stack.start_named("queueing-1")
        stack.wait_healthy("queueing-1", 30)
        stack.wait_leader("queueing", 30)
        yield stack
    finally:
        stack.stop()


@pytest_asyncio.fixture()
async def etcd(queueing: Stack) -> AsyncIterator[Etcd]:
    client = queueing.etcd_client()
    try:
        yield client
    finally:
        await client.close()


async def store(etcd: Etcd, state: int, ended: float | None, idem: str = "") -> t.Job:
    now = time.time()
    job = t.Job(job_id=new_job_id(now), tenant_id="acme", state=state, create_time=ts(now))
    job.spec.name = "j"
    job.spec.idempotency_key = idem
    if ended is not None:
        job.end_time.CopyFrom(ts(ended))
    ops = [
        op_put(KEYS.job("acme", job.job_id), job.SerializeToString()),
        op_put(KEYS.job_index(job.job_id), b"acme"),
    ]
    if idem:
        ops.append(op_put(KEYS.idempotency("acme", idem), job.job_id.encode()))
    await etcd.txn([], ops)
    return job


@pytest.mark.asyncio
async def test_a_finished_job_is_deleted_after_its_retention_with_its_keys(etcd: Etcd) -> None:
    now = time.time()
    old = await store(etcd, t.JOB_STATE_SUCCEEDED, now - 10, idem="nightly-1")
    fresh = await store(etcd, t.JOB_STATE_FAILED, now)
    running = await store(etcd, t.JOB_STATE_RUNNING, None)
    keys = [
        KEYS.job("acme", old.job_id),
        KEYS.job_index(old.job_id),
        KEYS.idempotency("acme", "nightly-1"),
        KEYS.job("acme", fresh.job_id),
        KEYS.job("acme", running.job_id),
    ]

    deadline = time.monotonic() + 10
    while (await etcd.get_many(keys[:3]))[0] != [None, None, None]:
        assert time.monotonic() < deadline, "the expired job was not deleted"
        await asyncio.sleep(0.1)
    kvs, _ = await etcd.get_many(keys[3:])
    assert all(kv is not None for kv in kvs)  # the fresh one has 2 s to go; the running one never expires

    while (await etcd.get_many([keys[3]]))[0] != [None]:
        assert time.monotonic() < deadline + 5, "the second finished job was not deleted"
        await asyncio.sleep(0.1)
    assert (await etcd.get_many([keys[4]]))[0][0] is not None


@pytest.mark.asyncio
async def test_a_job_that_changed_after_it_was_seen_finished_is_kept(etcd: Etcd) -> None:
    job = await store(etcd, t.JOB_STATE_SUCCEEDED, time.time() - 1.5)
    await asyncio.sleep(0.3)  # the service has seen it finished
    job.state = t.JOB_STATE_PENDING  # e.g. an operator re-queued it by hand
    job.ClearField("end_time")
    await etcd.put(KEYS.job("acme", job.job_id), job.SerializeToString())

    await asyncio.sleep(1.5)

    assert (await etcd.get_many([KEYS.job("acme", job.job_id)]))[0][0] is not None
