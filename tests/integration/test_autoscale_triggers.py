"""Autoscaling triggers besides queue depth, on the real stack (tests/fixtures/autoscale.toml): utilization
keeps a spare worker, and a job that waited past the pool's limit scales a pool its queue depth would not."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from devtools.launcher import REPO, Stack
from tests.helpers import Api, job_spec, pool_view, stack_with_idle_worker, token, wait_for

CONFIG = REPO / "tests" / "fixtures" / "autoscale.toml"


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_with_idle_worker(tmp_path_factory.mktemp("autoscale-stack"), CONFIG, "headroom")


def ups(api: Api, pool_id: str) -> list[dict[str, object]]:
    events = api.call("GET", f"/api/v1/pools/{pool_id}/scaling/history").json().get("events", [])
    return [e for e in events if e["direction"] == "up" and e["executed"]]


def stamp(value: object) -> float:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def test_a_busy_pool_keeps_one_spare_worker(astack: Stack) -> None:
    api = Api(astack.url, token(astack))
    job = api.submit(job_spec("long", ["sleep", "60"], pool="headroom"))
    try:
        api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
        # Nothing waits, but the only worker is busy: one more starts and stays idle.
        wait_for(lambda: pool_view(api, "headroom")["idle_workers"] == 1, timeout=30, what="a spare worker")
        events = wait_for(
            lambda: [e for e in ups(api, "headroom") if e["trigger"] != "min_workers"], what="the scale-up"
        )
        assert [(e["trigger"], e["from_workers"], e["to_workers"]) for e in events] == [("utilization", 1, 2)]
        assert pool_view(api, "headroom")["workers"] == 2
    finally:
        api.cancel(job["job_id"])


def test_a_job_that_waits_too_long_scales_a_pool_its_queue_depth_would_not(astack: Stack) -> None:
    api = Api(astack.url, token(astack))
    job = api.submit(job_spec("patient", ["true"], pool="patient"))
    # One job is below the pool's depth trigger (five): it waits, and the pool says how long.
    waiting = wait_for(
        lambda: (
            (m := api.call("GET", "/api/v1/pools/patient/metrics").json()).get("oldest_wait_seconds", 0) > 0.5 and m
        ),
        timeout=10,
        what="the wait to show",
    )
    assert waiting["queue_depth"] == 1
    done = api.wait_terminal(job["job_id"], timeout=60)
    assert done["state"] == "JOB_STATE_SUCCEEDED"
    event = ups(api, "patient")[0]
    assert (event["trigger"], event["from_workers"], event["to_workers"]) == ("queue_wait", 0, 1)
    assert stamp(event["time"]) - stamp(done["create_time"]) >= 2.0
    assert time.time() - stamp(done["create_time"]) < 60


def test_a_worker_that_fails_its_health_check_finishes_its_job_and_is_replaced(astack: Stack) -> None:
    api = Api(astack.url, token(astack))
    wait_for(lambda: pool_view(api, "checked")["idle_workers"] == 1, what="the checked pool's worker")
    first = api.submit(job_spec("before", ["sleep", "2"], pool="checked"))
    sick = str(api.wait_state(first["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)["worker_id"])
    (astack.data_dir / f"sick-{sick}").touch()

    # The running job is not disturbed; the worker takes no other job and a new one replaces it.
    assert api.wait_terminal(first["job_id"], timeout=30)["state"] == "JOB_STATE_SUCCEEDED"
    after = api.submit(job_spec("after", ["true"], pool="checked"))
    done = api.wait_terminal(after["job_id"], timeout=60)
    assert done["state"] == "JOB_STATE_SUCCEEDED"
    assert done["worker_id"] != sick
    wait_for(lambda: pool_view(api, "checked")["workers"] == 1, timeout=30, what="the pool back at one worker")
    refills = [e for e in ups(api, "checked") if e["trigger"] == "pool_size"]
    assert len(refills) >= 2  # the first worker, then its replacement
