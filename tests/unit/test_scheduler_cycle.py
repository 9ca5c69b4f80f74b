"""The scheduling cycle's pure parts and its fence (services/scheduler/): nomination in queue order, the settle
phase that makes a fruitless cycle wait, and a cycle's leadership token refusing writes in a later term."""

from __future__ import annotations

import asyncio

import pytest

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.errors import NotLeader
from libs.etcd.election import LeaderElection, Leadership
from services.scheduler.placement import Candidate, nominate
from services.scheduler.queue_client import QueueClient


def worker(worker_id: str, cpu: int = 1000) -> Candidate:
    w = t.Worker(worker_id=worker_id, pool_id="static-general")
    w.capacity.cpu_millis, w.capacity.memory_mb = cpu, 1024
    return Candidate(w, 1)


def head(job_id: str, cpu: int) -> q.QueuedJob:
    job = t.Job(job_id=job_id, tenant_id="acme")
    job.spec.resources.cpu_millis, job.spec.resources.memory_mb = cpu, 64
    return q.QueuedJob(job=job, mod_revision=1)


def test_nomination_goes_in_queue_order_and_later_heads_see_what_earlier_ones_took() -> None:
    idle = [worker("w-big", 2000), worker("w-small", 500)]

    plan = nominate([head("j-1", 400), head("j-2", 1500), head("j-3", 100)], idle)

    assert [(queued.job.job_id, cand.worker.worker_id) for queued, cand in plan] == [
        ("j-1", "w-small"),  # the tightest fit
        ("j-2", "w-big"),
    ]
    assert idle == []  # both one-slot workers are taken: j-3 waits


def test_a_head_still_backing_off_is_passed_over_and_the_next_head_takes_the_worker() -> None:
    backing_off = head("j-retry", 100)
    backing_off.job.next_attempt_time.FromSeconds(1_000)
    idle = [worker("w-1")]

    plan = nominate([backing_off, head("j-2", 100)], idle, now=999.5)

    assert [queued.job.job_id for queued, _ in plan] == ["j-2"]
    assert [q.job.job_id for q, _ in nominate([backing_off], [worker("w-1")], now=1_000.0)] == ["j-retry"]


class FakeQueue:
    def __init__(self, heads: int = 1) -> None:
        self.requests: list[q.NextJobsRequest] = []
        self.heads = heads

    async def NextJobs(self, request: q.NextJobsRequest, timeout: float) -> q.NextJobsResponse:
        self.requests.append(request)
        return q.NextJobsResponse(jobs=[head(f"j-{i}", 100) for i in range(self.heads)], version=7)


@pytest.mark.asyncio
async def test_after_a_fruitless_cycle_the_next_asks_only_for_a_newer_queue_unless_capacity_moved() -> None:
    stub = FakeQueue(heads=1)  # a head no worker suits
    client = QueueClient(stub)
    changed = asyncio.Event()

    await client.heads(2, epoch=1, capacity_changed=changed)
    client.settle(placed=0, epoch=1)
    await client.heads(2, epoch=1, capacity_changed=changed)
    await client.heads(2, epoch=2, capacity_changed=changed)  # a worker changed meanwhile: the head may fit now

    assert [r.after_version for r in stub.requests] == [-1, 7, -1]
    assert stub.requests[0].limit == 2 * 2 + 4


@pytest.mark.asyncio
async def test_once_the_whole_queue_was_placed_or_empty_even_new_capacity_waits_for_a_newer_queue() -> None:
    changed = asyncio.Event()
    for given, placed in ((2, 2), (0, 0)):  # every head placed, from an answer that held the whole queue; empty
        stub = FakeQueue(heads=given)
        client = QueueClient(stub)
        await client.heads(2, epoch=1, capacity_changed=changed)
        client.settle(placed=placed, epoch=1)
        await client.heads(2, epoch=2, capacity_changed=changed)
        assert [r.after_version for r in stub.requests] == [-1, 7], (given, placed)


@pytest.mark.asyncio
async def test_a_truncated_or_partly_placed_answer_is_followed_by_an_ask_that_does_not_wait() -> None:
    changed = asyncio.Event()
    for given, placed in ((8, 8), (2, 1)):  # as many heads as asked for (more may be behind); one left unplaced
        stub = FakeQueue(heads=given)
        client = QueueClient(stub)
        await client.heads(2, epoch=1, capacity_changed=changed)
        client.settle(placed=placed, epoch=1)
        await client.heads(2, epoch=1, capacity_changed=changed)
        assert [r.after_version for r in stub.requests] == [-1, -1], (given, placed)


@pytest.mark.asyncio
async def test_a_cycles_token_refuses_a_write_once_leadership_changed() -> None:
    election = LeaderElection(etcd=None, key="/jobmesh/leader/scheduler", identity="a")  # type: ignore[arg-type]
    election.leadership = Leadership("/jobmesh/leader/scheduler", 10, 1)
    token = election.token()
    election.leadership = Leadership("/jobmesh/leader/scheduler", 12, 2)  # lost it and won it again

    with pytest.raises(NotLeader):
        await election.fenced_txn([], [], token=token)


def test_a_replica_that_does_not_lead_has_no_token() -> None:
    election = LeaderElection(etcd=None, key="/jobmesh/leader/scheduler", identity="a")  # type: ignore[arg-type]
    with pytest.raises(NotLeader):
        election.token()
