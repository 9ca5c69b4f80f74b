"""The etcd transactions on a job record (libs/lifecycle/txns.py) and the routing rules (routing.py): pure, built
from records as read, checked by what they compare and what they write."""

from __future__ import annotations

import pytest

from jobmesh.common.v1 import types_pb2 as t
from libs.config import PoolConfig
from libs.etcd.client import KeyValue
from libs.keys import Keys
from libs.lifecycle import txns
from libs.lifecycle.codec import decode_assignment, decode_job, decode_worker
from libs.lifecycle.routing import DEFAULT_QUEUE, may_place, queues_served
from libs.lifecycle.transitions import apply_dispatch, new_assignment, new_record

KEYS = Keys("/jobmesh")
T0 = 1_700_000_000.0
WORKER = t.Worker(worker_id="w-1", pool_id="static-general", capacity=t.Resources(cpu_millis=2000, memory_mb=2048))


def pending(job_id: str = "j-1", max_retries: int = 1) -> t.Job:
    spec = t.JobSpec(name="j", command=["true"], resources=t.Resources(cpu_millis=100, memory_mb=64))
    spec.max_retries = max_retries
    return new_record(job_id=job_id, tenant_id="acme", spec=spec, queue=DEFAULT_QUEUE, burst_session_id="", now=T0)


def kv(key: str, value: bytes, mod_revision: int, lease: int = 0) -> KeyValue:
    return KeyValue(key=key, value=value, create_revision=1, mod_revision=mod_revision, version=1, lease=lease)


def written(txn: txns.Txn) -> dict[str, bytes | None]:
    """key -> value put, or None for a delete."""
    out: dict[str, bytes | None] = {}
    for op in txn.ops:
        if op.HasField("request_put"):
            out[op.request_put.key.decode()] = op.request_put.value
        elif op.HasField("request_delete_range"):
            out[op.request_delete_range.key.decode()] = None
    return out


def running(job: t.Job | None = None) -> t.Job:
    return apply_dispatch(job or pending(), WORKER, T0 + 1)


def test_a_dispatch_writes_the_job_running_and_an_assignment_that_carries_it() -> None:
    job, txn = txns.dispatch(KEYS, pending(), 7, WORKER, 9, T0 + 1, exclusive=False)

    puts = written(txn)
    assignment = decode_assignment(puts[KEYS.assignment("w-1", "j-1")] or b"")
    assert decode_job(puts[KEYS.job("acme", "j-1")] or b"").state == t.JOB_STATE_RUNNING
    assert (assignment.attempt, assignment.job.attempt, assignment.job.worker_id) == (1, 1, "w-1")
    assert txn.keys() == {KEYS.job("acme", "j-1"), KEYS.assignment("w-1", "j-1"), KEYS.worker("w-1")}
    assert job.attempt == 1


def test_an_exclusive_dispatch_also_requires_the_worker_to_hold_nothing() -> None:
    _, shared = txns.dispatch(KEYS, pending(), 7, WORKER, 9, T0, exclusive=False)
    _, alone = txns.dispatch(KEYS, pending(), 7, WORKER, 9, T0, exclusive=True)

    assert len(alone.compares) == len(shared.compares) + 1
    assert alone.compares[-1].key.decode() == KEYS.worker_assignments("w-1")


def test_dispatch_leaves_the_queued_record_it_was_given_unchanged() -> None:
    queued = pending()
    txns.dispatch(KEYS, queued, 7, WORKER, 9, T0, exclusive=True)
    assert queued.state == t.JOB_STATE_PENDING


def _completion(attempt: int = 1, **result: object) -> txns.Completion:
    values = {"exit_code": 0, "reason": "EXITED", "message": "", "cpu_seconds": 0.5, "max_memory_mb": 10}
    values.update(result)
    return txns.Completion("acme", "j-1", attempt, "w-1", values)


def test_a_result_ends_the_job_and_withdraws_its_assignment() -> None:
    job = running()
    assign = kv(KEYS.assignment("w-1", "j-1"), new_assignment(job, T0).SerializeToString(), 12)
    planned = txns.complete(KEYS, _completion(), (job, 12), assign, None, T0 + 5, counted=False)

    assert planned is not None
    txn, pool = planned
    puts = written(txn)
    assert pool == "static-general"
    assert decode_job(puts[KEYS.job("acme", "j-1")] or b"").state == t.JOB_STATE_SUCCEEDED
    assert puts[KEYS.assignment("w-1", "j-1")] is None


@pytest.mark.parametrize(
    "attempt, state",
    [pytest.param(2, t.JOB_STATE_RUNNING, id="another-attempt"), pytest.param(1, t.JOB_STATE_CANCELLED, id="ended")],
)
def test_a_stale_result_builds_no_transaction(attempt: int, state: int) -> None:
    job = running()
    job.state = state  # type: ignore[assignment]
    assert txns.complete(KEYS, _completion(attempt), (job, 12), None, None, T0, counted=False) is None


def test_where_jobs_per_worker_are_counted_the_result_moves_the_count_and_an_unhealthy_worker_drains() -> None:
    worker_kv = kv(KEYS.worker("w-1"), WORKER.SerializeToString(), 4, lease=77)
    done = txns.Completion("acme", "j-1", 1, "w-1", _completion().result, unhealthy="disk full")

    planned = txns.complete(KEYS, done, (running(), 12), None, worker_kv, T0, counted=True)

    assert planned is not None
    worker = decode_worker(written(planned[0])[KEYS.worker("w-1")] or b"")
    assert (worker.jobs_run, worker.state) == (1, t.WORKER_STATE_DRAINING)


def test_reclaiming_a_lost_workers_job_retries_it_and_withdraws_the_assignment() -> None:
    job = running(pending(max_retries=1))
    assign = kv(KEYS.assignment("w-1", "j-1"), new_assignment(job, T0).SerializeToString(), 12)
    job_kv = kv(KEYS.job("acme", "j-1"), job.SerializeToString(), 12)

    txn, written_job = txns.reclaim(KEYS, "w-1", assign, job_kv, T0 + 9)

    assert written_job is not None and written_job.state == t.JOB_STATE_PENDING
    assert written_job.waiting_reason == "RETRYING_AFTER_WORKER_LOST"
    assert txn.keys() == {KEYS.assignment("w-1", "j-1"), KEYS.job("acme", "j-1")}


def test_reclaiming_an_assignment_whose_job_moved_on_only_deletes_the_assignment() -> None:
    job = running()
    assign = kv(KEYS.assignment("w-1", "j-1"), new_assignment(job, T0).SerializeToString(), 12)
    job.state = t.JOB_STATE_SUCCEEDED
    txn, written_job = txns.reclaim(KEYS, "w-1", assign, kv(KEYS.job("acme", "j-1"), job.SerializeToString(), 13), T0)

    assert written_job is None
    assert written(txn) == {KEYS.assignment("w-1", "j-1"): None}


def test_cancelling_a_running_job_withdraws_its_assignment_in_the_same_transaction() -> None:
    job = running()
    assign = kv(KEYS.assignment("w-1", "j-1"), new_assignment(job, T0).SerializeToString(), 12)

    txn = txns.cancel(KEYS, job, 12, assign, T0 + 3)

    assert job.state == t.JOB_STATE_CANCELLED and job.attempts[0].reason == "CANCELLED"
    assert written(txn)[KEYS.assignment("w-1", "j-1")] is None


def test_marking_a_missed_deadline_leaves_the_callers_copy_as_it_was() -> None:
    job = pending()
    txn = txns.deadline_missed(KEYS, job, 3, T0 + 60)

    marked = decode_job(written(txn)[KEYS.job("acme", "j-1")] or b"")
    assert (marked.sla_miss, marked.waiting_reason) == (True, "DEADLINE_MISSED")
    assert not job.sla_miss


def test_an_expired_record_goes_with_its_index_and_idempotency_key() -> None:
    job = pending()
    job.spec.idempotency_key = "k-1"
    extra = txns.retained_with(KEYS, job)

    txn = txns.expire([(KEYS.job("acme", "j-1"), 5, extra)])

    assert set(written(txn)) == {KEYS.job("acme", "j-1"), KEYS.job_index("j-1"), KEYS.idempotency("acme", "k-1")}


def test_draining_an_idle_worker_requires_it_to_hold_nothing() -> None:
    worker_kv = kv(KEYS.worker("w-1"), WORKER.SerializeToString(), 4, lease=77)
    txn = txns.drain_worker(KEYS, worker_kv, only_if_idle=True)
    assert txn is not None and txn.compares[-1].key.decode() == KEYS.worker_assignments("w-1")
    assert txn.ops[0].request_put.lease == 77


def _pool(pool_id: str, kind: str) -> PoolConfig:
    return PoolConfig(pool_id=pool_id, kind=kind, worker_cpu_millis=2000, worker_memory_mb=2048, max_workers=2)


POOLS = [_pool("static-general", "static"), _pool("dynamic-large", "dynamic"), _pool("burst-large", "burst")]


@pytest.mark.parametrize(
    "pool, static_room, dynamic_at_max, queues, burst_only",
    [
        pytest.param(POOLS[0], True, False, ["static-general", DEFAULT_QUEUE], False, id="static"),
        pytest.param(POOLS[1], True, False, ["dynamic-large"], False, id="dynamic-while-static-has-room"),
        pytest.param(POOLS[1], False, False, ["dynamic-large", DEFAULT_QUEUE], False, id="dynamic-overflow"),
        pytest.param(POOLS[2], False, False, ["burst-large"], True, id="burst-before-dynamic-is-full"),
        pytest.param(POOLS[2], True, True, ["burst-large", "dynamic-large"], True, id="burst-behind-full-dynamic"),
        pytest.param(
            POOLS[2], False, True, ["burst-large", "dynamic-large", DEFAULT_QUEUE], True, id="burst-last-resort"
        ),
    ],
)
def test_the_queues_a_pool_serves(
    pool: PoolConfig, static_room: bool, dynamic_at_max: bool, queues: list[str], burst_only: bool
) -> None:
    served = queues_served(pool, POOLS, static_has_room=static_room, at_max=lambda p: dynamic_at_max)
    assert served == (queues, burst_only)


def test_burst_workers_take_only_burst_admitted_jobs_and_a_pinned_job_only_its_pool() -> None:
    spec = t.JobSpec(pool="dynamic-large")
    assert not may_place(spec, "static-general", "static", False)
    assert may_place(spec, "dynamic-large", "dynamic", False)
    assert not may_place(t.JobSpec(), "burst-large", "burst", False)
    assert may_place(t.JobSpec(), "burst-large", "burst", True)


def test_a_create_holds_only_while_each_admitting_quota_term_still_leads() -> None:
    jobs = [t.Job(job_id=f"j{n}", tenant_id="acme") for n in range(3)]

    txn = txns.create(KEYS, jobs, [7, 7, 9])

    fences = [c for c in txn.compares if c.key.decode() == KEYS.leader("quota")]
    assert sorted(c.create_revision for c in fences) == [7, 9]  # one compare per distinct term
    assert all(c.target == c.CREATE and c.result == c.EQUAL for c in fences)
    assert len(txns.create(KEYS, jobs).compares) == 3  # unfenced: the id checks only
