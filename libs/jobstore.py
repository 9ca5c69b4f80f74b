"""Durable job records in etcd: create (idempotent), read, list, and state transitions as transactions."""

from __future__ import annotations

import base64
import builtins
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from jobmesh.common.v1 import types_pb2 as t
from libs.errors import Conflict, FailedPrecondition, InvalidArgument, JobMeshError, NotFound
from libs.etcd.client import Compare, Etcd, KeyValue, RequestOp, cmp_missing, cmp_mod, op_delete, op_get, op_put
from libs.etcd.informer import next_page_limit
from libs.jobs import TERMINAL, apply_result, apply_worker_lost, decode_job, ts
from libs.keys import Keys, safe_segment

log = logging.getLogger(__name__)


# Records one list call reads at most, whatever the filter matches.
LIST_SCAN_LIMIT = 5000


@dataclass(frozen=True)
class Completion:
    """A worker's report of how one attempt ended."""

    tenant_id: str
    job_id: str
    attempt: int
    worker_id: str
    result: dict[str, object]
    unhealthy: str = ""  # the worker failed its health check: drain it in the same transaction


class JobStore:
    def __init__(self, etcd: Etcd, keys: Keys, counted_pools: Collection[str] | None = None):
        self.etcd = etcd
        self.keys = keys
        # Pools whose workers' job counts matter (a max jobs per worker); None: count on every pool.
        self.counted_pools = None if counted_pools is None else frozenset(counted_pools)

    async def create(self, job: t.Job) -> tuple[t.Job, bool, int]:
        """Stores a PENDING job; with an idempotency key already used, returns the first job instead."""
        key = self.keys.job(job.tenant_id, job.job_id)
        ops = [op_put(key, job.SerializeToString()), op_put(self.keys.job_index(job.job_id), job.tenant_id.encode())]
        compares = [cmp_missing(key)]
        idem = job.spec.idempotency_key
        if idem:
            idem_key = self.keys.idempotency(job.tenant_id, idem)
            compares.append(cmp_missing(idem_key))
            ops.append(op_put(idem_key, job.job_id.encode()))
            result = await self.etcd.txn(compares, ops, [op_get(idem_key)])
            if not result.succeeded:
                kvs = result.range_kvs(0)
                if kvs:
                    first, revision = await self.get_with_revision(job.tenant_id, kvs[0].value.decode())
                    return first, False, revision
                raise Conflict("job id collision, retry")
            return job, True, result.revision
        result = await self.etcd.txn(compares, ops)
        if not result.succeeded:
            raise Conflict("job id collision, retry")
        return job, True, result.revision

    async def get_with_revision(self, tenant_id: str, job_id: str) -> tuple[t.Job, int]:
        if not safe_segment(job_id):
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
        if not tenant_id:
            index = await self.etcd.get(self.keys.job_index(job_id))
            if index is None:
                raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
            tenant_id = index.value.decode()
        kv = await self.etcd.get(self.keys.job(tenant_id, job_id))
        if kv is None:
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
        return decode_job(kv.value), kv.mod_revision

    async def get(self, tenant_id: str, job_id: str) -> t.Job:
        return (await self.get_with_revision(tenant_id, job_id))[0]

    async def list(self, tenant_id: str, state: int, page_size: int, page_token: str) -> tuple[list[t.Job], str]:
        """Newest first is what people want, but ids sort oldest first; we page oldest first, stably. A filtered
        list reads at most LIST_SCAN_LIMIT records per call: a page may then hold fewer jobs than asked, with a
        token to go on (AIP-158), so one request's work is bounded however many records the tenant keeps."""
        prefix = self.keys.tenant_jobs(tenant_id)
        start = None
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidArgument("page_token", "is not a token this API returned") from exc
            if not safe_segment(after):
                raise InvalidArgument("page_token", "is not a token this API returned")
            start = prefix + after + "\0"
        jobs: list[t.Job] = []
        last = ""
        has_more = False
        scanned = 0
        limit = max(page_size * 2, 50)
        while True:
            kvs, _, more = await self.etcd.get_prefix(prefix, start=start, limit=limit)
            for i, kv in enumerate(kvs):
                job = decode_job(kv.value)
                last = Keys.last_segment(kv.key)
                scanned += 1
                if not state or job.state == state:
                    jobs.append(job)
                if len(jobs) == page_size or scanned >= LIST_SCAN_LIMIT:
                    has_more = more or i < len(kvs) - 1
                    break
            if len(jobs) == page_size or scanned >= LIST_SCAN_LIMIT or not more or not kvs:
                break
            start = prefix + last + "\0"
            limit = min(next_page_limit(max(len(kv.value) for kv in kvs)), max(page_size * 2, 50))
        token = base64.urlsafe_b64encode(last.encode()).decode() if has_more else ""
        return jobs, token

    async def cancel(self, tenant_id: str, job_id: str, now: float) -> t.Job:
        for _ in range(10):
            job, revision = await self.get_with_revision(tenant_id, job_id)
            if job.state in TERMINAL:
                raise FailedPrecondition(
                    f"job {job_id} already ended ({t.JobState.Name(job.state)})", reason="JOB_FINISHED"
                )
            key = self.keys.job(job.tenant_id, job.job_id)
            compares = [cmp_mod(key, revision)]
            ops = []
            if job.state == t.JOB_STATE_RUNNING and job.worker_id:
                assign_key = self.keys.assignment(job.worker_id, job.job_id)
                assign = await self.etcd.get(assign_key)
                if assign is not None:
                    held = t.Assignment()
                    held.ParseFromString(assign.value)
                    if held.job_id == job.job_id:
                        # Withdrawing the assignment is what tells the worker to kill the job.
                        compares.append(cmp_mod(assign_key, assign.mod_revision))
                        ops.append(op_delete(assign_key))
                for record in job.attempts:
                    if record.attempt == job.attempt and not record.HasField("end_time"):
                        record.end_time.CopyFrom(ts(now))
                        record.reason = "CANCELLED"
            job.state = t.JOB_STATE_CANCELLED
            job.reason = "CANCELLED_BY_USER"
            job.message = "cancelled by request"
            job.end_time.CopyFrom(ts(now))
            job.update_time.CopyFrom(ts(now))
            job.waiting_reason = ""
            ops.append(op_put(key, job.SerializeToString()))
            result = await self.etcd.txn(compares, ops)
            if result.succeeded:
                return job
        raise Conflict(f"job {job_id} kept changing; retry the cancel")

    async def complete_attempt(
        self,
        tenant_id: str,
        job_id: str,
        attempt: int,
        worker_id: str,
        now: float,
        unhealthy: str = "",
        **result: object,
    ) -> str | None:
        """Records a worker's result and returns the job's pool; None when the result is stale (another attempt,
        or the job already ended)."""
        done = Completion(tenant_id, job_id, attempt, worker_id, result, unhealthy)
        if not _safe(done):
            return None
        for _ in range(10):
            (job_kv, assign_kv, worker_kv), _ = await self.etcd.get_many(self._completion_keys(done))
            plan = self._completion_plan(done, _job_at(job_kv), assign_kv, worker_kv, now)
            if plan is None:
                return None
            compares, ops, pool = plan
            if (await self.etcd.txn(compares, ops)).succeeded:
                return pool
        raise Conflict(f"job {job_id} kept changing while recording its result")

    async def complete_attempts(
        self,
        batch: builtins.list[Completion],
        now: float,
        cached: Callable[[str], KeyValue | None] | None = None,
    ) -> builtins.list[str | Exception | None]:
        """`complete_attempt` for many reports with at most one read and one transaction; when anything moved
        under it (or two reports touch the same keys), each report goes on its own, and one that fails then comes
        back as its exception without failing the others.

        With `cached` (a watch cache of assignments and workers), a report whose assignment is in the cache is
        recorded from the job the assignment carries, without a read; the transaction's compares catch a cache
        that is behind, and the report is then read afresh."""
        known: dict[int, tuple[tuple[t.Job, int] | None, KeyValue | None, KeyValue | None]] = {}
        unread: dict[int, builtins.list[str]] = {}
        for i, c in enumerate(batch):
            if not _safe(c):
                continue
            hit = self._from_cache(c, cached) if cached is not None else None
            if hit is not None:
                known[i] = hit
            else:
                unread[i] = self._completion_keys(c)
        if unread:
            kvs, _ = await self.etcd.get_many([key for keys in unread.values() for key in keys])
            for n, i in enumerate(unread):
                job_kv, assign_kv, worker_kv = kvs[3 * n : 3 * n + 3]
                known[i] = (_job_at(job_kv), assign_kv, worker_kv)
        plans: dict[int, tuple[builtins.list[Compare], builtins.list[RequestOp], str]] = {}
        touched: set[str] = set()
        alone: builtins.list[int] = []
        for i in sorted(known):
            job_at, assign_kv, worker_kv = known[i]
            plan = self._completion_plan(batch[i], job_at, assign_kv, worker_kv, now)
            if plan is None:
                continue
            # The keys the plan compares are the keys it writes (a worker's record only where its count moves).
            keys = {c.key.decode() for c in plan[0]}
            if keys & touched:
                alone.append(i)  # e.g. the same report twice: the second must see the first's write
                continue
            touched |= keys
            plans[i] = plan
        if plans:
            compares = [c for plan in plans.values() for c in plan[0]]
            ops = [op for plan in plans.values() for op in plan[1]]
            if not (await self.etcd.txn(compares, ops)).succeeded:
                alone = sorted([*plans, *alone])
                plans = {}
        outcomes: builtins.list[str | Exception | None] = [
            plans[i][2] if i in plans else None for i in range(len(batch))
        ]
        for i in alone:
            c = batch[i]
            try:
                outcomes[i] = await self.complete_attempt(
                    c.tenant_id, c.job_id, c.attempt, c.worker_id, now, c.unhealthy, **c.result
                )
            except JobMeshError as exc:
                outcomes[i] = exc
        return outcomes

    def _completion_keys(self, done: Completion) -> builtins.list[str]:
        return [
            self.keys.job(done.tenant_id, done.job_id),
            self.keys.assignment(done.worker_id, done.job_id),
            self.keys.worker(done.worker_id),
        ]

    def _counted(self, pool_id: str) -> bool:
        return self.counted_pools is None or pool_id in self.counted_pools

    def _from_cache(
        self, done: Completion, cached: Callable[[str], KeyValue | None]
    ) -> tuple[tuple[t.Job, int], KeyValue, KeyValue | None] | None:
        """(the job at its dispatch revision, the assignment, the worker if the result changes it) from the
        cache; None when the cache cannot say (then the keys are read)."""
        _, assign_key, worker_key = self._completion_keys(done)
        assign = cached(assign_key)
        if assign is None:
            return None
        held = t.Assignment()
        held.ParseFromString(assign.value)
        if held.job_id != done.job_id or held.attempt != done.attempt or not held.HasField("job"):
            return None
        worker_kv = None
        if self._counted(held.job.pool_id) or done.unhealthy:
            worker_kv = cached(worker_key)
            if worker_kv is None:
                return None
        # The dispatch wrote the job and the assignment in one transaction: the job is at the same revision.
        return (held.job, assign.mod_revision), assign, worker_kv

    def _completion_plan(
        self,
        done: Completion,
        job_at: tuple[t.Job, int] | None,
        assign: KeyValue | None,
        worker_kv: KeyValue | None,
        now: float,
    ) -> tuple[builtins.list[Compare], builtins.list[RequestOp], str] | None:
        """The transaction that records the result, or None when the report is stale. `job_at` is the job record
        and its mod revision."""
        if job_at is None:
            return None
        job, revision = job_at
        if job.state != t.JOB_STATE_RUNNING or job.attempt != done.attempt or job.worker_id != done.worker_id:
            return None
        key, assign_key, worker_key = self._completion_keys(done)
        compares = [cmp_mod(key, revision)]
        ops = [op_put(key, apply_result(job, now=now, **done.result).SerializeToString())]  # type: ignore[arg-type]
        if assign is not None:
            held = t.Assignment()
            held.ParseFromString(assign.value)
            if held.job_id == done.job_id and held.attempt == done.attempt:
                compares.append(cmp_mod(assign_key, assign.mod_revision))
                ops.append(op_delete(assign_key))
        # Where a pool limits jobs per worker, the worker's count moves in the same transaction that frees it,
        # so a worker at its limit is never seen idle with a stale count.
        counted = self._counted(job.pool_id)
        if worker_kv is not None and (counted or done.unhealthy):
            worker = t.Worker()
            worker.ParseFromString(worker_kv.value)
            if counted:
                worker.jobs_run += 1
            if done.unhealthy:
                # Freed and drained at once, so the scheduler never sees it idle and healthy.
                worker.state = t.WORKER_STATE_DRAINING
            compares.append(cmp_mod(worker_key, worker_kv.mod_revision))
            ops.append(op_put(worker_key, worker.SerializeToString(), worker_kv.lease))
        return compares, ops, job.pool_id

    async def reclaim_plan(
        self, worker_id: str, assign_kv: KeyValue, now: float
    ) -> tuple[builtins.list[Compare], builtins.list[RequestOp], t.Job | None]:
        """The transaction that takes a lost worker's assignment back: its job retried or failed (WORKER_LOST).

        Safe on its own: it compares the assignment's and the job's revisions, so it changes nothing if either
        moved. Returns (compares, ops, the job as it will be written or None when the job had moved on)."""
        assignment = t.Assignment()
        assignment.ParseFromString(assign_kv.value)
        assign_key = assign_kv.key
        compares = [cmp_mod(assign_key, assign_kv.mod_revision)]
        ops = [op_delete(assign_key)]
        job_key = self.keys.job(assignment.tenant_id, assignment.job_id)
        job_kv = await self.etcd.get(job_key)
        if job_kv is None:
            return compares, ops, None
        job = decode_job(job_kv.value)
        if job.state != t.JOB_STATE_RUNNING or job.attempt != assignment.attempt or job.worker_id != worker_id:
            return compares, ops, None
        apply_worker_lost(job, now)
        compares.append(cmp_mod(job_key, job_kv.mod_revision))
        ops.append(op_put(job_key, job.SerializeToString()))
        return compares, ops, job


def _job_at(kv: KeyValue | None) -> tuple[t.Job, int] | None:
    return None if kv is None else (decode_job(kv.value), kv.mod_revision)


def _safe(done: Completion) -> bool:
    return safe_segment(done.job_id) and safe_segment(done.tenant_id) and safe_segment(done.worker_id)
