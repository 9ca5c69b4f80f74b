"""Unit tests of the gateway's batched submit hops (services/gateway/servicer.py Backends) and of the per-item
errors of batch calls (libs/errors.py): concurrent submits share one call, and each caller gets its own
answer or its own error, as the single call would have given it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from jobmesh.quota.v1 import quota_pb2 as qt
from libs.errors import InvalidArgument, JobMeshError, ResourceExhausted, from_item_error, item_error
from services.gateway.servicer import Backends


class FakeQuota:
    """Refuses job ids that start with "big"; records each call's size."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def ReserveMany(self, request: qt.ReserveManyRequest, timeout: float) -> qt.ReserveManyResponse:
        self.calls.append(len(request.reservations))
        await asyncio.sleep(0.01)
        outcomes = []
        for r in request.reservations:
            if r.job_id.startswith("big"):
                err = ResourceExhausted("over quota", reason="QUOTA_EXCEEDED", metadata={"limit": "cpu_millis"})
                outcomes.append(qt.ReserveOutcome(error=item_error(err)))
            else:
                outcomes.append(qt.ReserveOutcome(reserved=qt.ReserveResponse(burst_session_id=f"s-{r.job_id}")))
        return qt.ReserveManyResponse(outcomes=outcomes)


class FakeQueueing:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[int] = []

    async def EnqueueMany(self, request: q.EnqueueManyRequest, timeout: float) -> q.EnqueueManyResponse:
        self.calls.append(len(request.items))
        if self.fail:
            raise RuntimeError("queueing is down")
        return q.EnqueueManyResponse(
            outcomes=[q.EnqueueOutcome(enqueued=q.EnqueueResponse(job=i.job, created=True)) for i in request.items]
        )


def reservation(job_id: str) -> qt.ReserveRequest:
    return qt.ReserveRequest(tenant_id="acme", job_id=job_id, resources=t.Resources(cpu_millis=100, memory_mb=64))


@pytest.mark.asyncio
async def test_concurrent_reservations_share_calls_and_each_gets_its_own_answer() -> None:
    quota = FakeQuota()
    backends = Backends(quota, FakeQueueing(), None, None)

    results = await asyncio.gather(
        *(backends.reserve(reservation(f"job-{i}")) for i in range(5)),
        backends.reserve(reservation("big-1")),
        return_exceptions=True,
    )

    assert [r.burst_session_id for r in results[:5]] == [f"s-job-{i}" for i in range(5)]  # type: ignore[union-attr]
    refused = results[5]
    assert isinstance(refused, JobMeshError)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.reason, refused.metadata) == ("QUOTA_EXCEEDED", {"limit": "cpu_millis"})
    assert quota.calls == [6]  # all arrived before the first call went out: one call


@pytest.mark.asyncio
async def test_a_failed_batch_call_fails_each_of_its_callers() -> None:
    queueing = FakeQueueing(fail=True)
    backends = Backends(FakeQuota(), queueing, None, None)

    results = await asyncio.gather(
        *(backends.enqueue(q.EnqueueRequest(job=t.Job(job_id=f"job-{i}"))) for i in range(3)),
        return_exceptions=True,
    )

    assert all(isinstance(r, RuntimeError) for r in results)


def test_an_item_error_comes_back_as_the_error_the_single_call_gives() -> None:
    err = InvalidArgument("resources.cpu_millis", "is too large", reason="NEVER_FITS")

    back = from_item_error(item_error(err))

    assert back.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (back.message, back.reason, back.metadata) == (err.message, "NEVER_FITS", {"field": "resources.cpu_millis"})


def test_an_unknown_status_code_becomes_internal() -> None:
    assert from_item_error(t.ItemError(code="NO_SUCH_CODE", message="x")).code == grpc.StatusCode.INTERNAL


@pytest.mark.asyncio
async def test_a_lone_submit_is_sent_at_once_and_later_ones_share_the_next_call() -> None:
    quota = FakeQuota()
    backends = Backends(quota, FakeQueueing(), None, None)
    first = asyncio.ensure_future(backends.reserve(reservation("job-0")))
    await asyncio.sleep(0.001)  # its call is in flight
    rest = [asyncio.ensure_future(backends.reserve(reservation(f"job-{i}"))) for i in range(1, 4)]

    await asyncio.gather(first, *rest)

    assert quota.calls == [1, 3]
