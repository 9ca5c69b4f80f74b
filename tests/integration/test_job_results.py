"""Recording workers' results over a real etcd (libs/lifecycle/store.py): many reports in one transaction, each
report still exactly-once, stale ones refused, and job counts kept only where a pool limits them."""

from __future__ import annotations

import time

import pytest

from jobmesh.common.v1 import types_pb2 as t
from libs.etcd.client import Etcd, KeyValue, op_put
from libs.jobs import new_job_id, ts
from libs.keys import Keys
from libs.lifecycle.codec import decode_job
from libs.lifecycle.store import JobStore
from libs.lifecycle.transitions import apply_dispatch
from libs.lifecycle.txns import Completion

KEYS = Keys("/jobmesh")
OK = {"exit_code": 0, "reason": "EXITED", "message": "exit code 0", "cpu_seconds": 0.01, "max_memory_mb": 1}


async def running(etcd: Etcd, worker_id: str, pool_id: str) -> t.Job:
    """A job RUNNING on a registered worker, with its assignment, as the scheduler leaves them."""
    now = time.time()
    worker = t.Worker(worker_id=worker_id, pool_id=pool_id, state=t.WORKER_STATE_IDLE)
    job = t.Job(job_id=new_job_id(now), tenant_id="acme", state=t.JOB_STATE_PENDING, create_time=ts(now))
    job.spec.name = "j"
    job.spec.max_retries = 1
    apply_dispatch(job, worker, now)
    assignment = t.Assignment(job_id=job.job_id, tenant_id="acme", attempt=job.attempt, worker_id=worker_id, job=job)
    await etcd.txn(
        [],
        [
            op_put(KEYS.job("acme", job.job_id), job.SerializeToString()),
            op_put(KEYS.assignment(worker_id, job.job_id), assignment.SerializeToString()),
            op_put(KEYS.worker(worker_id), worker.SerializeToString()),
        ],
    )
    return job


async def jobs_run(etcd: Etcd, *worker_ids: str) -> list[int]:
    """Each worker's count of jobs run, as its record says."""
    kvs, _ = await etcd.get_many([KEYS.worker(w) for w in worker_ids])
    counts = []
    for kv in kvs:
        assert kv is not None
        worker = t.Worker()
        worker.ParseFromString(kv.value)
        counts.append(worker.jobs_run)
    return counts


def report(job: t.Job, attempt: int | None = None) -> Completion:
    return Completion(job.tenant_id, job.job_id, job.attempt if attempt is None else attempt, job.worker_id, OK)


@pytest.mark.asyncio
async def test_a_batch_of_reports_lands_in_one_transaction_and_each_counts_once(etcd: Etcd) -> None:
    store = JobStore(etcd, KEYS, counted_pools=["limited"])
    a = await running(etcd, "w-a", "limited")
    b = await running(etcd, "w-b", "unlimited")
    c = await running(etcd, "w-c", "unlimited")
    _, before = await etcd.get_many([KEYS.job("acme", a.job_id)])

    outcomes = await store.complete_attempts(
        [report(a), report(b), report(c, attempt=c.attempt + 1), report(b), report(c)], time.time()
    )

    # The stale attempt and the repeated report are refused; the others are recorded.
    assert outcomes == ["limited", "unlimited", None, None, "unlimited"]
    (ja, jb, jc), after = await etcd.get_many([KEYS.job("acme", j.job_id) for j in (a, b, c)])
    assert [decode_job(kv.value).state for kv in (ja, jb, jc) if kv] == [t.JOB_STATE_SUCCEEDED] * 3
    assert ja is not None and jb is not None and ja.mod_revision == jb.mod_revision  # one transaction
    assert after > before
    assignments, _, _ = await etcd.get_prefix(KEYS.assignments)
    assert assignments == []
    assert await jobs_run(etcd, "w-a", "w-b") == [1, 0]  # only the pool with a max jobs per worker counts


@pytest.mark.asyncio
async def test_reports_of_two_jobs_on_one_worker_share_a_transaction_unless_its_count_moves(etcd: Etcd) -> None:
    store = JobStore(etcd, KEYS, counted_pools=["limited"])
    shared = [await running(etcd, "w-slots", "unlimited") for _ in range(2)]

    assert await store.complete_attempts([report(j) for j in shared], time.time()) == ["unlimited"] * 2
    kvs, _ = await etcd.get_many([KEYS.job("acme", j.job_id) for j in shared])
    assert len({kv.mod_revision for kv in kvs if kv}) == 1  # one transaction: the worker's record is not written

    # Where a pool counts jobs per worker, both write the worker's count: the second goes after the first.
    counted = [await running(etcd, "w-counted", "limited") for _ in range(2)]
    assert await store.complete_attempts([report(j) for j in counted], time.time()) == ["limited"] * 2
    assert await jobs_run(etcd, "w-counted") == [2]


@pytest.mark.asyncio
async def test_a_report_repeated_after_it_landed_is_refused(etcd: Etcd) -> None:
    store = JobStore(etcd, KEYS)
    job = await running(etcd, "w-1", "p")

    assert await store.complete_attempts([report(job)], time.time()) == ["p"]
    assert await store.complete_attempts([report(job)], time.time()) == [None]
    assert await store.complete_attempt(job.tenant_id, job.job_id, job.attempt, "w-1", time.time(), **OK) is None


@pytest.mark.asyncio
async def test_a_result_from_an_unhealthy_worker_drains_it_in_the_same_transaction(etcd: Etcd) -> None:
    store = JobStore(etcd, KEYS, counted_pools=[])
    job = await running(etcd, "w-sick", "p")
    sick = Completion(job.tenant_id, job.job_id, job.attempt, "w-sick", OK, unhealthy="health check exited 1")

    assert await store.complete_attempts([sick], time.time()) == ["p"]

    (job_kv, worker_kv), _ = await etcd.get_many([KEYS.job("acme", job.job_id), KEYS.worker("w-sick")])
    assert job_kv is not None and worker_kv is not None
    worker = t.Worker()
    worker.ParseFromString(worker_kv.value)
    assert worker.state == t.WORKER_STATE_DRAINING
    assert worker_kv.mod_revision == job_kv.mod_revision


class CountingReads:
    """The real client, counting the reads a store makes through it."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.reads = 0

    async def get_many(self, keys: list[str]) -> tuple[list[KeyValue | None], int]:
        self.reads += 1
        return await self.etcd.get_many(keys)

    def __getattr__(self, name: str) -> object:
        return getattr(self.etcd, name)


async def watch_cache(etcd: Etcd, *worker_ids: str) -> dict[str, KeyValue]:
    """What the pool-manager's assignment and worker caches hold right now."""
    held: list[KeyValue | None] = []
    for worker_id in worker_ids:
        held += (await etcd.get_prefix(KEYS.worker_assignments(worker_id)))[0]
    kvs, _ = await etcd.get_many([KEYS.worker(w) for w in worker_ids])
    return {kv.key: kv for kv in [*held, *kvs] if kv is not None}


@pytest.mark.asyncio
async def test_reports_are_recorded_from_the_cached_assignments_without_a_read(etcd: Etcd) -> None:
    counting = CountingReads(etcd)
    store = JobStore(counting, KEYS, counted_pools=["limited"])  # type: ignore[arg-type]
    a = await running(etcd, "w-a", "limited")
    b = await running(etcd, "w-b", "unlimited")
    cache = await watch_cache(etcd, "w-a", "w-b")

    outcomes = await store.complete_attempts([report(a), report(b)], time.time(), cached=cache.get)

    assert outcomes == ["limited", "unlimited"]
    assert counting.reads == 0
    (ja, jb), _ = await etcd.get_many([KEYS.job("acme", a.job_id), KEYS.job("acme", b.job_id)])
    assert ja is not None and jb is not None
    assert [decode_job(kv.value).state for kv in (ja, jb)] == [t.JOB_STATE_SUCCEEDED] * 2
    assert await jobs_run(etcd, "w-a") == [1]


@pytest.mark.asyncio
async def test_a_cache_that_is_behind_the_job_is_caught_and_the_report_read_afresh(etcd: Etcd) -> None:
    store = JobStore(etcd, KEYS)
    job = await running(etcd, "w-1", "p")
    cache = await watch_cache(etcd, "w-1")
    cancelled = await store.cancel("acme", job.job_id, time.time())  # the cache has not seen it yet

    assert await store.complete_attempts([report(job)], time.time(), cached=cache.get) == [None]

    after = await store.get("acme", job.job_id)
    assert after.state == t.JOB_STATE_CANCELLED == cancelled.state
