"""The queueing service as two real replicas over a real etcd: the leader alone serves, the standby's queue is warm
and takes over with the same order, and a leader paused past its lease (SIGSTOP) cannot write after SIGCONT."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from devtools.launcher import Stack
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.jobs import new_job_id
from libs.keys import Keys
from tests.helpers import resume_and_stop, stand_in_quota_term, start_replicas, wait_for
from tests.integration.test_quota_failover import outcomes_of, reason_of

KEYS = Keys("/jobmesh")
REPLICAS = ("queueing-1", "queueing-2")
QUEUEING = "jobmesh.queueing.v1.QueueingService"


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[Stack]:
    """etcd and two queueing replicas (a 2 s lease): the test plays the gateway, quota and the scheduler."""
    stack = start_replicas(tmp_path / "stack", REPLICAS, ("queueing",))
    try:
        yield stack
    finally:
        resume_and_stop(stack)


def roles(stack: Stack) -> tuple[str, str, Replicas]:
    """(the leader, the standby, stubs to both)."""
    leader = stack.wait_leader("queueing")
    return leader, next(n for n in REPLICAS if n != leader), Replicas(stack)


def quota_term(stack: Stack) -> int:
    async def make() -> int:
        etcd = stack.etcd_client()
        try:
            return await stand_in_quota_term(etcd)
        finally:
            await etcd.close()

    return asyncio.run(make())


def submission(tenant: str = "acme") -> t.Job:
    spec = t.JobSpec(name="job", command=["true"], resources=t.Resources(cpu_millis=100, memory_mb=64))
    return t.Job(job_id=new_job_id(time.time()), tenant_id=tenant, spec=spec)


def stored(stack: Stack, tenant: str, job_id: str) -> t.Job | None:
    async def read() -> t.Job | None:
        etcd = stack.etcd_client()
        try:
            kv = await etcd.get(KEYS.job(tenant, job_id))
            return None if kv is None else t.Job.FromString(kv.value)
        finally:
            await etcd.close()

    return asyncio.run(read())


class Replicas:
    """Blocking stubs to each replica by its own port: as the gateway and as the scheduler."""

    def __init__(self, stack: Stack):
        self.channels = [stack.channel(stack.procs[n].port, who) for n in REPLICAS for who in ("gateway", "scheduler")]
        self.gateway = {n: queueing_pb2_grpc.QueueingServiceStub(self.channels[2 * i]) for i, n in enumerate(REPLICAS)}
        self.scheduler = {
            n: queueing_pb2_grpc.QueueingServiceStub(self.channels[2 * i + 1]) for i, n in enumerate(REPLICAS)
        }

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def order(self, name: str) -> list[str]:
        heads = self.scheduler[name].NextJobs(q.NextJobsRequest(limit=1000), timeout=10).jobs
        return [h.job.job_id for h in heads]


def test_the_standby_refuses_and_takes_over_a_killed_leader_with_the_same_queue(pair: Stack) -> None:
    fence = quota_term(pair)
    leader, standby, stubs = roles(pair)
    try:
        assert not pair.serving(standby, QUEUEING) and pair.serving(standby, "")
        with pytest.raises(grpc.RpcError) as refused:
            stubs.scheduler[standby].NextJobs(q.NextJobsRequest(limit=10), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and reason_of(refused.value) == "NOT_LEADER"
        for tenant in ("acme", "globex", "initech") * 5:
            stubs.gateway[leader].Enqueue(q.EnqueueRequest(job=submission(tenant), quota_fence=fence), timeout=10)
        before = stubs.order(leader)
        assert len(before) == 15

        pair.kill(leader, signal.SIGKILL)
        wait_for(lambda: pair.serving(standby, QUEUEING), timeout=15, what="the standby to take over")
        assert stubs.order(standby) == before  # warm: the same jobs in the same fair order
    finally:
        stubs.close()


def test_a_leader_paused_past_its_lease_cannot_create_or_cancel_after_it_resumes(pair: Stack) -> None:
    fence = quota_term(pair)
    old, new, stubs = roles(pair)
    try:
        victim = stubs.gateway[old].Enqueue(q.EnqueueRequest(job=submission(), quota_fence=fence), timeout=10).job
        pair.kill(old, signal.SIGSTOP)
        try:
            wait_for(lambda: pair.serving(new, QUEUEING), timeout=15, what="the takeover")
        finally:
            pair.kill(old, signal.SIGCONT)
        # At once after SIGCONT, before it may notice its lease is gone, the old leader is asked to write.
        late = submission()
        outcomes = outcomes_of(
            lambda: stubs.gateway[old].Enqueue(q.EnqueueRequest(job=late, quota_fence=fence), timeout=5),
            lambda: stubs.gateway[old].CancelJob(q.CancelJobRequest(tenant_id="acme", job_id=victim.job_id), timeout=5),
        )
        assert all(o.startswith("UNAVAILABLE:NOT_LEADER") for o in outcomes), outcomes
        assert stored(pair, "acme", late.job_id) is None
        kept = stored(pair, "acme", victim.job_id)
        assert kept is not None and kept.state == t.JOB_STATE_PENDING
        # The new leader has the job and serves it.
        assert victim.job_id in stubs.order(new)
        wait_for(lambda: not pair.serving(old, QUEUEING), timeout=10, what="the old leader to stand by")
    finally:
        stubs.close()
