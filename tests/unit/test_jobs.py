"""Unit tests for the pure job rules: spec validation and ids (libs/jobs.py), state transitions and queues
(libs/lifecycle/)."""

from __future__ import annotations

import pytest

from jobmesh.common.v1 import types_pb2 as t
from libs.config import MeshConfig
from libs.errors import InvalidArgument
from libs.jobs import MAX_ARGV_BYTES, MAX_MESSAGE, MAX_NAME, MAX_RETRIES, new_job_id, validate_spec
from libs.lifecycle.routing import DEFAULT_QUEUE, assign_queue
from libs.lifecycle.transitions import FREE_INTERRUPTIONS, apply_dispatch, apply_result, apply_worker_lost
from tests.unit.builders import ConfigBuilder, SpecBuilder, mixed_pools

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def config() -> MeshConfig:
    # static-general: 2 cores, 2 GiB, class=general; dynamic-large: 4 cores, 8 GiB, class=large
    return mixed_pools().build()


def spec() -> SpecBuilder:
    return SpecBuilder()


INVALID_SPECS = [
    pytest.param(spec().with_(name=""), "name", "INVALID_ARGUMENT", id="missing-name"),
    pytest.param(spec().with_(name="   "), "name", "INVALID_ARGUMENT", id="blank-name"),
    pytest.param(spec().with_(name="n" * (MAX_NAME + 1)), "name", "INVALID_ARGUMENT", id="name-too-long"),
    pytest.param(spec().with_(command=[]), "command", "INVALID_ARGUMENT", id="missing-command"),
    pytest.param(spec().with_(command=["", "-c", "true"]), "command", "INVALID_ARGUMENT", id="empty-program"),
    pytest.param(spec().with_(command=["echo"] * 257), "command", "INVALID_ARGUMENT", id="too-many-arguments"),
    pytest.param(
        spec().with_(command=["echo", "x" * MAX_ARGV_BYTES]), "spec", "SPEC_TOO_LARGE", id="command-too-large"
    ),
    pytest.param(
        spec().with_(command=["echo", "x" * (40 * 1024)], env={"BIG": "v" * (40 * 1024)}),
        "spec",
        "SPEC_TOO_LARGE",
        id="argv-and-env-each-fine-together-too-large",
    ),
    pytest.param(spec().with_(env={"1BAD": "v"}), "env", "INVALID_ARGUMENT", id="env-name-starts-with-digit"),
    pytest.param(spec().with_(env={"BAD-NAME": "v"}), "env", "INVALID_ARGUMENT", id="env-name-with-dash"),
    pytest.param(spec().with_(env={"K\n": "v"}), "env", "INVALID_ARGUMENT", id="env-name-ending-in-newline"),
    pytest.param(spec().with_(env={"K": "a\0b"}), "env.K", "INVALID_ARGUMENT", id="env-value-with-nul"),
    pytest.param(spec().with_(command=["echo", "a\0b"]), "command[1]", "INVALID_ARGUMENT", id="arg-with-nul"),
    pytest.param(spec().with_(env={"BIG": "v" * (64 * 1024)}), "spec", "SPEC_TOO_LARGE", id="env-too-large"),
    pytest.param(spec().without_resources(), "resources", "INVALID_ARGUMENT", id="missing-resources"),
    pytest.param(spec().resources(0, 256), "resources.cpu_millis", "INVALID_ARGUMENT", id="zero-cpu"),
    pytest.param(spec().resources(-100, 256), "resources.cpu_millis", "INVALID_ARGUMENT", id="negative-cpu"),
    pytest.param(spec().resources(1000, 0), "resources.memory_mb", "INVALID_ARGUMENT", id="zero-memory"),
    pytest.param(spec().resources(1000, -1), "resources.memory_mb", "INVALID_ARGUMENT", id="negative-memory"),
    pytest.param(spec().with_(pool="no-such-pool"), "pool", "INVALID_ARGUMENT", id="unknown-pool"),
    pytest.param(spec().needs(gpu="a100"), "resources", "UNSCHEDULABLE", id="capability-no-pool-has"),
    pytest.param(spec().resources(8000, 256), "resources", "UNSCHEDULABLE", id="bigger-than-every-worker"),
    pytest.param(
        spec().with_(pool="static-general").needs(**{"class": "large"}),
        "resources",
        "UNSCHEDULABLE",
        id="pinned-pool-lacks-capability",
    ),
    pytest.param(
        spec().needs(**{"-bad key": "x"}), "required_capabilities", "INVALID_ARGUMENT", id="bad-capability-label"
    ),
    pytest.param(
        spec().with_(max_runtime_seconds=-1), "max_runtime_seconds", "INVALID_ARGUMENT", id="negative-max-runtime"
    ),
    pytest.param(spec().with_(max_retries=-1), "max_retries", "INVALID_ARGUMENT", id="negative-retries"),
    pytest.param(spec().with_(max_retries=MAX_RETRIES + 1), "max_retries", "INVALID_ARGUMENT", id="too-many-retries"),
    pytest.param(
        spec().with_(idempotency_key="has space"), "idempotency_key", "INVALID_ARGUMENT", id="idempotency-key-space"
    ),
    pytest.param(
        spec().with_(idempotency_key="k" * 129), "idempotency_key", "INVALID_ARGUMENT", id="idempotency-key-too-long"
    ),
    pytest.param(spec().with_(working_dir="tmp/work"), "working_dir", "INVALID_ARGUMENT", id="relative-working-dir"),
]


@pytest.mark.parametrize(("builder", "field", "reason"), INVALID_SPECS)
def test_an_invalid_spec_is_refused_naming_the_bad_field(
    config: MeshConfig, builder: SpecBuilder, field: str, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_spec(builder.build(), config)

    assert refused.value.field == field
    assert refused.value.reason == reason
    assert refused.value.metadata == {"field": field}


VALID_SPECS = [
    pytest.param(spec(), id="minimal"),
    pytest.param(
        spec()
        .with_(
            pool="dynamic-large",
            env={"PATH": "/bin", "_X1": ""},
            max_retries=MAX_RETRIES,
            max_runtime_seconds=3600,
            idempotency_key="deploy:2024-01.01_a",
            working_dir="/srv/work",
        )
        .resources(4000, 8192)
        .needs(**{"class": "large", "arch": "x86_64"}),
        id="everything-at-its-limits",
    ),
    pytest.param(spec().with_(command=["echo", "x" * (64 * 1024 - 256)]), id="command-just-under-the-spec-limit"),
]


def test_a_raised_spec_limit_leaves_the_per_field_limits_in_force() -> None:
    config = mixed_pools().build()
    import dataclasses

    roomy = dataclasses.replace(config, max_spec_bytes=256 * 1024)
    big = spec().with_(command=["echo", "x" * MAX_ARGV_BYTES]).build()
    with pytest.raises(InvalidArgument) as err:
        validate_spec(big, roomy)
    assert (err.value.field, err.value.reason) == ("command", "INVALID_ARGUMENT")
    with pytest.raises(InvalidArgument) as err:
        validate_spec(big, config)
    assert err.value.reason == "SPEC_TOO_LARGE" and "65536 bytes" in str(err.value)


@pytest.mark.parametrize("builder", VALID_SPECS)
def test_a_valid_spec_passes(config: MeshConfig, builder: SpecBuilder) -> None:
    assert validate_spec(builder.build(), config) is None


class JobBuilder:
    def __init__(self) -> None:
        self._job = t.Job(job_id="j1", tenant_id="acme", state=t.JOB_STATE_PENDING, spec=SpecBuilder().build())

    def retries(self, max_retries: int) -> JobBuilder:
        self._job.spec.max_retries = max_retries
        return self

    def build(self) -> t.Job:
        return self._job


def worker(worker_id: str = "w1", pool_id: str = "static-general") -> t.Worker:
    return t.Worker(worker_id=worker_id, pool_id=pool_id)


def test_dispatch_starts_attempt_one_on_the_worker() -> None:
    job = apply_dispatch(JobBuilder().build(), worker("w1", "static-general"), T0)

    assert job.state == t.JOB_STATE_RUNNING
    assert job.attempt == 1
    assert (job.worker_id, job.pool_id) == ("w1", "static-general")
    assert job.start_time.ToNanoseconds() == int(T0 * 1e9)
    assert not job.HasField("end_time")
    assert [(a.attempt, a.worker_id, a.pool_id) for a in job.attempts] == [(1, "w1", "static-general")]
    assert not job.attempts[0].HasField("end_time")


@pytest.mark.parametrize(
    ("exit_code", "reason", "state", "job_reason"),
    [
        pytest.param(0, "EXITED", t.JOB_STATE_SUCCEEDED, "COMPLETED", id="clean-exit-succeeds"),
        pytest.param(3, "EXITED", t.JOB_STATE_FAILED, "EXIT_CODE", id="non-zero-exit-fails"),
        pytest.param(-9, "KILLED", t.JOB_STATE_FAILED, "KILLED", id="killed"),
        pytest.param(0, "TIMEOUT", t.JOB_STATE_FAILED, "TIMEOUT", id="timeout-even-with-exit-zero"),
        pytest.param(127, "START_FAILED", t.JOB_STATE_FAILED, "START_FAILED", id="start-failed"),
        pytest.param(137, "OOM_KILLED", t.JOB_STATE_FAILED, "OOM_KILLED", id="oom-killed-at-its-memory-limit"),
    ],
)
def test_a_result_ends_the_job_and_closes_its_attempt(exit_code: int, reason: str, state: int, job_reason: str) -> None:
    job = apply_dispatch(JobBuilder().build(), worker(), T0)

    apply_result(
        job, exit_code=exit_code, reason=reason, message="m" * 5000, cpu_seconds=1.5, max_memory_mb=42, now=T0 + 60
    )

    assert job.state == state
    assert job.reason == job_reason
    assert job.exit_code == exit_code
    assert len(job.message) == MAX_MESSAGE
    assert job.end_time.ToNanoseconds() == int((T0 + 60) * 1e9)
    record = job.attempts[0]
    assert record.end_time.ToNanoseconds() == int((T0 + 60) * 1e9)
    assert (record.exit_code, record.reason, record.cpu_seconds, record.max_memory_mb) == (
        exit_code,
        job_reason,
        1.5,
        42,
    )


def test_a_lost_worker_sends_the_job_back_to_pending_while_retries_remain() -> None:
    job = apply_dispatch(JobBuilder().retries(1).build(), worker("w1"), T0)

    apply_worker_lost(job, T0 + 10)

    assert job.state == t.JOB_STATE_PENDING
    assert job.retries == 1
    assert job.worker_id == ""
    assert job.waiting_reason == "RETRYING_AFTER_WORKER_LOST"
    assert not job.HasField("end_time")
    record = job.attempts[0]
    assert (record.reason, record.exit_code) == ("WORKER_LOST", -1)
    assert record.end_time.ToNanoseconds() == int((T0 + 10) * 1e9)


def test_the_retry_runs_as_attempt_two_and_the_next_loss_fails_the_job() -> None:
    job = apply_dispatch(JobBuilder().retries(1).build(), worker("w1"), T0)
    apply_worker_lost(job, T0 + 10)

    apply_dispatch(job, worker("w2", "dynamic-large"), T0 + 20)

    assert job.state == t.JOB_STATE_RUNNING
    assert job.attempt == 2
    assert job.waiting_reason == ""
    assert [(a.attempt, a.worker_id) for a in job.attempts] == [(1, "w1"), (2, "w2")]

    apply_worker_lost(job, T0 + 30)

    assert job.state == t.JOB_STATE_FAILED
    assert (job.reason, job.exit_code) == ("WORKER_LOST", -1)
    assert job.retries == 1
    assert job.end_time.ToNanoseconds() == int((T0 + 30) * 1e9)
    assert [(a.reason, a.end_time.ToNanoseconds()) for a in job.attempts] == [
        ("WORKER_LOST", int((T0 + 10) * 1e9)),
        ("WORKER_LOST", int((T0 + 30) * 1e9)),
    ]


def test_a_lost_worker_fails_a_job_without_retries_at_once() -> None:
    job = apply_dispatch(JobBuilder().retries(0).build(), worker(), T0)

    apply_worker_lost(job, T0 + 5)

    assert job.state == t.JOB_STATE_FAILED
    assert job.reason == "WORKER_LOST"
    assert job.retries == 0


def interrupt(job: t.Job, now: float) -> t.Job:
    return apply_result(
        job, exit_code=-9, reason="INTERRUPTED", message="worker draining", cpu_seconds=0.5, max_memory_mb=7, now=now
    )


def test_an_interrupted_attempt_ends_and_the_job_waits_again_without_using_a_retry() -> None:
    job = apply_dispatch(JobBuilder().retries(1).build(), worker("w1"), T0)

    interrupt(job, T0 + 4)

    assert job.state == t.JOB_STATE_PENDING
    assert (job.retries, job.interruptions) == (0, 1)
    assert job.worker_id == ""
    assert job.waiting_reason == "RETRYING_AFTER_INTERRUPTION"
    assert not job.HasField("end_time")
    record = job.attempts[0]
    # Ended at the report, so it is charged for the 4 s it ran, with what it used.
    assert (record.reason, record.exit_code, record.cpu_seconds, record.max_memory_mb) == ("INTERRUPTED", -1, 0.5, 7)
    assert record.end_time.ToNanoseconds() == int((T0 + 4) * 1e9)

    apply_dispatch(job, worker("w2"), T0 + 5)
    apply_result(job, exit_code=0, reason="EXITED", message="", cpu_seconds=1.0, max_memory_mb=9, now=T0 + 15)

    assert (job.state, job.attempt, job.retries) == (t.JOB_STATE_SUCCEEDED, 2, 0)
    assert [(a.attempt, a.worker_id, a.reason) for a in job.attempts] == [
        (1, "w1", "INTERRUPTED"),
        (2, "w2", "COMPLETED"),
    ]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_interruptions_past_the_free_ones_use_retries_and_then_fail_the_job(max_retries: int) -> None:
    job = JobBuilder().retries(max_retries).build()
    for n in range(FREE_INTERRUPTIONS + max_retries):
        apply_dispatch(job, worker(f"w{n}"), T0 + 10 * n)
        interrupt(job, T0 + 10 * n + 5)
        assert job.state == t.JOB_STATE_PENDING, n
    assert job.retries == max_retries

    apply_dispatch(job, worker("last"), T0 + 1000)
    interrupt(job, T0 + 1005)

    assert job.state == t.JOB_STATE_FAILED
    assert (job.reason, job.exit_code) == ("INTERRUPTED", -1)
    assert job.end_time.ToNanoseconds() == int((T0 + 1005) * 1e9)
    assert job.interruptions == FREE_INTERRUPTIONS + max_retries + 1
    assert [a.reason for a in job.attempts] == ["INTERRUPTED"] * (FREE_INTERRUPTIONS + max_retries + 1)


@pytest.mark.parametrize(
    ("builder", "queue"),
    [
        pytest.param(spec().with_(pool="dynamic-large"), "dynamic-large", id="pinned-dynamic-pool"),
        pytest.param(spec().with_(pool="static-general"), "static-general", id="pinned-static-pool"),
        pytest.param(spec().resources(1000, 1024), DEFAULT_QUEUE, id="fits-static-and-dynamic"),
        pytest.param(spec().resources(3000, 1024), "dynamic-large", id="too-big-for-static"),
        pytest.param(spec().needs(**{"class": "large"}), "dynamic-large", id="capability-only-dynamic-has"),
        pytest.param(spec().needs(**{"class": "general"}), DEFAULT_QUEUE, id="capability-only-static-has"),
        pytest.param(spec().resources(64000, 1024), DEFAULT_QUEUE, id="fits-nowhere"),
    ],
)
def test_assign_queue(config: MeshConfig, builder: SpecBuilder, queue: str) -> None:
    assert assign_queue(builder.build(), config.pools) == queue


def test_new_job_ids_sort_by_submission_time() -> None:
    times = [1.0, 1.5, 2.5, 999_999.0, T0, T0 + 0.01, T0 + 86_400]

    issued = [new_job_id(now) for now in times]

    assert sorted(issued) == issued
    assert sorted(reversed(issued)) == issued
    assert all(len(i) == 22 for i in issued)


def test_job_ids_in_the_same_millisecond_share_a_prefix_but_differ() -> None:
    issued = {new_job_id(T0) for _ in range(50)}

    assert len(issued) == 50
    assert {i[:12] for i in issued} == {f"{int(T0 * 1000):012x}"}


def test_assign_queue_prefers_a_dynamic_pool_to_burst_capacity_listed_first() -> None:
    config = (
        ConfigBuilder()
        .pool("static-small", "static", cpu=1000, mem=1024)
        .pool("burst-large", "burst", cpu=8000, mem=16384, max_workers=2)
        .pool("dynamic-large", "dynamic", cpu=4000, mem=8192)
        .build()
    )

    assert assign_queue(spec().resources(3000, 2048).build(), config.pools) == "dynamic-large"
    assert assign_queue(spec().resources(6000, 2048).build(), config.pools) == "burst-large"
    assert assign_queue(spec().resources(500, 512).build(), config.pools) == DEFAULT_QUEUE
