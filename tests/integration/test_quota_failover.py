"""The quota service as two real replicas over a real etcd and a real queueing service: one leads; a leader paused
past its lease (SIGSTOP) is replaced, and whatever it admitted or writes after SIGCONT never lands."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devtools.launcher import Stack
from jobmesh.common.v1 import quota_pb2 as common_quota
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.queueing.v1 import queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2 as qt
from jobmesh.quota.v1 import quota_pb2_grpc
from libs.jobs import new_job_id
from libs.keys import Keys
from tests.helpers import resume_and_stop, start_replicas, stored_value, wait_for

KEYS = Keys("/jobmesh")
REPLICAS = ("quota-1", "quota-2")
QUOTA = "jobmesh.quota.v1.QuotaService"


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[Stack]:
    """etcd, the queueing service and two quota replicas (a 2 s lease), nothing else: the test plays the gateway."""
    stack = start_replicas(tmp_path / "stack", ("queueing-1", *REPLICAS), ("quota", "queueing"))
    try:
        yield stack
    finally:
        resume_and_stop(stack)


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def outcomes_of(*calls: Callable[[], object]) -> list[str]:
    """Each call's outcome, in order: "OK" or "CODE:REASON:message"."""
    out = []
    for call in calls:
        try:
            call()
            out.append("OK")
        except grpc.RpcError as err:
            out.append(f"{err.code().name}:{reason_of(err)}:{err.details()}")
    return out


def reservation(job_id: str) -> qt.ReserveRequest:
    return qt.ReserveRequest(tenant_id="acme", job_id=job_id, resources=t.Resources(cpu_millis=100, memory_mb=64))


def submission(job_id: str) -> t.Job:
    spec = t.JobSpec(name="fenced", command=["true"], resources=t.Resources(cpu_millis=100, memory_mb=64))
    return t.Job(job_id=job_id, tenant_id="acme", spec=spec)


class AsGateway:
    """Blocking stubs, as the gateway's identity, to each quota replica by its own port and to queueing."""

    def __init__(self, stack: Stack):
        self.channels = {name: stack.channel(stack.procs[name].port, "gateway") for name in (*REPLICAS, "queueing-1")}
        self.quota = {name: quota_pb2_grpc.QuotaServiceStub(self.channels[name]) for name in REPLICAS}
        self.queueing = queueing_pb2_grpc.QueueingServiceStub(self.channels["queueing-1"])

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def enqueue(self, job_id: str, fence: int) -> q.EnqueueResponse:
        return self.queueing.Enqueue(q.EnqueueRequest(job=submission(job_id), quota_fence=fence), timeout=10)


def stored_limits(stack: Stack, tenant: str) -> dict[str, int] | None:
    value = stored_value(stack, KEYS.quota_limits(tenant))
    return None if value is None else dict(json.loads(value))


def test_the_standby_refuses_every_call_and_reports_the_service_not_serving(pair: Stack) -> None:
    leader = pair.wait_leader("quota")
    standby = next(n for n in REPLICAS if n != leader)
    assert not pair.serving(standby, QUOTA)
    assert pair.serving(standby, "")  # alive and warm: not a failed process
    gw = AsGateway(pair)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            gw.quota[standby].Reserve(reservation(new_job_id(time.time())), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(refused.value) == "NOT_LEADER"
        answer = gw.quota[leader].Reserve(reservation(new_job_id(time.time())), timeout=5)
        assert answer.admission_fence > 0
    finally:
        gw.close()


def test_an_enqueue_without_an_admission_fence_is_refused(pair: Stack) -> None:
    gw = AsGateway(pair)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            gw.queueing.Enqueue(q.EnqueueRequest(job=submission(new_job_id(time.time()))), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        gw.close()


def test_two_quota_leaders_cannot_both_admit_and_a_paused_leader_cannot_write_after_it_resumes(pair: Stack) -> None:
    old = pair.wait_leader("quota")
    new = next(n for n in REPLICAS if n != old)
    gw = AsGateway(pair)
    try:
        # The leader admits a job, then stops (SIGSTOP: a long GC pause, a frozen VM) before it is stored.
        stale_job = new_job_id(time.time())
        stale = gw.quota[old].Reserve(reservation(stale_job), timeout=5)
        pair.kill(old, signal.SIGSTOP)
        try:
            wait_for(lambda: pair.serving(new, QUOTA), timeout=15, what="the takeover")
            # The new leader admits too: two replicas have now each admitted a job ...
            fresh_job = new_job_id(time.time())
            fresh = gw.quota[new].Reserve(reservation(fresh_job), timeout=5)
            assert fresh.admission_fence > stale.admission_fence
            # ... but only the current leader's admission lands.
            with pytest.raises(grpc.RpcError) as fenced:
                gw.enqueue(stale_job, stale.admission_fence)
            assert fenced.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(fenced.value) == "ADMISSION_FENCED"
            assert gw.enqueue(fresh_job, fresh.admission_fence).created
            before = stored_limits(pair, "globex")
        finally:
            pair.kill(old, signal.SIGCONT)
        # At once after SIGCONT, before it may notice that its lease is gone, the old leader is asked to write.
        update = qt.UpdateQuotaRequest(tenant_id="globex", limits=common_quota.QuotaLimits(concurrent_jobs=1))
        burst = qt.RequestBurstRequest(tenant_id="globex", cpu_millis=100, memory_mb=64, duration_seconds=60)
        late_job = new_job_id(time.time())
        outcomes = outcomes_of(
            lambda: gw.quota[old].UpdateQuota(update, timeout=5),
            lambda: gw.quota[old].RequestBurst(burst, timeout=5),
            lambda: gw.enqueue(late_job, gw.quota[old].Reserve(reservation(late_job), timeout=5).admission_fence),
        )
        assert all(o.startswith("UNAVAILABLE:") for o in outcomes), outcomes
        assert stored_limits(pair, "globex") == before  # nothing the old leader did landed
        assert pair.procs[old].alive()
        # It is the standby now, and the new leader still serves.
        wait_for(lambda: not pair.serving(old, QUOTA), timeout=10, what="the old leader to stand by")
        assert pair.serving(new, QUOTA)
    finally:
        gw.close()
