"""Fair share and the SLA boost on the whole stack, REST through Envoy: a saturated pool of two workers running
real 50 ms jobs. Backlogs are built while `holder` jobs keep both workers busy, then the holders are cancelled,
so every tenant is backlogged from the first dispatch on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.launcher import REPO, Stack
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for

FAIRNESS_CONFIG = REPO / "tests" / "fixtures" / "fairness.toml"
WEIGHTS = {"acme": 1, "globex": 2, "initech": 3}
MEASURED = 300  # dispatches counted in the share test
JOB = ["true"]


# Each tenant's count in the first 300 dispatches may differ from its exact share by: 1 job (WFQ's own lag bound
# for unit jobs), plus 2 (the two in-flight slots: a head offered to the scheduler while a dispatch is still
# settling), plus 2 for the holders' release (both workers free within one scheduling cycle). 5 of 300 = 1.7%.
SHARE_TOLERANCE = 5


@pytest.fixture()
def fair_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = start_stack(tmp_path / "fairness", env=dict(FAST_FAILOVER), config=FAIRNESS_CONFIG)
    try:
        api = Api(stack.url, token(stack, "acme"))
        wait_for(
            lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 2,
            what="both static workers to register",
        )
        yield stack
    finally:
        stack.stop()


class Tenant:
    """A tenant's REST session with a kept-alive connection, for submitting hundreds of jobs quickly."""

    def __init__(self, stack: Stack, tenant_id: str):
        self.tenant_id = tenant_id
        self.api = Api(stack.url, token(stack, tenant_id))
        self.http = httpx.Client(
            base_url=stack.url, headers={"Authorization": f"Bearer {self.api.token}"}, timeout=30.0
        )

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post("/api/v1/jobs", json=spec)
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def jobs(self) -> list[dict[str, Any]]:
        resp = self.http.get("/api/v1/jobs", params={"page_size": 500})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert not body.get("next_page_token"), "more than one page of jobs"
        return body.get("jobs", [])  # type: ignore[no-any-return]

    def close(self) -> None:
        self.http.close()


def nanos(stamp: str) -> int:
    """RFC 3339 as protobuf's JSON writes it (0, 3, 6 or 9 fractional digits), to integer nanoseconds."""
    from datetime import datetime

    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    return int(seconds) * 1_000_000_000 + int((fraction or "0").ljust(9, "0")[:9])


def hold_workers(holder: Tenant) -> list[str]:
    """Two long jobs that keep both workers busy until cancelled."""
    held = [holder.submit(job_spec(f"hold-{i}", ["sleep", "60"]))["job_id"] for i in range(2)]
    for job_id in held:
        holder.api.wait_state(job_id, {"JOB_STATE_RUNNING"}, timeout=30)
    return held


def release(holder: Tenant, held: list[str]) -> None:
    for job_id in held:
        assert holder.api.cancel(job_id).status_code == 200


def submit_all(work: list[tuple[Tenant, dict[str, Any]]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(lambda pair: pair[0].submit(pair[1]), work))


def wait_started(tenants: list[Tenant], job_ids: set[str], count: int, timeout: float = 45.0) -> list[dict[str, Any]]:
    """Until `count` of the jobs have started (running or ended); returns those jobs as last listed."""
    seen: list[dict[str, Any]] = []

    def started() -> list[dict[str, Any]] | None:
        seen[:] = [job for tenant in tenants for job in tenant.jobs() if job["job_id"] in job_ids]
        return seen if sum("start_time" in job for job in seen) >= count else None

    try:
        return wait_for(started, timeout=timeout, interval=0.5, what=f"{count} jobs to start")  # type: ignore[no-any-return]
    except AssertionError as exc:
        states = Counter((job["state"], job.get("waiting_reason", "")) for job in seen)
        raise AssertionError(f"{exc}: {dict(states)}") from None


@pytest.fixture()
def tenants(fair_stack: Stack) -> Iterator[dict[str, Tenant]]:
    sessions = {tenant_id: Tenant(fair_stack, tenant_id) for tenant_id in [*WEIGHTS, "holder"]}
    try:
        yield sessions
    finally:
        for session in sessions.values():
            session.close()


def test_tenants_weighted_1_2_3_get_their_shares_of_300_dispatches_on_a_saturated_pool(
    tenants: dict[str, Tenant],
) -> None:
    # A margin beyond each share keeps every tenant backlogged through the 300 measured dispatches.
    backlog = {"acme": 60, "globex": 110, "initech": 160}
    held = hold_workers(tenants["holder"])
    work = [
        (tenants[tenant_id], job_spec(f"{tenant_id}-{i}", JOB))
        for i in range(max(backlog.values()))
        for tenant_id in WEIGHTS
        if i < backlog[tenant_id]
    ]
    submitted = submit_all(work)

    release(tenants["holder"], held)
    jobs = wait_started([tenants[t] for t in WEIGHTS], {job["job_id"] for job in submitted}, MEASURED)

    started = [job for job in jobs if "start_time" in job]
    assert all(job["state"] in {"JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"} for job in started)
    first = sorted(started, key=lambda job: nanos(job["start_time"]))[:MEASURED]
    counts = Counter(job["tenant_id"] for job in first)
    for tenant_id, weight in WEIGHTS.items():
        expected = MEASURED * weight / sum(WEIGHTS.values())
        assert abs(counts[tenant_id] - expected) <= SHARE_TOLERANCE, counts


def test_a_gold_job_submitted_behind_200_batch_jobs_is_boosted_and_starts_within_its_target_wait(
    tenants: dict[str, Tenant],
) -> None:
    acme = tenants["acme"]
    held = hold_workers(tenants["holder"])
    batch = submit_all([(acme, job_spec(f"batch-{i}", JOB, sla_tier="batch")) for i in range(200)])

    gold = acme.submit(job_spec("gold", JOB, sla_tier="gold"))
    queued = acme.api.get(gold["job_id"])
    boosted = wait_for(
        lambda: (job := acme.api.get(gold["job_id"]))["queue_position"] == 1 and job,
        timeout=15,
        interval=0.1,
        what="the gold job to be boosted to the head",
    )
    release(tenants["holder"], held)
    jobs = wait_started([acme], {job["job_id"] for job in [*batch, gold]}, 201)

    # Behind its own tenant's 200 batch jobs, fair queueing alone would run it last.
    assert (queued["queue_position"], queued["waiting_reason"]) == (201, "QUEUED")
    assert boosted["state"] == "JOB_STATE_PENDING"
    done = next(job for job in jobs if job["job_id"] == gold["job_id"])
    assert done["state"] in {"JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"}
    waited = (nanos(done["start_time"]) - nanos(done["create_time"])) / 1e9
    assert waited <= 5.0, f"the gold job waited {waited:.2f}s, its target is 5s"
    assert not done.get("sla_miss", False)
    batch_starts = [nanos(job["start_time"]) for job in jobs if job["spec"]["name"].startswith("batch")]
    assert min(batch_starts) > nanos(done["start_time"])
