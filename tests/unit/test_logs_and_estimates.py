"""Pure parts of job logs and dry runs: the worker's output shipper, queueing's recent activity, the estimates."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.etcd.client import KeyValue, WatchEvent
from services.gateway import dryrun
from services.queueing.watch import JobWatchers, RecentActivity
from services.worker.logship import LogShipper
from tests.unit.builders import ConfigBuilder, SpecBuilder


class FakeRegistry:
    """AppendJobLog as the pool-manager answers it: stores in order, fails the first `failures` calls."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.stored = bytearray()
        self.next = 0
        self.calls = 0
        self.failures = failures
        self.code = code

    async def __call__(self, request: pm.AppendJobLogRequest) -> pm.AppendJobLogResponse:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "fails")
        if request.offset > self.next:
            self.stored += f"[gap {request.offset - self.next}]".encode()
        self.stored += request.data[max(self.next - request.offset, 0) :]
        self.next = max(self.next, request.offset + len(request.data))
        return pm.AppendJobLogResponse(next_offset=request.offset + len(request.data))


def test_output_arrives_in_order_and_whole_across_a_failed_call() -> None:
    async def scenario() -> FakeRegistry:
        registry = FakeRegistry(failures=1)
        shipper = LogShipper(registry, "w1", "j1", 1, linger=0.01)
        for i in range(5):
            shipper.write(f"line-{i}\n".encode())
            await asyncio.sleep(0.02)
        await shipper.close(5.0)
        return registry

    registry = asyncio.run(scenario())
    assert registry.stored.decode() == "".join(f"line-{i}\n" for i in range(5))
    assert registry.calls >= 2


def test_beyond_its_buffer_the_oldest_unsent_output_is_dropped_and_shows_as_a_gap() -> None:
    async def scenario() -> tuple[FakeRegistry, LogShipper]:
        registry = FakeRegistry()
        shipper = LogShipper(registry, "w1", "j1", 1, max_buffer=10)
        shipper.write(b"0123456789ABCDEF")  # before the sending task ever runs
        await shipper.close(5.0)
        return registry, shipper

    registry, shipper = asyncio.run(scenario())
    assert shipper.dropped == 6
    assert registry.stored == b"[gap 6]6789ABCDEF"


def test_a_refused_attempt_stops_sending_and_close_does_not_wait_for_the_linger() -> None:
    async def scenario() -> tuple[FakeRegistry, float]:
        registry = FakeRegistry(failures=1, code=grpc.StatusCode.FAILED_PRECONDITION)
        shipper = LogShipper(registry, "w1", "j1", 1, linger=30.0)
        shipper.write(b"a")
        await asyncio.sleep(0.05)
        shipper.write(b"b")  # ignored: refused
        slow = LogShipper(FakeRegistry(), "w1", "j2", 1, linger=30.0)
        slow.write(b"x")
        await asyncio.sleep(0.05)
        slow.write(b"y")  # now lingering for 30 s
        start = asyncio.get_running_loop().time()
        await slow.close(10.0)
        return registry, asyncio.get_running_loop().time() - start

    registry, closing = asyncio.run(scenario())
    assert registry.calls == 1 and not registry.stored
    assert closing < 5.0


def _event(job: t.Job, revision: int) -> WatchEvent:
    return WatchEvent(
        "put",
        KeyValue(f"/jobmesh/jobs/{job.tenant_id}/{job.job_id}", job.SerializeToString(), revision, revision, 1, 0),
        revision,
    )


def _ran(job_id: str, tenant: str, start: float, end: float | None) -> t.Job:
    job = t.Job(job_id=job_id, tenant_id=tenant, queue="default", attempt=1)
    attempt = job.attempts.add(attempt=1)
    attempt.start_time.FromNanoseconds(int(start * 1e9))
    job.state = t.JOB_STATE_RUNNING
    if end is not None:
        attempt.end_time.FromNanoseconds(int(end * 1e9))
        job.state = t.JOB_STATE_SUCCEEDED
    return job


def test_recent_activity_counts_each_start_once_and_takes_the_median_runtime() -> None:
    activity = RecentActivity(now=1000.0, window=300.0)
    for i, runtime in enumerate((10.0, 20.0, 60.0)):
        activity.on_event(_event(_ran(f"j{i}", "acme", 1100.0 + i, None), 1))
        activity.on_event(_event(_ran(f"j{i}", "acme", 1100.0 + i, 1100.0 + i + runtime), 2))
        activity.on_event(_event(_ran(f"j{i}", "acme", 1100.0 + i, 1100.0 + i + runtime), 3))  # a replay
    rate, window = activity.dispatch_rate("default", now=1150.0)
    assert (rate, window) == (3 / 150.0, 150.0)  # up for 150 s only: the window is that
    assert activity.median_runtime("acme") == (20.0, 3)
    assert activity.median_runtime("globex") == (0.0, 0)
    assert activity.dispatch_rate("other", now=1150.0)[0] == 0.0


def test_a_watcher_gets_each_change_of_its_job_only() -> None:
    async def scenario() -> list[object]:
        watchers = JobWatchers()
        mine = watchers.subscribe("j1")
        watchers.on_event(_event(_ran("j2", "acme", 1.0, None), 5))
        watchers.on_event(_event(_ran("j1", "acme", 1.0, None), 6))
        watchers.on_event(WatchEvent("delete", KeyValue("/jobmesh/jobs/acme/j1", b"", 6, 7, 1, 0), 7))
        got = [mine.get_nowait(), mine.get_nowait()]
        watchers.unsubscribe("j1", mine)
        assert watchers.count() == 0
        return got

    first, deleted = asyncio.run(scenario())
    assert isinstance(first, tuple) and first[0].job_id == "j1" and first[1] == 6
    assert deleted is None


def test_the_start_estimate_says_its_basis_and_has_none_without_dispatches() -> None:
    estimate = dryrun.start_estimate("default", pending=9, rate=2.0, window=300.0, now=1000.0)
    assert (estimate.position, estimate.estimated_wait_seconds) == (10, 4.5)
    assert estimate.estimated_start_time.seconds == 1004
    assert "9 job(s) ahead" in estimate.basis
    unknown = dryrun.start_estimate("dynamic-large", pending=0, rate=0.0, window=300.0, now=1000.0)
    assert not unknown.HasField("estimated_start_time") and "no job started" in unknown.basis


@pytest.mark.parametrize(
    "runtime, median, samples, priced",
    [(600, 0.0, 0, 600.0), (0, 42.0, 7, 42.0), (0, 0.0, 0, 3600.0)],
)
def test_the_cost_range_is_over_the_pools_that_fit_for_the_runtime_it_names(
    runtime: int, median: float, samples: int, priced: float
) -> None:
    config = (
        ConfigBuilder()
        .pool("cheap", cpu=2000, mem=2048, pricing={"cpu_core_hour": 0.04, "worker_hour": 0.01})
        .pool("dear", "dynamic", cpu=4000, mem=4096, pricing={"cpu_core_hour": 0.08, "worker_hour": 0.02})
        .pool("small", cpu=500, mem=512, pricing={"cpu_core_hour": 0.01})
        .build()
    )
    spec = SpecBuilder().with_(max_runtime_seconds=runtime).build()  # 1 core, 256 MB
    estimate = dryrun.cost_estimate(spec, dryrun.candidate_pools(spec, "default", config), config, median, samples)
    assert estimate.pool_ids == ["cheap", "dear"]  # "small" is too small for 1 core
    assert estimate.runtime_seconds == priced
    hours = priced / 3600
    assert estimate.low.micros == round((0.04 + 0.01) * hours * 1e6)
    assert estimate.high.micros == round((0.08 + 0.02) * hours * 1e6)
