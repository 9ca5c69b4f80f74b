"""Large but valid specs on the real stack: batches are bounded in bytes, so a burst of near-limit specs from one
tenant neither fails its own submits nor the small ones another tenant sends at the same moment."""

from __future__ import annotations

import asyncio

import httpx

from devtools.launcher import Stack
from tests.helpers import Api, job_spec, token


def test_near_limit_specs_beside_tiny_ones_are_all_accepted_and_run(stack: Stack) -> None:
    # ~60 KiB each: 30 of them in one enqueue batch or one transaction would be ~1.8 MiB, over etcd's 1.5 MiB.
    big_env = {f"V{i}": "x" * 2000 for i in range(30)}

    async def submit_all() -> list[httpx.Response]:
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=60, headers=_auth(stack, "acme")) as acme,
            httpx.AsyncClient(base_url=stack.url, timeout=60, headers=_auth(stack, "globex")) as globex,
        ):
            big = [acme.post("/api/v1/jobs", json=job_spec(f"big-{i}", ["true"], env=big_env)) for i in range(40)]
            tiny = [globex.post("/api/v1/jobs", json=job_spec(f"tiny-{i}", ["true"])) for i in range(10)]
            return list(await asyncio.gather(*big, *tiny))

    answers = asyncio.run(submit_all())

    assert [r.status_code for r in answers] == [200] * 50, [r.text[:200] for r in answers if r.status_code != 200]
    apis = {"acme": Api(stack.url, token(stack, "acme")), "globex": Api(stack.url, token(stack, "globex"))}
    for resp in answers:
        job = resp.json()
        done = apis[job["tenant_id"]].wait_terminal(job["job_id"], timeout=120)
        assert done["state"] == "JOB_STATE_SUCCEEDED", done


def _auth(stack: Stack, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(stack, tenant)}"}
