"""Unit tests for finished-job retention (services/queueing/retention.py `FinishedJobs`): pure, no etcd."""

from __future__ import annotations

from jobmesh.common.v1 import types_pb2 as t
from libs.jobs import ts
from libs.keys import Keys
from services.queueing.retention import FinishedJobs

KEYS = Keys("/jobmesh")
T0 = 1_800_000_000.0


def finished(job_id: str, ended: float, state: int = t.JOB_STATE_SUCCEEDED, idem: str = "") -> t.Job:
    job = t.Job(job_id=job_id, tenant_id="acme", state=state)
    job.spec.idempotency_key = idem
    job.end_time.CopyFrom(ts(ended))
    return job


def test_jobs_fall_due_in_order_of_their_end_plus_the_retention() -> None:
    jobs = FinishedJobs(KEYS, retention_seconds=60)
    jobs.observe(finished("late", T0 + 30), 7)
    jobs.observe(finished("early", T0), 5)

    assert jobs.due(T0 + 59) == []
    first = jobs.due(T0 + 60)
    assert [(f.key, f.mod_revision) for f in first] == [(KEYS.job("acme", "early"), 5)]
    assert [f.key for f in jobs.due(T0 + 1000)] == [KEYS.job("acme", "late")]
    assert len(jobs) == 0


def test_a_finished_job_takes_its_index_and_idempotency_key_with_it() -> None:
    jobs = FinishedJobs(KEYS, retention_seconds=1)
    jobs.observe(finished("j", T0, idem="nightly"), 3)

    (item,) = jobs.due(T0 + 1)

    assert item.keys == (KEYS.job_index("j"), KEYS.idempotency("acme", "nightly"))


def test_pending_and_running_jobs_and_a_zero_retention_are_never_due() -> None:
    keep_forever = FinishedJobs(KEYS, retention_seconds=0)
    keep_forever.observe(finished("j", T0), 1)
    jobs = FinishedJobs(KEYS, retention_seconds=1)
    jobs.observe(finished("p", T0, state=t.JOB_STATE_PENDING), 1)
    jobs.observe(finished("r", T0, state=t.JOB_STATE_RUNNING), 1)

    assert keep_forever.due(T0 + 10**9) == [] and jobs.due(T0 + 10**9) == []


def test_requeued_items_come_due_again() -> None:
    jobs = FinishedJobs(KEYS, retention_seconds=1)
    jobs.observe(finished("j", T0), 1)
    items = jobs.due(T0 + 2)

    jobs.requeue(items)

    assert jobs.due(T0 + 2) == items
