"""Cost records (services/cost/records.py): derived from a job's attempt, exact in time, stable in JSON."""

from __future__ import annotations

import json

import pytest

from jobmesh.common.v1 import types_pb2 as t
from services.cost.records import CostRecord, record_for_attempt, running_attempt
from tests.unit.cost_builders import HOUR, MIDNIGHT, JobBuilder, priced_mesh, sample

CONFIG = priced_mesh()


def test_run_time_is_exact_to_the_nanosecond_even_at_epoch_scale() -> None:
    job = JobBuilder().build()
    attempt = t.AttemptRecord(attempt=1, pool_id="static-general")
    attempt.start_time.FromNanoseconds(1_795_000_000_123_456_789)
    attempt.end_time.FromNanoseconds(1_795_000_001_123_456_790)

    record = record_for_attempt(job, attempt, CONFIG)

    # Subtracting the two epochs as floats would be off by up to ~0.2 microseconds.
    assert record.run_seconds == 1.000000001


def test_an_attempt_is_charged_for_what_it_used_beyond_its_request() -> None:
    # Asked for half a core and 512 MB, used a whole core (3600 CPU-seconds) and 1 GiB for an hour: 0.100000.
    job = JobBuilder(cpu_millis=500, memory_mb=512).ended(MIDNIGHT, MIDNIGHT + HOUR, cpu_seconds=3600, memory_mb=1024)

    record = record_for_attempt(job.build(), job.build().attempts[0], CONFIG)

    assert record.cost_micros == 100_000
    assert (record.used_cpu_seconds, record.used_max_memory_mb) == (3600, 1024)


def test_a_burst_job_pays_the_premium_and_is_marked_burst() -> None:
    job = JobBuilder().burst().ended(MIDNIGHT, MIDNIGHT + HOUR).build()

    record = record_for_attempt(job, job.attempts[0], CONFIG)

    assert (record.burst, record.cost_micros, record.currency) == (True, 150_000, "EUR")


def test_a_running_attempt_is_priced_up_to_the_given_moment_at_its_request() -> None:
    job = JobBuilder().running(MIDNIGHT).build()
    attempt = running_attempt(job)
    assert attempt is not None

    record = record_for_attempt(job, attempt, CONFIG, end_ns=int((MIDNIGHT + HOUR / 4) * 1e9))

    assert (record.run_seconds, record.cost_micros) == (900.0, 25_000)


@pytest.mark.parametrize(
    ("cpu_seconds", "memory_mb", "micros"),
    [
        # Requested 1 core and 1 GiB (0.10 an hour); 1,200 CPU-seconds in its first 600 s is 2 cores:
        # (0.05 + 2 x 0.04 + 0.01) x 1/4 h.
        pytest.param(1200, 512, 35_000, id="above-its-request"),
        pytest.param(60, 512, 25_000, id="below-its-request"),
        # Peak 3 GiB so far: (0.05 + 0.04 + 3 x 0.01) x 1/4 h.
        pytest.param(300, 3072, 30_000, id="memory-above-its-request"),
    ],
)
def test_a_running_attempt_is_priced_at_its_latest_sample_from_its_recorded_start(
    cpu_seconds: float, memory_mb: int, micros: int
) -> None:
    job = JobBuilder().running(MIDNIGHT).build()
    attempt = running_attempt(job)
    assert attempt is not None
    latest = sample(job, at=MIDNIGHT + 600, cpu_seconds=cpu_seconds, memory_mb=memory_mb)

    record = record_for_attempt(job, attempt, CONFIG, end_ns=int((MIDNIGHT + HOUR / 4) * 1e9), sample=latest)

    assert (record.run_seconds, record.cost_micros) == (900.0, micros)


def test_an_ended_attempt_is_charged_from_its_result_whatever_sample_is_given() -> None:
    job = JobBuilder().ended(MIDNIGHT, MIDNIGHT + HOUR).build()

    record = record_for_attempt(job, job.attempts[0], CONFIG, sample=sample(job, MIDNIGHT + 60, cpu_seconds=600))

    assert record.cost_micros == 100_000


def test_only_a_running_jobs_open_attempt_is_running() -> None:
    assert running_attempt(JobBuilder().ended(MIDNIGHT, MIDNIGHT + 1).build()) is None
    assert running_attempt(JobBuilder().running(MIDNIGHT).build()) is not None


def test_a_record_reads_back_from_json_and_ignores_fields_it_does_not_know() -> None:
    job = JobBuilder().ended(MIDNIGHT, MIDNIGHT + HOUR).build()
    record = record_for_attempt(job, job.attempts[0], CONFIG)
    newer = json.dumps({**json.loads(record.to_json()), "added_later": 1}).encode()

    assert CostRecord.from_json(record.to_json()) == record
    assert CostRecord.from_json(newer) == record


def test_a_stored_usage_that_cannot_be_true_is_charged_at_the_request_and_never_breaks_pricing() -> None:
    # Results are checked before they are stored (services/poolmanager/binding.py); a record written before that
    # check, or by a bug, must still price (recovery replays every stored job) and must not charge for nonsense.
    for cpu_seconds, memory_mb in ((float("nan"), 0), (float("inf"), 0), (-5.0, -1), (float("-inf"), 0)):
        job = JobBuilder(cpu_millis=500, memory_mb=512).ended(
            MIDNIGHT, MIDNIGHT + HOUR, cpu_seconds=cpu_seconds, memory_mb=memory_mb
        )

        record = record_for_attempt(job.build(), job.build().attempts[0], CONFIG)

        assert (record.used_cpu_seconds, record.used_max_memory_mb) == (0.0, 0)
        assert (
            record.cost_micros
            == record_for_attempt(
                JobBuilder(cpu_millis=500, memory_mb=512).ended(MIDNIGHT, MIDNIGHT + HOUR).build(),
                JobBuilder(cpu_millis=500, memory_mb=512).ended(MIDNIGHT, MIDNIGHT + HOUR).build().attempts[0],
                CONFIG,
            ).cost_micros
        )
        assert json.loads(record.to_json())["used_cpu_seconds"] == 0.0
