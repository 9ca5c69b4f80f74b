"""Running jobs' usage samples at the pool-manager (services/poolmanager/usage.py): which of a heartbeat's samples
are kept (the worker's own attempts, old enough, numbers that could be true, one per attempt) and how often a
worker's are written (at most once per interval)."""

from __future__ import annotations

import math

import pytest

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.config import MAX_WORKER_SLOTS, PoolConfig
from libs.jobs import ts
from services.poolmanager.binding import ResultBounds, ResultOutOfRange, check_sample_numbers
from services.poolmanager.usage import UsageThrottle, accepted_samples

NOW = 1_800_000_000.0
POOL = PoolConfig("general", "static", worker_cpu_millis=2000, worker_memory_mb=1024)
# An attempt assigned 10 s ago on a 2-core, 1 GiB worker.
BOUNDS = ResultBounds.of(POOL, NOW - 10, NOW)


def held(*attempts: tuple[str, int]) -> dict[str, t.Assignment]:
    return {
        job_id: t.Assignment(job_id=job_id, tenant_id="acme", attempt=attempt, assign_time=ts(NOW - 10))
        for job_id, attempt in attempts
    }


def keep(reported: list[pm.RunningUsage], holds: dict[str, t.Assignment]) -> list[pm.RunningUsage]:
    samples, refused = accepted_samples(reported, holds.get, lambda _: BOUNDS, NOW)
    assert refused == []
    return samples


def test_a_sample_of_an_attempt_the_worker_holds_is_kept_with_its_assignments_tenant_and_the_time_heard() -> None:
    reported = pm.RunningUsage(job_id="j1", attempt=2, cpu_seconds=15.0, max_memory_mb=300, tenant_id="globex")

    (kept,) = keep([reported], held(("j1", 2)))

    assert (kept.job_id, kept.attempt, kept.cpu_seconds, kept.max_memory_mb) == ("j1", 2, 15.0, 300)
    assert kept.tenant_id == "acme"  # the assignment's, whatever the worker said
    assert kept.sample_time.ToNanoseconds() / 1e9 == NOW


@pytest.mark.parametrize(
    "reported",
    [
        pytest.param(pm.RunningUsage(job_id="j2", attempt=1), id="a-job-it-does-not-hold"),
        pytest.param(pm.RunningUsage(job_id="j1", attempt=1), id="another-attempt-of-its-job"),
        pytest.param(pm.RunningUsage(job_id="../j1", attempt=2), id="an-id-that-is-no-key"),
    ],
)
def test_a_sample_of_an_attempt_the_worker_does_not_hold_is_left_out(reported: pm.RunningUsage) -> None:
    assert keep([reported], held(("j1", 2))) == []


def test_only_the_first_sample_of_an_attempt_is_kept_and_no_more_than_a_worker_has_slots() -> None:
    many = [pm.RunningUsage(job_id=f"j{i}", attempt=1, cpu_seconds=1.0) for i in range(MAX_WORKER_SLOTS + 10)]
    holds = held(*((s.job_id, 1) for s in many))
    twice = [pm.RunningUsage(job_id="j0", attempt=1, cpu_seconds=1.0), pm.RunningUsage(job_id="j0", attempt=1)]

    assert len(keep(many, holds)) == MAX_WORKER_SLOTS
    assert [s.cpu_seconds for s in keep(twice, holds)] == [1.0]


def test_an_attempt_younger_than_the_interval_is_left_at_its_request() -> None:
    reported = [pm.RunningUsage(job_id="j1", attempt=1, cpu_seconds=1.0)]

    young, _ = accepted_samples(reported, held(("j1", 1)).get, lambda _: BOUNDS, NOW, min_age=15.0)
    old, _ = accepted_samples(reported, held(("j1", 1)).get, lambda _: BOUNDS, NOW, min_age=10.0)

    assert (young, [s.job_id for s in old]) == ([], ["j1"])  # assigned 10 s ago


@pytest.mark.parametrize(
    ("cpu_seconds", "memory_mb"),
    [(math.nan, 0), (math.inf, 0), (-1.0, 0), (10 * 2 * 1.25 + 0.1, 0), (0.0, 2000), (0.0, -1)],
    ids=["nan-cpu", "inf-cpu", "negative-cpu", "more-cpu-than-cores-since-assigned", "huge-memory", "negative-memory"],
)
def test_a_sample_whose_numbers_cannot_be_true_is_refused(cpu_seconds: float, memory_mb: int) -> None:
    reported = pm.RunningUsage(job_id="j1", attempt=1, cpu_seconds=cpu_seconds, max_memory_mb=memory_mb)

    samples, refused = accepted_samples([reported], held(("j1", 1)).get, lambda _: BOUNDS, NOW)

    assert samples == []
    assert [err.reason for err in refused] == ["RESULT_OUT_OF_RANGE"]


def test_a_sample_gets_no_cpu_floor_since_the_cost_service_divides_by_its_time() -> None:
    # A result of a job 0.1 s old may show 1 s of CPU (a sampling tick); a sample that says so would claim 10 cores.
    just_assigned = ResultBounds.of(POOL, NOW - 0.1, NOW)

    check_sample_numbers(0.2, 0, just_assigned)
    with pytest.raises(ResultOutOfRange):
        check_sample_numbers(1.0, 0, just_assigned)


def test_a_worker_is_written_at_most_once_per_interval() -> None:
    throttle = UsageThrottle(interval=15.0)

    assert throttle.due("w", NOW)
    throttle.wrote("w", NOW)
    assert not throttle.due("w", NOW + 14)
    assert throttle.due("w", NOW + 15) and throttle.due("another", NOW + 1)


def test_an_interval_of_zero_writes_nothing() -> None:
    assert not UsageThrottle(interval=0).due("w", NOW)


def test_workers_not_heard_of_for_a_while_are_forgotten() -> None:
    throttle = UsageThrottle(interval=15.0)
    throttle.wrote("gone", NOW)

    throttle.wrote("busy", NOW + 61)

    assert len(throttle) == 1 and not throttle.due("busy", NOW + 62)
