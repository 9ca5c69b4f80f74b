"""Every etcd transaction on a job record, built here from what the caller read (pure: no I/O).

Each builder returns a `Txn` (compares and ops) that changes nothing when a record it read has moved since, so
the caller may commit it as it is, add a fence (the leader key, a worker's record) or batch several together
(the compares name exactly the keys it writes). `JobStore` (store.py) and the leader loops commit them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from jobmesh.common.v1 import types_pb2 as t
from libs.config import RetryBackoff
from libs.etcd.client import (
    Compare,
    KeyValue,
    RequestOp,
    cmp_create,
    cmp_missing,
    cmp_mod,
    cmp_none_under,
    op_delete,
    op_get,
    op_put,
)
from libs.keys import Keys
from libs.lifecycle.codec import decode_assignment, decode_job, decode_worker
from libs.lifecycle.transitions import (
    DEFAULT_BACKOFF,
    apply_cancel,
    apply_deadline_missed,
    apply_dispatch,
    apply_result,
    apply_worker_lost,
    new_assignment,
)


@dataclass
class Txn:
    compares: list[Compare] = field(default_factory=list)
    ops: list[RequestOp] = field(default_factory=list)

    def keys(self) -> set[str]:
        """The keys the transaction compares (every one it writes, for the builders here)."""
        return {c.key.decode() for c in self.compares}

    @staticmethod
    def join(txns: Iterable[Txn]) -> Txn:
        out = Txn()
        for txn in txns:
            out.compares += txn.compares
            out.ops += txn.ops
        return out


@dataclass(frozen=True)
class Completion:
    """A worker's report of how one attempt ended."""

    tenant_id: str
    job_id: str
    attempt: int
    worker_id: str
    result: dict[str, object]
    unhealthy: str = ""  # the worker failed its health check: drain it in the same transaction


# Create --------------------------------------------------------------------------------------------------------


def create(keys: Keys, jobs: Sequence[t.Job], fences: Iterable[int] = ()) -> Txn:
    """New PENDING records and their id index, each only if its id is free (no idempotency keys: see
    `create_idempotent`), and only while the quota leader terms that admitted them (`fences`, their leader key's
    create revisions) still lead: a deposed quota leader's admissions never land."""
    txn = Txn()
    for fence in sorted(set(fences)):
        txn.compares.append(cmp_create(keys.leader("quota"), fence))
    for job in jobs:
        key = keys.job(job.tenant_id, job.job_id)
        txn.compares.append(cmp_missing(key))
        txn.ops += [op_put(key, job.SerializeToString()), op_put(keys.job_index(job.job_id), job.tenant_id.encode())]
    return txn


def create_idempotent(keys: Keys, job: t.Job, fence: int = 0) -> tuple[Txn, RequestOp | None]:
    """`create` of one job that also claims its idempotency key; with a key, the op to read its owner on failure."""
    txn = create(keys, [job], [fence] if fence else [])
    idem = job.spec.idempotency_key
    if not idem:
        return txn, None
    idem_key = keys.idempotency(job.tenant_id, idem)
    txn.compares.append(cmp_missing(idem_key))
    txn.ops.append(op_put(idem_key, job.job_id.encode()))
    return txn, op_get(idem_key)


# Dispatch ------------------------------------------------------------------------------------------------------


def dispatch(
    keys: Keys, queued: t.Job, revision: int, worker: t.Worker, worker_revision: int, now: float, *, exclusive: bool
) -> tuple[t.Job, Txn]:
    """PENDING -> RUNNING on `worker` with its assignment, if neither the job nor the worker moved since they were
    read; `exclusive` (one job at a time): only if the worker holds no assignment, whatever a cache said."""
    job = t.Job()
    job.CopyFrom(queued)
    apply_dispatch(job, worker, now)
    job_key = keys.job(job.tenant_id, job.job_id)
    assign_key = keys.assignment(worker.worker_id, job.job_id)
    compares = [
        cmp_mod(job_key, revision),
        cmp_missing(assign_key),
        cmp_mod(keys.worker(worker.worker_id), worker_revision),
    ]
    if exclusive:
        compares.append(cmp_none_under(keys.worker_assignments(worker.worker_id)))
    ops = [op_put(job_key, job.SerializeToString()), op_put(assign_key, new_assignment(job, now).SerializeToString())]
    return job, Txn(compares, ops)


# Complete ------------------------------------------------------------------------------------------------------


def completion_keys(keys: Keys, done: Completion) -> list[str]:
    """What recording a result reads: the job, the assignment, the worker."""
    return [
        keys.job(done.tenant_id, done.job_id),
        keys.assignment(done.worker_id, done.job_id),
        keys.worker(done.worker_id),
    ]


def complete(
    keys: Keys,
    done: Completion,
    job_at: tuple[t.Job, int] | None,
    assign: KeyValue | None,
    worker_kv: KeyValue | None,
    now: float,
    *,
    counted: bool,
    backoff: RetryBackoff = DEFAULT_BACKOFF,
) -> tuple[Txn, str] | None:
    """RUNNING -> the result's state, the assignment withdrawn, and (where the pool counts jobs per worker, or the
    worker failed its health check) the worker's record updated in the same transaction. Returns the transaction
    and the job's pool, or None when the report is stale. `job_at` is the job and its mod revision."""
    if job_at is None:
        return None
    job, revision = job_at
    if job.state != t.JOB_STATE_RUNNING or job.attempt != done.attempt or job.worker_id != done.worker_id:
        return None
    key, assign_key, worker_key = completion_keys(keys, done)
    ended = apply_result(job, now=now, backoff=backoff, **done.result)  # type: ignore[arg-type]
    txn = Txn([cmp_mod(key, revision)], [op_put(key, ended.SerializeToString())])
    if assign is not None:
        held = decode_assignment(assign.value)
        if held.job_id == done.job_id and held.attempt == done.attempt:
            txn.compares.append(cmp_mod(assign_key, assign.mod_revision))
            txn.ops.append(op_delete(assign_key))
    # A worker at its job limit is never seen idle with a stale count; an unhealthy one is freed and drained at
    # once, so the scheduler never sees it idle and healthy.
    if worker_kv is not None and (counted or done.unhealthy):
        worker = decode_worker(worker_kv.value)
        if counted:
            worker.jobs_run += 1
        if done.unhealthy:
            worker.state = t.WORKER_STATE_DRAINING
        txn.compares.append(cmp_mod(worker_key, worker_kv.mod_revision))
        txn.ops.append(op_put(worker_key, worker.SerializeToString(), worker_kv.lease))
    return txn, job.pool_id


# Reclaim -------------------------------------------------------------------------------------------------------


def reclaim(
    keys: Keys,
    worker_id: str,
    assign_kv: KeyValue,
    job_kv: KeyValue | None,
    now: float,
    backoff: RetryBackoff = DEFAULT_BACKOFF,
) -> tuple[Txn, t.Job | None]:
    """A lost worker's assignment taken back: its job retried or failed (WORKER_LOST). Returns the transaction and
    the job as it will be written (None when the job had moved on: then only the assignment goes)."""
    assignment = decode_assignment(assign_kv.value)
    txn = Txn([cmp_mod(assign_kv.key, assign_kv.mod_revision)], [op_delete(assign_kv.key)])
    if job_kv is None:
        return txn, None
    job = decode_job(job_kv.value)
    if job.state != t.JOB_STATE_RUNNING or job.attempt != assignment.attempt or job.worker_id != worker_id:
        return txn, None
    apply_worker_lost(job, now, backoff)
    txn.compares.append(cmp_mod(job_kv.key, job_kv.mod_revision))
    txn.ops.append(op_put(job_kv.key, job.SerializeToString()))
    return txn, job


# Cancel --------------------------------------------------------------------------------------------------------


def cancel(keys: Keys, job: t.Job, revision: int, assign_kv: KeyValue | None, now: float) -> Txn:
    """PENDING or RUNNING -> CANCELLED; a running job's assignment is withdrawn in the same transaction, which is
    what tells its worker to kill it. `job` is changed in place to what will be written."""
    key = keys.job(job.tenant_id, job.job_id)
    txn = Txn([cmp_mod(key, revision)])
    if (
        assign_kv is not None
        and job.state == t.JOB_STATE_RUNNING
        and decode_assignment(assign_kv.value).job_id == job.job_id
    ):
        txn.compares.append(cmp_mod(assign_kv.key, assign_kv.mod_revision))
        txn.ops.append(op_delete(assign_kv.key))
    apply_cancel(job, now)
    txn.ops.append(op_put(key, job.SerializeToString()))
    return txn


# Deadline ------------------------------------------------------------------------------------------------------


def deadline_missed(keys: Keys, job: t.Job, revision: int, now: float) -> Txn:
    """A still-pending job marked as having missed its deadline (the caller's copy is left as it was)."""
    marked = t.Job()
    marked.CopyFrom(job)
    apply_deadline_missed(marked, now)
    key = keys.job(job.tenant_id, job.job_id)
    return Txn([cmp_mod(key, revision)], [op_put(key, marked.SerializeToString())])


# Drain ---------------------------------------------------------------------------------------------------------


def drain_worker(keys: Keys, worker_kv: KeyValue, *, only_if_idle: bool) -> Txn | None:
    """A worker marked DRAINING (out of scheduling) under its own lease; `only_if_idle`: only while it holds no
    assignment. None when it is draining already."""
    worker = decode_worker(worker_kv.value)
    if worker.state == t.WORKER_STATE_DRAINING and not only_if_idle:
        return None
    worker.state = t.WORKER_STATE_DRAINING
    txn = Txn(
        [cmp_mod(worker_kv.key, worker_kv.mod_revision)],
        [op_put(worker_kv.key, worker.SerializeToString(), worker_kv.lease)],
    )
    if only_if_idle:
        txn.compares.append(cmp_none_under(keys.worker_assignments(worker.worker_id)))
    return txn


# Retention -----------------------------------------------------------------------------------------------------


def retained_with(keys: Keys, job: t.Job) -> tuple[str, ...]:
    """The keys that go with a job record when it is deleted: its id index, its idempotency key."""
    extra = [keys.job_index(job.job_id)]
    if job.spec.idempotency_key:
        extra.append(keys.idempotency(job.tenant_id, job.spec.idempotency_key))
    return tuple(extra)


def expire(records: Iterable[tuple[str, int, Sequence[str]]]) -> Txn:
    """Finished records deleted, each (key, mod revision, keys that go with it) only if unchanged since seen."""
    txn = Txn()
    for key, revision, extra in records:
        txn.compares.append(cmp_mod(key, revision))
        txn.ops += [op_delete(k) for k in (key, *extra)]
    return txn
