"""Unit tests for retries (pure, fake clock): which failures max_retries retries, the spec's retry_on, the
backoff between attempts (libs/config.py RetryBackoff, libs/lifecycle/transitions.py), and how a backing-off
job waits in the queueing core without holding up anyone (services/queueing/manager.py)."""

from __future__ import annotations

from typing import Any

import pytest

from jobmesh.common.v1 import types_pb2 as t
from libs.config import ConfigError, RetryBackoff, parse_config
from libs.errors import InvalidArgument
from libs.jobs import validate_spec
from libs.lifecycle.transitions import (
    FREE_INTERRUPTIONS,
    RETRYABLE,
    RETRYING_AFTER_FAILURE,
    RETRYING_AFTER_INTERRUPTION,
    apply_dispatch,
    apply_result,
    apply_worker_lost,
    may_start,
)
from services.queueing.reasons import BACKING_OFF, QUEUED
from tests.unit.builders import SpecBuilder, mixed_pools
from tests.unit.test_queue_manager import Harness

T0 = 1_700_000_000.0
BACKOFF = RetryBackoff(initial_seconds=1.0, max_seconds=5.0, multiplier=2.0)


def job(max_retries: int, retry_on: list[str] | None = None) -> t.Job:
    spec = SpecBuilder().with_(max_retries=max_retries, retry_on=retry_on or []).build()
    return t.Job(job_id="j1", tenant_id="acme", state=t.JOB_STATE_PENDING, spec=spec)


def run(j: t.Job, now: float, worker_id: str = "w1") -> t.Job:
    return apply_dispatch(j, t.Worker(worker_id=worker_id, pool_id="static-general"), now)


def fail(j: t.Job, now: float, reason: str = "EXITED", exit_code: int = 1) -> t.Job:
    return apply_result(
        j,
        exit_code=exit_code,
        reason=reason,
        message="boom",
        cpu_seconds=0.25,
        max_memory_mb=3,
        now=now,
        backoff=BACKOFF,
    )


def seconds(stamp: Any) -> float:
    return float(stamp.ToNanoseconds() / 1e9)


# The backoff ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        pytest.param(RetryBackoff(1, 300, 2), [1, 2, 4, 8, 16], id="doubling"),
        pytest.param(RetryBackoff(1, 5, 2), [1, 2, 4, 5, 5], id="capped"),
        pytest.param(RetryBackoff(0.5, 10, 1), [0.5, 0.5, 0.5, 0.5, 0.5], id="constant"),
        pytest.param(RetryBackoff(0, 10, 2), [0, 0, 0, 0, 0], id="off"),
    ],
)
def test_the_backoff_grows_by_its_multiplier_up_to_its_cap(backoff: RetryBackoff, delays: list[float]) -> None:
    assert [backoff.delay(n) for n in range(1, 6)] == delays


def test_a_huge_retry_number_stays_at_the_cap() -> None:
    assert RetryBackoff(1, 300, 10).delay(10_000) == 300


def _config(**retries: Any) -> dict[str, Any]:
    return {
        "quota": {"defaults": {"cpu_millis": 1000, "memory_mb": 1024, "concurrent_jobs": 2}},
        "pools": [{"id": "p", "workers": 1}],
        **({"retries": retries} if retries else {}),
    }


def test_the_retries_table_sets_the_backoff_and_defaults_to_one_second_doubling_up_to_five_minutes() -> None:
    assert parse_config(_config()).retries == RetryBackoff(1.0, 300.0, 2.0)
    configured = parse_config(_config(backoff_initial_seconds=0.2, backoff_max_seconds=2, backoff_multiplier=3)).retries
    assert configured == RetryBackoff(0.2, 2.0, 3.0)


@pytest.mark.parametrize(
    ("table", "named"),
    [
        pytest.param({"backoff_initial_seconds": -1}, "retries.backoff_initial_seconds", id="negative"),
        pytest.param({"backoff_multiplier": 0.5}, "retries.backoff_multiplier", id="shrinking"),
        pytest.param({"backoff_max_seconds": "10"}, "retries.backoff_max_seconds", id="not-a-number"),
        pytest.param({"backoff_initial_seconds": 10, "backoff_max_seconds": 5}, "backoff_max_seconds", id="cap"),
        pytest.param({"backof_multiplier": 2}, "retries.backof_multiplier", id="typo"),
    ],
)
def test_a_bad_retries_table_is_a_config_error_naming_the_key(table: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(**table))
    assert named in str(caught.value)


# retry_on in the spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "field"),
    [
        pytest.param(["EXIT_CODE", "WORKER_LOOST"], "retry_on[1]", id="typo"),
        pytest.param(["CANCELLED"], "retry_on[0]", id="a-cancel-is-never-retried"),
        pytest.param(["COMPLETED"], "retry_on[0]", id="not-a-failure"),
        pytest.param(["exit_code"], "retry_on[0]", id="case-matters"),
    ],
)
def test_a_retry_on_value_that_is_not_a_retryable_reason_is_refused_naming_it(retry_on: list[str], field: str) -> None:
    spec = SpecBuilder().with_(max_retries=2, retry_on=retry_on).build()
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(spec, mixed_pools().build())
    assert (caught.value.field, caught.value.reason) == (field, "INVALID_ARGUMENT")
    assert "WORKER_LOST" in str(caught.value)  # the message lists what is accepted


def test_every_retryable_reason_is_accepted_in_retry_on() -> None:
    spec = SpecBuilder().with_(max_retries=2, retry_on=list(RETRYABLE)).build()
    assert validate_spec(spec, mixed_pools().build()) is None


# Which failures are retried ---------------------------------------------------------------------------------


def test_a_non_zero_exit_is_retried_with_backoff_and_the_third_failure_fails_the_job() -> None:
    j = job(max_retries=2)
    run(j, T0)
    fail(j, T0 + 1)

    assert (j.state, j.retries, j.waiting_reason) == (t.JOB_STATE_PENDING, 1, RETRYING_AFTER_FAILURE)
    assert seconds(j.next_attempt_time) == T0 + 2  # 1 s after the failure
    assert j.worker_id == "" and not j.HasField("end_time")
    assert "EXIT_CODE" in j.message and "retry 1 of 2" in j.message

    run(j, T0 + 2, "w2")
    assert not j.HasField("next_attempt_time")
    fail(j, T0 + 3)
    assert (j.state, j.retries) == (t.JOB_STATE_PENDING, 2)
    assert seconds(j.next_attempt_time) == T0 + 5  # 2 s: doubled

    run(j, T0 + 5, "w3")
    fail(j, T0 + 6)

    assert (j.state, j.reason, j.exit_code, j.retries) == (t.JOB_STATE_FAILED, "EXIT_CODE", 1, 2)
    assert seconds(j.end_time) == T0 + 6
    assert [(a.attempt, a.worker_id, a.reason, a.exit_code) for a in j.attempts] == [
        (1, "w1", "EXIT_CODE", 1),
        (2, "w2", "EXIT_CODE", 1),
        (3, "w3", "EXIT_CODE", 1),
    ]
    assert [(seconds(a.start_time), seconds(a.end_time)) for a in j.attempts] == [
        (T0, T0 + 1),
        (T0 + 2, T0 + 3),
        (T0 + 5, T0 + 6),
    ]
    assert all(a.cpu_seconds == 0.25 for a in j.attempts)  # each attempt keeps what it used, for its cost


@pytest.mark.parametrize(
    ("reason", "exit_code", "recorded"),
    [
        pytest.param("OOM_KILLED", 137, "OOM_KILLED", id="oom"),
        pytest.param("TIMEOUT", -9, "TIMEOUT", id="timeout"),
        pytest.param("START_FAILED", -1, "START_FAILED", id="start-failed"),
    ],
)
def test_other_failures_of_the_job_are_retried_too(reason: str, exit_code: int, recorded: str) -> None:
    j = run(job(max_retries=1), T0)
    fail(j, T0 + 1, reason, exit_code)

    assert (j.state, j.retries) == (t.JOB_STATE_PENDING, 1)
    assert (j.attempts[0].reason, j.attempts[0].exit_code) == (recorded, exit_code)


def test_a_killed_attempt_is_never_retried() -> None:
    j = run(job(max_retries=3), T0)
    fail(j, T0 + 1, "KILLED", -9)
    assert (j.state, j.reason, j.retries) == (t.JOB_STATE_FAILED, "KILLED", 0)


def test_a_success_is_final_whatever_retries_are_left() -> None:
    j = run(job(max_retries=3), T0)
    fail(j, T0 + 1, "EXITED", 0)
    assert (j.state, j.reason, j.retries) == (t.JOB_STATE_SUCCEEDED, "COMPLETED", 0)
    assert not j.HasField("next_attempt_time")


def test_without_retries_a_failure_is_final_as_before() -> None:
    j = run(job(max_retries=0), T0)
    fail(j, T0 + 1)
    assert (j.state, j.reason, j.exit_code, j.message) == (t.JOB_STATE_FAILED, "EXIT_CODE", 1, "boom")


def test_retry_on_worker_lost_only_leaves_a_failing_command_final_but_retries_a_lost_worker() -> None:
    failing = run(job(max_retries=2, retry_on=["WORKER_LOST"]), T0)
    fail(failing, T0 + 1)
    assert (failing.state, failing.reason, failing.retries) == (t.JOB_STATE_FAILED, "EXIT_CODE", 0)

    lost = run(job(max_retries=2, retry_on=["WORKER_LOST"]), T0)
    apply_worker_lost(lost, T0 + 1, backoff=BACKOFF)
    assert (lost.state, lost.retries, lost.attempts[0].reason) == (t.JOB_STATE_PENDING, 1, "WORKER_LOST")
    assert seconds(lost.next_attempt_time) == T0 + 2


def test_retry_on_exit_code_only_fails_a_job_whose_worker_is_lost() -> None:
    j = run(job(max_retries=2, retry_on=["EXIT_CODE"]), T0)
    apply_worker_lost(j, T0 + 1, backoff=BACKOFF)
    assert (j.state, j.reason) == (t.JOB_STATE_FAILED, "WORKER_LOST")
    assert "retry_on does not list WORKER_LOST" in j.message


def interrupt(j: t.Job, now: float) -> t.Job:
    return apply_result(
        j, exit_code=-9, reason="INTERRUPTED", message="drain", cpu_seconds=0, max_memory_mb=0, now=now, backoff=BACKOFF
    )


def test_free_interruptions_wait_no_backoff_and_ignore_retry_on_but_later_ones_obey_both() -> None:
    j = job(max_retries=1, retry_on=["INTERRUPTED"])
    for n in range(FREE_INTERRUPTIONS):
        interrupt(run(j, T0 + 10 * n), T0 + 10 * n + 1)
        assert (j.state, j.retries, j.waiting_reason) == (t.JOB_STATE_PENDING, 0, RETRYING_AFTER_INTERRUPTION)
        assert not j.HasField("next_attempt_time")  # a drain is not the job's fault: no wait

    interrupt(run(j, T0 + 100), T0 + 101)
    assert (j.state, j.retries) == (t.JOB_STATE_PENDING, 1)
    assert seconds(j.next_attempt_time) == T0 + 102

    other = job(max_retries=1, retry_on=["EXIT_CODE"])
    for n in range(FREE_INTERRUPTIONS):
        interrupt(run(other, T0 + 10 * n), T0 + 10 * n + 1)
    assert other.state == t.JOB_STATE_PENDING  # the free ones, whatever retry_on says
    interrupt(run(other, T0 + 100), T0 + 101)
    assert (other.state, other.reason) == (t.JOB_STATE_FAILED, "INTERRUPTED")


def test_a_job_may_start_only_once_its_backoff_has_passed() -> None:
    j = run(job(max_retries=1), T0)
    assert may_start(job(max_retries=1), T0)
    fail(j, T0 + 1)

    assert not may_start(j, T0 + 1.999)
    assert may_start(j, T0 + 2)


# The queueing core: a backing-off job waits aside ------------------------------------------------------------


async def _failed_once(h: Harness, tenant: str = "acme") -> str:
    [job_id] = await h.submit(tenant, max_retries=2)
    await h.dispatch(job_id)
    running, _ = h.records.jobs[job_id]
    retried = apply_result(
        running,
        exit_code=1,
        reason="EXITED",
        message="",
        cpu_seconds=0,
        max_memory_mb=0,
        now=h.clock.now(),
        backoff=RetryBackoff(10, 60, 2),
    )
    await h.manager.on_job_event(h.records.update(retried))
    return job_id


@pytest.mark.asyncio
async def test_a_backing_off_job_is_not_handed_out_and_does_not_hold_up_another_tenants_job() -> None:
    h = Harness()
    backing_off = await _failed_once(h, "acme")
    [theirs] = await h.submit("globex")
    [own_later] = await h.submit("acme")

    assert await h.heads() == [theirs, own_later]
    assert h.sample("jobmesh_queueing_backing_off_jobs") == 1
    shown = await h.shown(backing_off)
    assert (shown.waiting_reason, shown.queue_position) == (BACKING_OFF, 0)
    assert seconds(shown.next_attempt_time) == h.clock.now() + 10

    h.clock.advance(9.9)
    await h.manager.tick()
    assert backing_off not in await h.heads()

    h.clock.advance(0.1)
    assert h.manager.next_timer() <= 0
    await h.manager.tick()
    assert backing_off in await h.heads()
    assert (await h.shown(backing_off)).waiting_reason == RETRYING_AFTER_FAILURE
    assert h.sample("jobmesh_queueing_backing_off_jobs") == 0

    await h.dispatch(backing_off, after=0.25)
    # Its wait in the queue counts from the end of its backoff, not from the failure.
    assert h.sample("jobmesh_queueing_wait_seconds_sum", sla_tier="standard") == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_a_backing_off_job_is_still_backing_off_after_a_restart_and_its_timer_is_due() -> None:
    h = Harness()
    backing_off = await _failed_once(h)
    assert h.manager.next_timer() == pytest.approx(10.0)

    again = Harness(records=h.records, clock=h.clock)
    for event in h.records.all_events():
        await again.manager.on_job_event(event)
    again.manager.finish_rebuild()

    assert await again.heads() == []
    assert (await again.shown(backing_off)).waiting_reason == BACKING_OFF
    h.clock.advance(10)
    await again.manager.tick()
    assert await again.heads() == [backing_off]


@pytest.mark.asyncio
async def test_a_backing_off_job_cancelled_or_dispatched_leaves_no_timer_behind() -> None:
    h = Harness()
    backing_off = await _failed_once(h)
    job, _ = h.records.jobs[backing_off]
    cancelled = t.Job()
    cancelled.CopyFrom(job)
    cancelled.state = t.JOB_STATE_CANCELLED

    await h.manager.on_job_event(h.records.update(cancelled))
    h.clock.advance(10)
    await h.manager.tick()

    assert await h.heads() == []
    assert backing_off not in h.manager.pending
    assert h.manager.next_timer() == float("inf")


def test_the_waiting_reason_rule_puts_backing_off_after_a_missed_deadline() -> None:
    from services.queueing.reasons import DEADLINE_MISSED, waiting_reason

    facts: dict[str, Any] = {
        "recorded": RETRYING_AFTER_FAILURE,
        "offered_recently": False,
        "dynamic_queue": False,
        "ahead_other_tenants": 0,
    }
    assert waiting_reason(deadline_missed=False, backing_off=True, **facts) == BACKING_OFF
    assert waiting_reason(deadline_missed=True, backing_off=True, **facts) == DEADLINE_MISSED
    assert waiting_reason(deadline_missed=False, backing_off=False, **facts) == RETRYING_AFTER_FAILURE
    assert waiting_reason(deadline_missed=False, backing_off=False, **(facts | {"recorded": ""})) == QUEUED
