"""Burst capacity as the last placement step, on the real stack (tests/fixtures/burst.toml): static first, then
the dynamic pool up to its max, then burst workers, which only jobs admitted against a burst session may use."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devtools.launcher import REPO, Stack
from tests.helpers import Api, job_spec, pool_view, stack_with_idle_worker, token, wait_for

CONFIG = REPO / "tests" / "fixtures" / "burst.toml"


@pytest.fixture(scope="module")
def bstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_with_idle_worker(tmp_path_factory.mktemp("burst-stack"), CONFIG, "static-small")


def running_on(api: Api, job_id: str, timeout: float = 30.0) -> str:
    job = api.wait_state(job_id, {"JOB_STATE_RUNNING"}, timeout=timeout)
    return str(job["pool_id"])


def test_burst_jobs_overflow_to_burst_capacity_that_other_jobs_never_use(bstack: Stack) -> None:
    acme = Api(bstack.url, token(bstack, "acme"))
    globex = Api(bstack.url, token(bstack, "globex"))
    started: list[str] = []
    try:
        # 1. The quota's two jobs: the static worker first, then the dynamic pool scales to its max of one.
        for name in ("on-quota-1", "on-quota-2"):
            started.append(acme.submit(job_spec(name, ["sleep", "60"]))["job_id"])
        assert sorted(running_on(acme, j) for j in started) == ["dynamic-small", "static-small"]

        # 2. Beyond the quota with a burst session: static is full and dynamic at its max, so burst capacity.
        resp = acme.call(
            "POST",
            "/api/v1/tenants/acme/burst",
            json={"cpu_millis": 2000, "memory_mb": 2048, "concurrent_jobs": 2, "duration_seconds": 120},
        )
        assert resp.status_code == 200, resp.text
        bursts = [acme.submit(job_spec(f"burst-{i}", ["sleep", "60"], burst=True)) for i in range(2)]
        assert all(b["burst_session_id"] == resp.json()["session_id"] for b in bursts)
        started += [b["job_id"] for b in bursts]
        assert [running_on(acme, b["job_id"]) for b in bursts] == ["burst-small", "burst-small"]
        ups = [
            e
            for e in acme.call("GET", "/api/v1/pools/burst-small/scaling/history").json()["events"]
            if e["direction"] == "up" and e["executed"]
        ]
        assert ups and ups[0]["trigger"] == "burst_demand" and ups[0]["from_workers"] == 0

        # 3. A burst worker goes idle; another tenant's ordinary job still waits for static or dynamic capacity.
        assert acme.cancel(bursts[0]["job_id"]).status_code == 200
        assert pool_view(acme, "burst-small")["kind"] == "POOL_KIND_BURST"
        wait_for(lambda: pool_view(acme, "burst-small")["idle_workers"] >= 1, what="an idle burst worker")
        plain = globex.submit(job_spec("plain", ["true"]))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            job = globex.get(plain["job_id"])
            assert job["state"] == "JOB_STATE_PENDING", job
            time.sleep(0.25)
        assert job["waiting_reason"] == "WAITING_FOR_WORKER"

        # 4. A quota job ends: the waiting job runs where that one ran, not on the idle burst worker.
        assert acme.cancel(started[0]).status_code == 200
        done = globex.wait_terminal(plain["job_id"], timeout=30)
        assert done["state"] == "JOB_STATE_SUCCEEDED"
        assert done["pool_id"] == acme.get(started[0])["pool_id"]
    finally:
        for job_id in started:
            acme.cancel(job_id)
