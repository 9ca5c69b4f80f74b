"""Worker slots on the whole stack: a pool with `worker_slots = 2` packs two jobs onto its one worker, a third
waits for room, a job too big for the room left waits too, cancelling one of two jobs on a worker stops that
job alone, and both jobs of a worker that dies are retried, each run once per attempt."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from devtools.launcher import REPO, Stack
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for, without_sandbox
from tests.integration.test_faults import worker_pid

SLOTS_CONFIG = REPO / "tests" / "fixtures" / "slots.toml"
LONG = ["sleep", "30"]


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    yield from slots_stack(tmp_path, SLOTS_CONFIG)


@pytest.fixture()
def unsandboxed_api(tmp_path: Path) -> Iterator[Api]:
    """The same pool with its job sandbox off, for jobs that leave marks on the host's file system."""
    yield from slots_stack(tmp_path, without_sandbox(SLOTS_CONFIG, tmp_path))


def slots_stack(tmp_path: Path, config: Path) -> Iterator[Api]:
    stack: Stack = start_stack(tmp_path / "slots", env=dict(FAST_FAILOVER), config=config)
    try:
        client = Api(stack.url, token(stack, "acme"))
        wait_for(
            lambda: client.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 1,
            what="the worker to register",
        )
        yield client
    finally:
        stack.stop()


def sized(name: str, cpu_millis: int) -> dict[str, object]:
    return job_spec(name, LONG, resources={"cpu_millis": cpu_millis, "memory_mb": 64})


def stays_waiting(api: Api, job_id: str, seconds: float = 1.5) -> dict[str, object]:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job = api.get(job_id)
        assert job["state"] != "JOB_STATE_RUNNING", job
        time.sleep(0.1)
    return job


def test_two_jobs_share_a_worker_and_a_third_waits_for_a_slot(api: Api) -> None:
    first = api.submit(sized("first", 400))
    second = api.submit(sized("second", 400))
    a = api.wait_state(first["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    b = api.wait_state(second["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    assert a["worker_id"] == b["worker_id"]  # both on the pool's only worker, at once
    (pool,) = api.call("GET", "/api/v1/pools").json()["pools"]
    assert (pool["worker_slots"], pool["running_jobs"], pool["busy_workers"]) == (2, 2, 1)
    assert api.call("GET", "/api/v1/pools/packed/metrics").json()["running_jobs"] == 2

    third = api.submit(sized("third", 100))
    stays_waiting(api, third["job_id"])  # both slots taken, though 200m of CPU is free

    assert api.cancel(first["job_id"]).status_code == 200
    c = api.wait_state(third["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    assert c["worker_id"] == a["worker_id"]
    # Cancelling one job stopped that job alone: its neighbour is still running.
    assert api.get(second["job_id"])["state"] == "JOB_STATE_RUNNING"
    assert api.wait_state(first["job_id"], {"JOB_STATE_CANCELLED"}, timeout=10)["state"] == "JOB_STATE_CANCELLED"

    for job in (second, third):
        assert api.cancel(job["job_id"]).status_code == 200
    wait_for(
        lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] == 1,
        what="the worker to be idle again",
    )


def test_a_job_waits_while_the_room_left_on_a_worker_is_too_small(api: Api) -> None:
    big = api.submit(sized("big", 700))
    api.wait_state(big["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)

    too_big = api.submit(sized("too-big", 400))
    stays_waiting(api, too_big["job_id"])  # a slot is free, but only 300m of CPU is left
    small = api.submit(sized("small", 300))
    api.wait_state(small["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)  # fits the room the other could not use

    assert api.cancel(big["job_id"]).status_code == 200
    ran = api.wait_state(too_big["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    assert ran["worker_id"] == api.get(small["job_id"])["worker_id"]
    for job in (small, too_big):
        assert api.cancel(job["job_id"]).status_code == 200


def test_both_jobs_of_a_killed_worker_are_retried_and_each_attempt_runs_once(
    unsandboxed_api: Api, tmp_path: Path
) -> None:
    api = unsandboxed_api
    marks = tmp_path / "marks"
    marks.mkdir()
    jobs = [
        api.submit(
            job_spec(
                f"pair-{n}",
                ["sh", "-c", f"echo run >> {marks / f'pair-{n}'}; sleep 2"],
                resources={"cpu_millis": 400, "memory_mb": 64},
                max_retries=1,
            )
        )
        for n in range(2)
    ]
    first, second = (api.wait_state(j["job_id"], {"JOB_STATE_RUNNING"}, timeout=30) for j in jobs)
    assert first["worker_id"] == second["worker_id"]

    def runs(n: int) -> int:
        path = marks / f"pair-{n}"
        return len(path.read_text().splitlines()) if path.exists() else 0

    wait_for(lambda: runs(0) == 1 and runs(1) == 1, what="both first attempts to start")
    psutil.Process(worker_pid(first["worker_id"])).send_signal(signal.SIGKILL)

    for n, job in enumerate(jobs):
        done = api.wait_terminal(job["job_id"], timeout=60)
        assert (done["state"], done["attempt"]) == ("JOB_STATE_SUCCEEDED", 2), done
        assert done["attempts"][0]["reason"] == "WORKER_LOST"
        assert done["worker_id"] != first["worker_id"]  # the pool's replacement worker
        assert runs(n) == 2  # one run per attempt
