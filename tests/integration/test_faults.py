"""Crashes of single processes and of the whole stack: every accepted job ends, none runs twice."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from devtools.launcher import Stack
from jobmesh.common.v1 import types_pb2
from jobmesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import (
    FAST_FAILOVER,
    FIXTURE_CONFIG,
    Api,
    job_spec,
    start_stack,
    token,
    wait_for,
    without_sandbox,
    worker_pid,
)


@pytest.fixture()
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own whose jobs may write their marks to the host (their pools' sandbox is off)."""
    s = start_stack(tmp_path / "stack", config=without_sandbox(FIXTURE_CONFIG, tmp_path))
    try:
        yield s
    finally:
        s.stop()


def marked(name: str, marks: Path, before: str = "") -> dict[str, object]:
    """A job that appends one line to its own file each time it runs, so double runs show."""
    script = f"{before}echo run >> {marks / name}"
    return job_spec(name, ["sh", "-c", script])


def runs(marks: Path, name: str) -> int:
    path = marks / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def submit_in_background(
    api: Api, specs: list[dict[str, object]], accepted: list[dict[str, object]], pace: float = 0.05
) -> threading.Thread:
    def go() -> None:
        for spec in specs:
            resp = api.call("POST", "/api/v1/jobs", json=spec)
            if resp.status_code == 200:
                accepted.append(resp.json())
            else:
                assert resp.status_code in (503, 504), resp.text  # refused while a dependency is down
            time.sleep(pace)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def assert_each_ran_once(api: Api, accepted: list[dict[str, object]], marks: Path) -> None:
    for job in accepted:
        done = api.wait_terminal(str(job["job_id"]), timeout=90)
        assert done["state"] == "JOB_STATE_SUCCEEDED", done
        name = str(job["spec"]["name"])  # type: ignore[index]
        assert runs(marks, name) == 1, f"{name} ran {runs(marks, name)} times"


def leader_etcd_value(stack: Stack, role: str) -> str:
    async def read() -> str:
        etcd = stack.etcd_client()
        try:
            kv = await etcd.get(f"/jobmesh/leader/{role}")
            return kv.value.decode() if kv else ""
        finally:
            await etcd.close()

    return asyncio.run(read())


def scheduler_leader(stack: Stack) -> str:
    for i, port in enumerate(stack.ports.scheduler, start=1):
        with stack.channel(port, "operator") as ch:
            try:
                status = scheduler_pb2_grpc.SchedulerServiceStub(ch).GetStatus(
                    scheduler_pb2.GetStatusRequest(), timeout=2
                )
            except grpc.RpcError:
                continue
            if status.leader:
                return f"scheduler-{i}"
    return ""


@pytest.fixture()
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    return path


def ready(stack: Stack) -> Api:
    api = Api(stack.url, token(stack))
    wait_for(lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 3, what="static workers")
    return api


def test_sigkill_of_the_queueing_service_loses_no_accepted_job(fresh_stack: Stack, marks: Path) -> None:
    api = ready(fresh_stack)
    accepted: list[dict[str, object]] = []
    thread = submit_in_background(api, [marked(f"q{i}", marks) for i in range(40)], accepted)
    wait_for(lambda: len(accepted) >= 10, what="first submits")
    leader = fresh_stack.wait_leader("queueing")
    fresh_stack.kill(leader)
    time.sleep(1.0)
    fresh_stack.restart(leader)
    thread.join(120)
    assert len(accepted) >= 10
    assert_each_ran_once(api, accepted, marks)


def test_sigkill_of_the_scheduler_leader_hands_over_without_double_runs(fresh_stack: Stack, marks: Path) -> None:
    api = ready(fresh_stack)
    leader = wait_for(lambda: scheduler_leader(fresh_stack), what="a scheduler leader")
    accepted: list[dict[str, object]] = []
    thread = submit_in_background(api, [marked(f"s{i}", marks, "sleep 0.2; ") for i in range(30)], accepted)
    wait_for(lambda: len(accepted) >= 8, what="first submits")
    fresh_stack.kill(leader)
    thread.join(120)
    new_leader = wait_for(lambda: scheduler_leader(fresh_stack), timeout=15, what="the other replica to lead")
    assert new_leader != leader
    assert_each_ran_once(api, accepted, marks)


def test_sigkill_of_the_pool_manager_leader_hands_over_without_double_runs(fresh_stack: Stack, marks: Path) -> None:
    api = ready(fresh_stack)
    leader = wait_for(lambda: leader_etcd_value(fresh_stack, "pool-manager"), what="a pool-manager leader")
    accepted: list[dict[str, object]] = []
    thread = submit_in_background(api, [marked(f"p{i}", marks, "sleep 0.2; ") for i in range(30)], accepted)
    wait_for(lambda: len(accepted) >= 8, what="first submits")
    fresh_stack.kill(leader)
    thread.join(120)
    wait_for(
        lambda: leader_etcd_value(fresh_stack, "pool-manager") not in ("", leader),
        timeout=15,
        what="the other pool-manager to lead",
    )
    assert_each_ran_once(api, accepted, marks)


def test_a_worker_killed_mid_job_is_declared_lost_and_the_job_retried_elsewhere(
    fresh_stack: Stack, marks: Path
) -> None:
    api = ready(fresh_stack)
    job = api.submit(job_spec("retry-me", ["sh", "-c", f"echo run >> {marks / 'retry-me'}; sleep 2"], max_retries=1))
    running = api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
    first_worker = running["worker_id"]
    wait_for(lambda: runs(marks, "retry-me") == 1, what="the first attempt to start")
    psutil.Process(worker_pid(first_worker)).send_signal(signal.SIGKILL)
    done = api.wait_terminal(job["job_id"], timeout=60)
    assert done["state"] == "JOB_STATE_SUCCEEDED", done
    assert done["attempt"] == 2
    assert done["worker_id"] != first_worker
    assert done["attempts"][0]["reason"] == "WORKER_LOST"
    assert runs(marks, "retry-me") == 2  # one run per attempt, never two for the same attempt
    # Without retries left, the same loss fails the job with WORKER_LOST.
    job = api.submit(job_spec("no-retry", ["sleep", "30"], max_retries=0))
    running = api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
    psutil.Process(worker_pid(running["worker_id"])).send_signal(signal.SIGKILL)
    failed = api.wait_terminal(job["job_id"], timeout=60)
    assert (failed["state"], failed["reason"]) == ("JOB_STATE_FAILED", "WORKER_LOST")
    # The static pool replaces the lost workers.
    wait_for(
        lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["workers"] == 3,
        timeout=30,
        what="replacement workers",
    )


def test_restarting_the_whole_stack_resumes_pending_jobs(tmp_path: Path, marks: Path) -> None:
    data = tmp_path / "stack"
    release = tmp_path / "release"
    config = without_sandbox(FIXTURE_CONFIG, tmp_path)
    stack = start_stack(data, config=config)
    try:
        api = ready(stack)
        # Each holds its worker until the stack is down (`release` appears only then): the later jobs stay pending
        # across the restart, and the blockers (requeued by their workers' drain) end at once after it.
        hold = ["sh", "-c", f"while [ ! -e {release} ]; do sleep 0.2; done"]
        blockers = [api.submit(job_spec(f"block{i}", hold, pool="static-general")) for i in range(3)]
        for b in blockers:
            api.wait_state(b["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
        pending = [api.submit(marked(f"later{i}", marks) | {"pool": "static-general"}) for i in range(5)]
        assert all(api.get(p["job_id"])["state"] == "JOB_STATE_PENDING" for p in pending)
    finally:
        stack.stop()
    release.touch()
    stack = start_stack(data, config=config)
    try:
        api = Api(stack.url, token(stack))
        for p in pending:
            assert api.wait_terminal(p["job_id"], timeout=90)["state"] == "JOB_STATE_SUCCEEDED"
            assert runs(marks, p["spec"]["name"]) == 1
        for b in blockers:  # stopped by their workers' drain (INTERRUPTED, no retry used), run again after it
            done = api.wait_terminal(b["job_id"], timeout=90)
            assert done["state"] == "JOB_STATE_SUCCEEDED", done
            assert [a["reason"] for a in done["attempts"]] == ["INTERRUPTED", "COMPLETED"], done["attempts"]
    finally:
        stack.stop()


def worker_terms(stack: Stack) -> dict[str, int]:
    async def read() -> dict[str, int]:
        etcd = stack.etcd_client()
        try:
            kvs, _, _ = await etcd.get_prefix("/jobmesh/workers/")
            return {w.worker_id: w.etcd_term for w in (types_pb2.Worker.FromString(kv.value) for kv in kvs)}
        finally:
            await etcd.close()

    return asyncio.run(read())


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_jobs_submitted_right_after_a_whole_stack_restart_never_land_on_the_old_workers(
    tmp_path: Path, marks: Path, how: str
) -> None:
    """etcd gives every lease its full TTL again when it restarts, so the records of the last run's workers (all
    gone) look alive for one more lease. A job placed on one of them would end WORKER_LOST without ever running;
    none may be. A long worker lease (15 s) keeps those records in etcd well past the stack's start."""
    data = tmp_path / "stack"
    config = without_sandbox(FIXTURE_CONFIG, tmp_path)
    env = FAST_FAILOVER | {"JOBMESH_WORKER_LEASE_TTL": "15"}
    stack = start_stack(data, env=env, config=config)
    try:
        ready(stack)
        old = set(worker_terms(stack))
        assert len(old) >= 3
    finally:
        if how == "killed":
            for proc in stack.procs.values():
                if proc.alive():
                    os.killpg(proc.pid, signal.SIGKILL)
        stack.stop()
    stack = start_stack(data, env=env, config=config)
    try:
        api = Api(stack.url, token(stack))
        assert old <= set(worker_terms(stack))  # the old records are still there, on leases etcd renewed
        jobs = [api.submit(marked(f"after{i}", marks) | {"max_retries": 0}) for i in range(8)]
        for job in jobs:
            done = api.wait_terminal(job["job_id"], timeout=60)
            assert (done["state"], done["attempt"]) == ("JOB_STATE_SUCCEEDED", 1), done
            assert done["worker_id"] not in old
            assert runs(marks, job["spec"]["name"]) == 1
    finally:
        stack.stop()


def test_live_workers_take_jobs_again_once_heard_after_etcd_restarts(fresh_stack: Stack, marks: Path) -> None:
    """The other side of the rule above: after an etcd restart every record is of an older term, and the workers
    still alive are brought up to the new one by their next heartbeat, and take jobs again."""
    api = ready(fresh_stack)
    before = worker_terms(fresh_stack)
    fresh_stack.kill("etcd")
    fresh_stack.restart("etcd")
    jobs = [api.submit(marked(f"after{i}", marks) | {"max_retries": 0}) for i in range(6)]
    for job in jobs:
        done = api.wait_terminal(job["job_id"], timeout=60)
        assert (done["state"], done["attempt"]) == ("JOB_STATE_SUCCEEDED", 1), done
        assert runs(marks, job["spec"]["name"]) == 1
    after = wait_for(
        lambda: (terms := worker_terms(fresh_stack)) and len(set(terms.values())) == 1 and terms,
        what="every worker heard in the new term",
    )
    assert set(after) & set(before)  # the same workers, alive through the restart
    assert min(after.values()) > max(before.values())


def test_no_job_is_placed_on_a_worker_whose_stream_broke(fresh_stack: Stack, marks: Path) -> None:
    """A worker killed while idle keeps its record until its lease runs out; its stream breaks at once, and from
    then on nothing is placed on it: jobs submitted in that window wait for a live worker, none ends WORKER_LOST."""
    api = ready(fresh_stack)
    static = {w for w in worker_terms(fresh_stack) if w.startswith("static-general-")}
    for worker_id in static:
        psutil.Process(worker_pid(worker_id)).send_signal(signal.SIGKILL)
    wait_for(
        lambda: all(worker_terms(fresh_stack).get(w, 0) == 0 for w in static),
        timeout=10,
        what="the killed workers' records marked as not heard",
    )
    assert static <= set(worker_terms(fresh_stack))  # still there: their leases have not run out
    leader = fresh_stack.metrics_port(scheduler_leader(fresh_stack))
    wait_for(
        lambda: (
            f"jobmesh_scheduler_unheard_workers {float(len(static))}"
            in httpx.get(f"http://127.0.0.1:{leader}/metrics", timeout=5).text
        ),
        timeout=10,
        what="the scheduler to count them as unheard",
    )
    jobs = [api.submit(marked(f"after{i}", marks) | {"max_retries": 0, "pool": "static-general"}) for i in range(4)]
    for job in jobs:
        done = api.wait_terminal(job["job_id"], timeout=60)
        assert (done["state"], done["attempt"]) == ("JOB_STATE_SUCCEEDED", 1), done
        assert done["worker_id"] not in static
        assert runs(marks, job["spec"]["name"]) == 1


def test_a_worker_paused_past_its_lease_cannot_finish_its_old_attempt(fresh_stack: Stack, marks: Path) -> None:
    api = ready(fresh_stack)
    script = f"echo run >> {marks / 'paused'}; sleep 4"
    job = api.submit(job_spec("paused", ["sh", "-c", script], max_retries=1))
    running = api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
    agent = psutil.Process(worker_pid(running["worker_id"]))
    wait_for(lambda: runs(marks, "paused") == 1, what="the first attempt to start")
    agent.suspend()  # SIGSTOP: heartbeats stop, the lease (3 s) runs out
    try:
        wait_for(lambda: api.get(job["job_id"])["attempt"] == 2, timeout=30, what="a retry elsewhere")
    finally:
        agent.resume()
    done = api.wait_terminal(job["job_id"], timeout=60)
    assert done["state"] == "JOB_STATE_SUCCEEDED"
    assert done["attempt"] == 2 and done["worker_id"] != running["worker_id"]
    assert done["attempts"][0]["reason"] == "WORKER_LOST"
    time.sleep(2)  # let the resumed agent report its stale result and register again
    assert api.get(job["job_id"])["attempt"] == 2  # its late result for attempt 1 changed nothing
    assert runs(marks, "paused") == 2  # one run per attempt
