"""Quota admission on the real stack: exact under concurrency, isolated between tenants, rebuilt after a crash."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.launcher import Stack
from tests.helpers import Api, job_spec, start_stack, token, wait_for

LIVE = {"JOB_STATE_PENDING", "JOB_STATE_RUNNING"}


@pytest.fixture(scope="module")
def qstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("quota-stack"))
    try:
        yield s
    finally:
        s.stop()


def admin_api(stack: Stack) -> Api:
    return Api(stack.url, token(stack, "initech", admin=True))


def set_quota(stack: Stack, tenant: str, **limits: int) -> None:
    resp = admin_api(stack).call("PUT", f"/api/v1/tenants/{tenant}/quotas", json={"limits": limits})
    assert resp.status_code == 200, resp.text


async def flood(stack: Stack, tenant: str, n: int, cpu: int = 100, burst: bool = False) -> list[httpx.Response]:
    """n submits at once; the jobs sleep long enough to stay live while we look."""
    headers = {"Authorization": f"Bearer {token(stack, tenant)}"}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=60, limits=limits) as client:
        spec = job_spec(
            "flood", ["sleep", "120"], resources={"cpu_millis": cpu, "memory_mb": 16}, pool="dynamic-large", burst=burst
        )
        return list(await asyncio.gather(*(client.post("/api/v1/jobs", json=spec) for _ in range(n))))


def live_jobs(api: Api) -> list[dict[str, object]]:
    jobs: list[dict[str, object]] = []
    token_ = ""
    while True:
        params: dict[str, object] = {"page_size": 500}
        if token_:
            params["page_token"] = token_
        body = api.call("GET", "/api/v1/jobs", params=params).json()
        jobs += [j for j in body["jobs"] if j["state"] in LIVE]
        token_ = body["next_page_token"]
        if not token_:
            return jobs


def usage(api: Api, tenant: str) -> dict[str, int]:
    return dict(api.call("GET", f"/api/v1/tenants/{tenant}/quotas").json()["usage"])


def cancel_all(api: Api) -> None:
    for job in live_jobs(api):
        api.cancel(str(job["job_id"]))


def expected_usage(jobs: list[dict[str, object]]) -> dict[str, int]:
    return {
        "cpu_millis": sum(int(j["spec"]["resources"]["cpu_millis"]) for j in jobs),  # type: ignore[index]
        "memory_mb": sum(int(j["spec"]["resources"]["memory_mb"]) for j in jobs),  # type: ignore[index]
        "concurrent_jobs": len(jobs),
    }


def test_two_hundred_concurrent_submits_admit_exactly_what_the_quota_holds(qstack: Stack) -> None:
    api = Api(qstack.url, token(qstack, "acme"))
    set_quota(qstack, "acme", cpu_millis=2000, memory_mb=100_000, concurrent_jobs=1000)  # 20 jobs of 100m
    try:
        answers = asyncio.run(flood(qstack, "acme", 200))
        codes = [r.status_code for r in answers]
        assert codes.count(200) == 20, sorted(set(codes))
        assert codes.count(429) == 180
        refused = next(r for r in answers if r.status_code == 429).json()
        assert refused["details"][0]["reason"] == "QUOTA_EXCEEDED"
        assert refused["details"][0]["metadata"]["limit"] == "cpu_millis"
        live = live_jobs(api)
        assert len(live) == 20
        assert usage(api, "acme") == expected_usage(live)
    finally:
        cancel_all(api)
        set_quota(qstack, "acme", cpu_millis=64000, memory_mb=131072, concurrent_jobs=2000)
    wait_for(lambda: usage(api, "acme")["concurrent_jobs"] == 0, what="usage released after cancel")


def test_one_tenants_flood_never_changes_anothers_admissions(qstack: Stack) -> None:
    acme, globex = Api(qstack.url, token(qstack, "acme")), Api(qstack.url, token(qstack, "globex"))
    set_quota(qstack, "acme", concurrent_jobs=15)
    set_quota(qstack, "globex", concurrent_jobs=7)

    async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
        return await asyncio.gather(flood(qstack, "acme", 120), flood(qstack, "globex", 80))  # type: ignore[return-value]

    try:
        a, g = asyncio.run(both())
        assert [r.status_code for r in a].count(200) == 15
        assert [r.status_code for r in g].count(200) == 7
        assert usage(acme, "acme")["concurrent_jobs"] == 15
        assert usage(globex, "globex")["concurrent_jobs"] == 7
    finally:
        cancel_all(acme)
        cancel_all(globex)
        set_quota(qstack, "acme", concurrent_jobs=2000)
        set_quota(qstack, "globex", concurrent_jobs=2000)


def test_usage_is_rebuilt_after_the_quota_service_is_killed_mid_flood(qstack: Stack) -> None:
    api = Api(qstack.url, token(qstack, "acme"))
    set_quota(qstack, "acme", concurrent_jobs=40)
    try:

        async def flood_and_kill() -> list[httpx.Response]:
            task = asyncio.ensure_future(flood(qstack, "acme", 100))
            await asyncio.sleep(0.15)
            qstack.kill(leader)
            return await task

        leader = qstack.wait_leader("quota")
        answers = asyncio.run(flood_and_kill())
        qstack.restart(leader)
        qstack.wait_leader("quota")
        accepted = {r.json()["job_id"] for r in answers if r.status_code == 200}
        assert all(r.status_code in (200, 429, 503) for r in answers), {r.status_code for r in answers}
        live = live_jobs(api)
        assert accepted <= {str(j["job_id"]) for j in live}  # no accepted job lost
        assert len(live) <= 40
        assert usage(api, "acme") == expected_usage(live)  # no drift, no leaked reservation
        # Admission carries on from the rebuilt usage.
        more = asyncio.run(flood(qstack, "acme", 60))
        assert [r.status_code for r in more].count(200) == 40 - len(live)
    finally:
        cancel_all(api)
        set_quota(qstack, "acme", concurrent_jobs=2000)


def test_usage_is_released_exactly_once_whatever_the_end(qstack: Stack, tmp_path: Path) -> None:
    api = Api(qstack.url, token(qstack, "globex"))
    jobs = [
        api.submit(job_spec("ok", ["true"])),
        api.submit(job_spec("fails", ["false"])),
        api.submit(job_spec("times-out", ["sleep", "30"], max_runtime_seconds=1)),
        api.submit(job_spec("cancelled", ["sleep", "30"])),
    ]
    api.wait_state(jobs[3]["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    api.cancel(jobs[3]["job_id"])
    for job in jobs:
        api.wait_terminal(job["job_id"], timeout=60)
    wait_for(lambda: usage(api, "globex") == expected_usage(live_jobs(api)), what="usage to settle")
    assert usage(api, "globex")["concurrent_jobs"] == len(live_jobs(api))


def test_burst_sessions_never_grant_more_than_the_pool_holds_and_expire_on_time(qstack: Stack) -> None:
    # The fixture's burst pool: 4000m CPU, 8192 MB, 10 jobs.
    async def ask(tenant: str, cpu: int, seconds: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token(qstack, tenant)}"}
        async with httpx.AsyncClient(base_url=qstack.url, headers=headers, timeout=30) as client:
            body = {"cpu_millis": cpu, "memory_mb": 1024, "concurrent_jobs": 2, "duration_seconds": seconds}
            return await client.post(f"/api/v1/tenants/{tenant}/burst", json=body)

    async def race() -> list[httpx.Response]:
        return list(await asyncio.gather(ask("acme", 3000, 3), ask("globex", 3000, 3)))

    # Beyond one tenant's share (75% here) is refused, naming the cap, whatever is free.
    capped = asyncio.run(ask("initech", 3500, 3))
    assert capped.status_code == 429
    assert capped.json()["details"][0]["metadata"]["tenant_cap_cpu_millis"] == "3000"

    answers = asyncio.run(race())
    granted = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(granted) == 1 and len(refused) == 1, [r.text for r in answers]
    assert refused[0].json()["details"][0]["reason"] == "BURST_UNAVAILABLE"
    session = granted[0].json()
    winner = session["tenant_id"]
    loser = "globex" if winner == "acme" else "acme"
    # The loser gets exactly what is left.
    exact = asyncio.run(ask(loser, 1000, 3))
    assert exact.status_code == 200, exact.text
    assert asyncio.run(ask("initech", 1, 3)).status_code == 429
    quota = Api(qstack.url, token(qstack, winner)).call("GET", f"/api/v1/tenants/{winner}/quotas").json()
    assert quota["burst"]["session_id"] == session["session_id"]
    # Expiry: gone within a second of expire_time.
    from datetime import datetime

    expire = datetime.fromisoformat(session["expire_time"].replace("Z", "+00:00")).timestamp()
    wait_for(
        lambda: (
            "burst" not in Api(qstack.url, token(qstack, winner)).call("GET", f"/api/v1/tenants/{winner}/quotas").json()
        ),
        timeout=10,
        interval=0.05,
        what="the session to expire",
    )
    assert time.time() - expire < 1.0


def test_a_burst_submit_beyond_the_quota_is_refused_when_the_burst_pool_is_spent(qstack: Stack) -> None:
    def session_of(tenant: str) -> dict[str, object] | None:
        quota = Api(qstack.url, token(qstack, tenant)).call("GET", f"/api/v1/tenants/{tenant}/quotas").json()
        return quota.get("burst")  # type: ignore[no-any-return]

    wait_for(lambda: session_of("acme") is None and session_of("globex") is None, what="earlier sessions to end")
    # acme and globex hold the whole burst pool (4000m CPU) between them for a few seconds.
    for tenant, cpu in (("acme", 3000), ("globex", 1000)):
        body = {"cpu_millis": cpu, "memory_mb": 1024, "concurrent_jobs": 1, "duration_seconds": 5}
        granted = Api(qstack.url, token(qstack, tenant)).call("POST", f"/api/v1/tenants/{tenant}/burst", json=body)
        assert granted.status_code == 200, granted.text
    api = Api(qstack.url, token(qstack, "initech"))
    set_quota(qstack, "initech", concurrent_jobs=1)
    try:
        holder = api.submit(job_spec("holder", ["sleep", "1"]))

        refused = api.call("POST", "/api/v1/jobs", json=job_spec("burst", ["true"], burst=True))

        assert refused.status_code == 429, refused.text
        assert refused.json()["details"][0]["reason"] == "BURST_UNAVAILABLE"
        assert session_of("initech") is None  # nothing was opened
        api.wait_terminal(holder["job_id"])
    finally:
        set_quota(qstack, "initech", concurrent_jobs=2000)
    # The pool is free again for the tests after this one.
    wait_for(lambda: session_of("acme") is None and session_of("globex") is None, what="the sessions to end")


def test_a_burst_job_beyond_the_quota_runs_on_the_session_and_is_audited(qstack: Stack) -> None:
    api = Api(qstack.url, token(qstack, "initech"))
    set_quota(qstack, "initech", concurrent_jobs=1)
    try:
        holder = api.submit(job_spec("holder", ["sleep", "5"]))
        resp = api.call(
            "POST",
            "/api/v1/tenants/initech/burst",
            json={"cpu_millis": 500, "memory_mb": 512, "concurrent_jobs": 1, "duration_seconds": 60},
        )
        assert resp.status_code == 200, resp.text
        session = resp.json()
        assert api.call("POST", "/api/v1/jobs", json=job_spec("plain", ["true"])).status_code == 429
        extra = api.submit(job_spec("extra", ["sleep", "0.5"], burst=True))
        assert extra["burst_session_id"] == session["session_id"]
        done = api.wait_terminal(extra["job_id"])
        assert done["state"] == "JOB_STATE_SUCCEEDED"
        cost = wait_for(lambda: api.get(extra["job_id"]).get("cost", {}).get("attempts"), what="the charge")
        assert cost[0]["burst"] is True
        quota = api.call("GET", "/api/v1/tenants/initech/quotas").json()
        audit = quota["burst_sessions"]
        assert audit[0]["session_id"] == session["session_id"]
        assert audit[0]["requested_by"] == "dev-user@initech"
        assert audit[0]["cpu_millis"] == 500
        api.wait_terminal(holder["job_id"])
    finally:
        set_quota(qstack, "initech", concurrent_jobs=2000)


def test_a_burst_submit_beyond_the_quota_opens_a_session_that_concurrent_ones_join(qstack: Stack) -> None:
    api = Api(qstack.url, token(qstack, "globex"))
    set_quota(qstack, "globex", concurrent_jobs=1)
    try:
        holder = api.submit(job_spec("holder", ["sleep", "3"]))
        assert api.call("POST", "/api/v1/jobs", json=job_spec("plain", ["true"])).status_code == 429

        async def two() -> list[httpx.Response]:
            headers = {"Authorization": f"Bearer {token(qstack, 'globex')}"}
            async with httpx.AsyncClient(base_url=qstack.url, headers=headers, timeout=30) as client:
                asks = [client.post("/api/v1/jobs", json=job_spec(f"b{i}", ["true"], burst=True)) for i in range(2)]
                return list(await asyncio.gather(*asks))

        answers = asyncio.run(two())
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        sessions = {r.json()["burst_session_id"] for r in answers}
        assert len(sessions) == 1 and "" not in sessions
        quota = api.call("GET", "/api/v1/tenants/globex/quotas").json()
        assert quota["burst"]["session_id"] in sessions
        assert quota["burst"]["requested_by"] == "submit"
        assert quota["burst_sessions"][0]["session_id"] in sessions
        # Sized at the tenant's share of the pool (75% of 4000m here), or what was left of it.
        assert 0 < quota["burst"]["cpu_millis"] <= 3000
        for r in answers:
            assert api.wait_terminal(r.json()["job_id"])["state"] == "JOB_STATE_SUCCEEDED"
        api.wait_terminal(holder["job_id"])
    finally:
        set_quota(qstack, "globex", concurrent_jobs=2000)
