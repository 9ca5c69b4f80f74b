"""Durable job records in etcd: create (idempotent), read, list, and the I/O around the transactions that
change them (built in txns.py): read, build, commit, retry when a record moved."""

from __future__ import annotations

import base64
import builtins
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence

from jobmesh.common.v1 import types_pb2 as t
from libs.config import RetryBackoff
from libs.errors import Conflict, FailedPrecondition, InvalidArgument, JobMeshError, NotFound, Unavailable
from libs.etcd.client import Compare, Etcd, KeyValue, RequestOp, TxnResult, op_get
from libs.etcd.informer import next_page_limit
from libs.keys import Keys, safe_segment
from libs.lifecycle import txns
from libs.lifecycle.codec import decode_assignment, decode_job
from libs.lifecycle.transitions import DEFAULT_BACKOFF, TERMINAL
from libs.lifecycle.txns import Completion, Txn

log = logging.getLogger(__name__)


# Records one list call reads at most, whatever the filter matches.
LIST_SCAN_LIMIT = 5000


def _from_token(page_token: str) -> str:
    """The job id a page token continues after; "" for none."""
    if not page_token:
        return ""
    try:
        after = base64.urlsafe_b64decode(page_token.encode()).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token", "is not a token this API returned") from exc
    if not safe_segment(after):
        raise InvalidArgument("page_token", "is not a token this API returned")
    return after


# Commits a transaction (etcd.txn's signature): etcd itself, or a leader's fenced commit.
Commit = Callable[[Sequence[Compare], Sequence[RequestOp], Sequence[RequestOp]], Awaitable[TxnResult]]


class JobStore:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        counted_pools: Collection[str] | None = None,
        backoff: RetryBackoff = DEFAULT_BACKOFF,
        *,
        commit: Commit | None = None,
    ):
        self.etcd = etcd
        self.keys = keys
        # How long a retried job waits before its next attempt (the config's [retries] table).
        self.backoff = backoff
        # How creates and cancels are committed: fenced by its leadership for the queueing service.
        self.commit: Commit = commit or etcd.txn
        # Pools whose workers' job counts matter (a max jobs per worker); None: count on every pool.
        self.counted_pools = None if counted_pools is None else frozenset(counted_pools)

    async def create(self, job: t.Job, fence: int = 0) -> tuple[t.Job, bool, int]:
        """Stores a PENDING job; with an idempotency key already used, returns the first job instead. With
        `fence` (the quota leader term that admitted it), only while that term lasts: UNAVAILABLE
        ADMISSION_FENCED otherwise."""
        txn, owner = txns.create_idempotent(self.keys, job, fence)
        failure = [owner] if owner is not None else []
        failure.append(op_get(self.keys.leader("quota")))
        result = await self.commit(txn.compares, txn.ops, failure)
        if result.succeeded:
            return job, True, result.revision
        kvs = result.range_kvs(0) if owner is not None else []
        if kvs:
            first, revision = await self.get_with_revision(job.tenant_id, kvs[0].value.decode())
            return first, False, revision
        if fence:
            leader = result.range_kvs(len(failure) - 1)
            if not leader or leader[0].create_revision != fence:
                raise Unavailable(
                    "the quota leader that admitted this job no longer leads; reserve again and retry",
                    reason="ADMISSION_FENCED",
                )
        raise Conflict("job id collision, retry")

    async def create_many(
        self, jobs: builtins.list[t.Job], fences: builtins.list[int] | None = None
    ) -> builtins.list[tuple[t.Job, bool, int] | Exception]:
        """Jobs without idempotency keys in one transaction (each with its admission fence, see `create`); if an id
        is taken (astronomically rare) or a fence does not hold, each on its own, so only those fail."""
        fences = fences or [0] * len(jobs)
        txn = txns.create(self.keys, jobs, [f for f in fences if f])
        result = await self.commit(txn.compares, txn.ops, ())
        if result.succeeded:
            return [(job, True, result.revision) for job in jobs]
        outcomes: builtins.list[tuple[t.Job, bool, int] | Exception] = []
        for job, fence in zip(jobs, fences, strict=True):
            try:
                outcomes.append(await self.create(job, fence))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

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

    async def list(
        self, tenant_id: str, state: int, page_size: int, page_token: str, *, newest_first: bool = False
    ) -> tuple[list[t.Job], str]:
        """A page of the tenant's jobs in id order (ids are time-ordered, so oldest first), or newest first. A
        filtered list reads at most LIST_SCAN_LIMIT records per call: a page may then hold fewer jobs than asked,
        with a token to go on (AIP-158), so one request's work is bounded however many records the tenant keeps."""
        prefix = self.keys.tenant_jobs(tenant_id)
        after = _from_token(page_token)
        # The range still to read: [start, end) in key order, read from its far end when newest first.
        start: str | None = None
        end: str | None = None
        if after:
            if newest_first:
                end = prefix + after
            else:
                start = prefix + after + "\0"
        jobs: list[t.Job] = []
        last = ""
        has_more = False
        scanned = 0
        limit = max(page_size * 2, 50)
        while True:
            kvs, _, more = await self.etcd.get_prefix(
                prefix, start=start, end=end, limit=limit, descending=newest_first
            )
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
            if newest_first:
                end = prefix + last
            else:
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
            assign_kv = None
            if job.state == t.JOB_STATE_RUNNING and job.worker_id:
                assign_kv = await self.etcd.get(self.keys.assignment(job.worker_id, job.job_id))
            txn = txns.cancel(self.keys, job, revision, assign_kv, now)
            if (await self.commit(txn.compares, txn.ops, ())).succeeded:
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
            txn, pool = plan
            if (await self.etcd.txn(txn.compares, txn.ops)).succeeded:
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
        plans: dict[int, tuple[Txn, str]] = {}
        touched: set[str] = set()
        alone: builtins.list[int] = []
        for i in sorted(known):
            job_at, assign_kv, worker_kv = known[i]
            plan = self._completion_plan(batch[i], job_at, assign_kv, worker_kv, now)
            if plan is None:
                continue
            # The keys the plan compares are the keys it writes (a worker's record only where its count moves).
            keys = plan[0].keys()
            if keys & touched:
                alone.append(i)  # e.g. the same report twice: the second must see the first's write
                continue
            touched |= keys
            plans[i] = plan
        if plans:
            joined = Txn.join(plan[0] for plan in plans.values())
            if not (await self.etcd.txn(joined.compares, joined.ops)).succeeded:
                alone = sorted([*plans, *alone])
                plans = {}
        outcomes: builtins.list[str | Exception | None] = [
            plans[i][1] if i in plans else None for i in range(len(batch))
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
        return txns.completion_keys(self.keys, done)

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
        held = decode_assignment(assign.value)
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
    ) -> tuple[Txn, str] | None:
        counted = job_at is not None and self._counted(job_at[0].pool_id)
        return txns.complete(self.keys, done, job_at, assign, worker_kv, now, counted=counted, backoff=self.backoff)

    async def reclaim(
        self, worker_id: str, assign_kv: KeyValue, now: float, commit: Callable[[Txn], Awaitable[TxnResult]]
    ) -> t.Job | None:
        """The one way a lost worker's assignment is taken back (its job retried or failed, WORKER_LOST). The
        transaction compares the assignment's and the job's revisions; `commit` adds the caller's fence (the
        leader key for the pool controller, the worker's record for a registration) and commits it. Returns the
        job as written, or None when nothing about the job changed."""
        held = decode_assignment(assign_kv.value)
        job_kv = await self.etcd.get(self.keys.job(held.tenant_id, held.job_id))
        txn, job = txns.reclaim(self.keys, worker_id, assign_kv, job_kv, now, self.backoff)
        result = await commit(txn)
        return job if result.succeeded else None


def _job_at(kv: KeyValue | None) -> tuple[t.Job, int] | None:
    return None if kv is None else (decode_job(kv.value), kv.mod_revision)


def _safe(done: Completion) -> bool:
    return safe_segment(done.job_id) and safe_segment(done.tenant_id) and safe_segment(done.worker_id)
