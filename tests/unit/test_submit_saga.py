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
    def __init__(self) -> None:
        self.reserved: list[str] = []
        self.released: list[str] = []

    async def reserve(self, request: qt.ReserveRequest) -> qt.ReserveResponse:
        self.reserved.append(request.job_id)
        return qt.ReserveResponse(burst_session_id="s-1" if request.burst else "")

    async def release(self, tenant_id: str, job_id: str) -> None:
        self.released.append(job_id)


class Queue:
    def __init__(self, *, fail: bool = False, replay: bool = False) -> None:
        self.fail, self.replay = fail, replay
        self.sent: list[t.Job] = []

    async def enqueue(self, request: q.EnqueueRequest) -> q.EnqueueResponse:
        self.sent.append(request.job)
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
