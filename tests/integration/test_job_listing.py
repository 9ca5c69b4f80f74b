"""Listing a tenant's jobs on real etcd: a filtered list reads a bounded number of records per call and carries on
with a page token, so a request's work is bounded however many records the tenant keeps; nothing is skipped."""

from __future__ import annotations

import time

import pytest

from jobmesh.common.v1 import types_pb2 as t
from libs.etcd.client import Etcd, op_put
from libs.jobs import new_job_id, ts
from libs.keys import Keys
from libs.lifecycle import store as jobstore
from libs.lifecycle.store import JobStore

KEYS = Keys("/jobmesh")


async def store_jobs(etcd: Etcd, states: list[int]) -> list[str]:
    ids = []
    now = time.time()
    ops = []
    for i, state in enumerate(states):
        job = t.Job(job_id=new_job_id(now + i / 1000), tenant_id="acme", state=state, create_time=ts(now))
        job.spec.name = f"j{i}"
        ids.append(job.job_id)
        ops.append(op_put(KEYS.job("acme", job.job_id), job.SerializeToString()))
    for first in range(0, len(ops), 100):
        await etcd.txn([], ops[first : first + 100])
    return ids


@pytest.mark.asyncio
async def test_a_filtered_list_is_bounded_per_call_and_pages_on_to_every_match(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobstore, "LIST_SCAN_LIMIT", 100)
    states = [t.JOB_STATE_SUCCEEDED] * 250
    states[5] = states[180] = states[249] = t.JOB_STATE_PENDING
    ids = await store_jobs(etcd, states)
    store = JobStore(etcd, KEYS)

    found: list[str] = []
    token = ""
    calls = 0
    while True:
        calls += 1
        jobs, token = await store.list("acme", t.JOB_STATE_PENDING, 10, token)
        found += [j.job_id for j in jobs]
        if not token:
            break
        assert calls < 10
    assert found == [ids[5], ids[180], ids[249]]
    assert calls == 3  # 250 records read 100 at a time, at most


@pytest.mark.asyncio
async def test_an_unfiltered_list_fills_its_pages(etcd: Etcd) -> None:
    ids = await store_jobs(etcd, [t.JOB_STATE_SUCCEEDED] * 25)
    store = JobStore(etcd, KEYS)
    jobs, token = await store.list("acme", 0, 20, "")
    assert [j.job_id for j in jobs] == ids[:20] and token
    jobs, token = await store.list("acme", 0, 20, token)
    assert [j.job_id for j in jobs] == ids[20:] and not token


@pytest.mark.asyncio
async def test_newest_first_pages_walk_back_through_every_job_and_filters_apply(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobstore, "LIST_SCAN_LIMIT", 100)
    states = [t.JOB_STATE_SUCCEEDED] * 130
    states[3] = states[120] = t.JOB_STATE_PENDING
    ids = await store_jobs(etcd, states)
    store = JobStore(etcd, KEYS)

    seen: list[str] = []
    token = ""
    for _ in range(10):
        jobs, token = await store.list("acme", 0, 50, token, newest_first=True)
        seen += [j.job_id for j in jobs]
        if not token:
            break
    assert seen == ids[::-1]

    pending: list[str] = []
    token = ""
    for _ in range(10):
        jobs, token = await store.list("acme", t.JOB_STATE_PENDING, 10, token, newest_first=True)
        pending += [j.job_id for j in jobs]
        if not token:
            break
    assert pending == [ids[120], ids[3]]
