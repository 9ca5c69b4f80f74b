"""The gateway's submit saga (services/gateway/submit.py) over fakes: a reservation is given back exactly when the
enqueue failed or was an idempotent replay, and a refused spec or budget reserves nothing."""

from __future__ import annotations

import pytest

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2 as c
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.quota.v1 import quota_pb2 as qt
from libs.clock import FakeClock
from libs.errors import InvalidArgument, Unavailable
from services.gateway.budgets import BudgetGate
from services.gateway.submit import SubmitSaga
from tests.unit.builders import SpecBuilder, mixed_pools


class Budgets:
    async def CheckBudget(self, request: c.CheckBudgetRequest, timeout: float) -> c.CheckBudgetResponse:
        return c.CheckBudgetResponse()


class Quota:
    """A quota leader whose term (the admission fence) moves on with `failover()`."""

    def __init__(self) -> None:
        self.reserved: list[str] = []
        self.released: list[str] = []
        self.term = 7

    async def reserve(self, request: qt.ReserveRequest) -> qt.ReserveResponse:
        self.reserved.append(request.job_id)
        return qt.ReserveResponse(burst_session_id="s-1" if request.burst else "", admission_fence=self.term)

    async def release(self, tenant_id: str, job_id: str) -> None:
        self.released.append(job_id)


class Queue:
    def __init__(self, *, fail: bool = False, replay: bool = False, leader: Quota | None = None) -> None:
        self.fail, self.replay = fail, replay
        self.leader = leader  # stores only what the current term of this quota admitted
        self.sent: list[t.Job] = []
        self.fences: list[int] = []

    async def enqueue(self, request: q.EnqueueRequest) -> q.EnqueueResponse:
        self.sent.append(request.job)
        self.fences.append(request.quota_fence)
        if self.leader is not None and request.quota_fence != self.leader.term:
            raise Unavailable("the admitting quota leader was deposed", reason="ADMISSION_FENCED")
        if self.fail:
            raise Unavailable("queueing is down")
        return q.EnqueueResponse(job=request.job, created=not self.replay)


def saga(quota: Quota, queue: Queue) -> SubmitSaga:
    clock = FakeClock()
    return SubmitSaga(mixed_pools().build(), clock, BudgetGate(Budgets(), clock, mixed_pools().build()), quota, queue)


@pytest.mark.asyncio
async def test_an_accepted_submit_keeps_its_reservation_and_sends_a_submission_not_a_record() -> None:
    quota, queue = Quota(), Queue()

    job = await saga(quota, queue).submit("acme", SpecBuilder().build())

    assert quota.reserved == [job.job_id] and quota.released == []
    (sent,) = queue.sent
    assert (sent.tenant_id, sent.state, sent.queue) == ("acme", t.JOB_STATE_UNSPECIFIED, "")


@pytest.mark.asyncio
@pytest.mark.parametrize("queue", [Queue(fail=True), Queue(replay=True)], ids=["enqueue-failed", "replay"])
async def test_the_reservation_is_given_back_when_the_enqueue_failed_or_was_a_replay(queue: Queue) -> None:
    quota = Quota()
    try:
        await saga(quota, queue).submit("acme", SpecBuilder().build())
    except Unavailable:
        pass

    assert quota.released == quota.reserved and len(quota.reserved) == 1


@pytest.mark.asyncio
async def test_a_bad_spec_reserves_nothing() -> None:
    quota, queue = Quota(), Queue()
    with pytest.raises(InvalidArgument):
        await saga(quota, queue).submit("acme", SpecBuilder().with_(name="").build())
    assert quota.reserved == [] and queue.sent == []


@pytest.mark.asyncio
async def test_a_job_admitted_by_a_deposed_quota_leader_is_admitted_again_by_the_new_one_and_stored_once() -> None:
    quota = Quota()
    queue = Queue(leader=quota)

    class Deposing(Quota):
        """The first reservation is answered by the old leader, which loses its term at once."""

        async def reserve(self, request: qt.ReserveRequest) -> qt.ReserveResponse:
            answer = await quota.reserve(request)
            if len(quota.reserved) == 1:
                quota.term = 9
            return answer

        async def release(self, tenant_id: str, job_id: str) -> None:
            await quota.release(tenant_id, job_id)

    job = await saga(Deposing(), queue).submit("acme", SpecBuilder().build())

    assert queue.fences == [7, 9]
    assert quota.reserved == [job.job_id, job.job_id]
    assert quota.released == [job.job_id]  # the stale reservation only


@pytest.mark.asyncio
async def test_a_refusal_other_than_the_fence_is_not_retried() -> None:
    quota = Quota()
    with pytest.raises(Unavailable):
        await saga(quota, Queue(fail=True)).submit("acme", SpecBuilder().build())
    assert len(quota.reserved) == 1


@pytest.mark.asyncio
async def test_a_job_a_deposed_queueing_leader_could_not_store_is_stored_by_the_next_one() -> None:
    quota = Quota()

    class Deposed(Queue):
        """The first enqueue reaches a queueing leader whose fenced create fails: its term is over."""

        async def enqueue(self, request: q.EnqueueRequest) -> q.EnqueueResponse:
            if not self.sent:
                self.sent.append(request.job)
                raise Unavailable("leadership of /jobmesh/leader/queueing was lost; retry", reason="NOT_LEADER")
            return await super().enqueue(request)

    queue = Deposed()
    job = await saga(quota, queue).submit("acme", SpecBuilder().build())

    assert [j.job_id for j in queue.sent] == [job.job_id, job.job_id]
    assert quota.released == [job.job_id]  # the first reservation, given back before the second
