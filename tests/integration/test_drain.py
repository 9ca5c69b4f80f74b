"""Drain and self-fencing on a real stack (tests/fixtures/mesh.toml: a 3 s lease, static-general drains for 2 s):
a job that fits in the drain grace ends normally on its worker; a worker that no pool-manager answers kills its
job before its lease can expire, so the retry never overlaps it."""

from __future__ import annotations

import signal
import time
import uuid

import psutil

from devtools.launcher import Stack
from tests.helpers import Api, Copies, job_spec, pool_view, token, wait_for, worker_pid

LEASE_TTL = 3.0  # FAST_FAILOVER's JOBMESH_WORKER_LEASE_TTL


def ready(stack: Stack) -> Api:
    api = Api(stack.url, token(stack))
    wait_for(lambda: pool_view(api, "static-general")["idle_workers"] >= 3, what="static workers")
    return api


def test_a_draining_worker_finishes_a_job_within_its_grace_and_takes_no_new_one(fresh_stack: Stack) -> None:
    api = ready(fresh_stack)
    job = api.submit(job_spec("short", ["sleep", "1.5"], pool="static-general"))
    running = api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
    agent = psutil.Process(worker_pid(running["worker_id"]))

    agent.send_signal(signal.SIGTERM)
    wait_for(lambda: pool_view(api, "static-general")["idle_workers"] == 2, timeout=5, what="the drain to be seen")
    later = [api.submit(job_spec(f"later{i}", ["sleep", "0.5"], pool="static-general")) for i in range(3)]

    done = api.wait_terminal(job["job_id"], timeout=30)
    assert (done["state"], done["attempt"]) == ("JOB_STATE_SUCCEEDED", 1)
    assert done["worker_id"] == running["worker_id"]
    for submitted in later:
        finished = api.wait_terminal(submitted["job_id"], timeout=30)
        assert finished["state"] == "JOB_STATE_SUCCEEDED", finished
        assert all(a["worker_id"] != running["worker_id"] for a in finished["attempts"]), finished
    agent.wait(10)  # it stops by itself once its job is reported
    wait_for(lambda: pool_view(api, "static-general")["workers"] == 3, timeout=30, what="a replacement worker")


def test_a_worker_no_pool_manager_answers_kills_its_job_before_its_lease_can_expire(fresh_stack: Stack) -> None:
    api = ready(fresh_stack)
    marker = f"fence-{uuid.uuid4().hex}"
    copies = Copies(marker)
    watcher = copies.watch(90)
    job = api.submit(job_spec("fenced", ["sh", "-c", f"sleep 6; : {marker}"], max_retries=1, pool="static-general"))
    api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
    wait_for(lambda: copies.seen, interval=0.05, what="the job's process")

    managers = ["poolmanager-1", "poolmanager-2"]
    for name in managers:
        fresh_stack.kill(name, signal.SIGSTOP)  # frozen with their connections open: no refresh, no leader
    frozen = time.time()
    try:
        # Its last refresh was before the freeze, so the lease expires by `frozen + LEASE_TTL`: the job must be dead
        # by then (a sample that no longer sees it is an upper bound on when it died).
        gone = wait_for(copies.first_gone_at, interval=0.05, timeout=5, what="the job to be killed")
        assert gone < frozen + LEASE_TTL, (gone - frozen, copies.seen)
        time.sleep(LEASE_TTL)  # past the lease: now the leader may retry the job elsewhere
    finally:
        for name in managers:
            fresh_stack.kill(name, signal.SIGCONT)

    done = api.wait_terminal(job["job_id"], timeout=60)
    copies.stop()
    watcher.join(5)
    assert copies.longest_gap < 1.0, copies.longest_gap
    assert copies.most_at_once == 1, copies.seen
    assert not copies.overlapped(), copies.seen
    assert done["state"] == "JOB_STATE_SUCCEEDED", done
    assert done["attempt"] == 2
    # Reported INTERRUPTED if the worker's report landed first, WORKER_LOST if the leader's reclaim did.
    assert done["attempts"][0]["reason"] in ("INTERRUPTED", "WORKER_LOST"), done["attempts"]
    assert len(copies.lifetimes()) == 2, copies.seen


def test_a_worker_the_pool_manager_scales_down_drains_and_exits(fresh_stack: Stack) -> None:
    api = ready(fresh_stack)
    job = api.submit(job_spec("large", ["sleep", "0.5"], required_capabilities={"class": "large"}))
    done = api.wait_terminal(job["job_id"], timeout=60)
    assert done["state"] == "JOB_STATE_SUCCEEDED"
    agent = psutil.Process(worker_pid(done["worker_id"]))

    # Idle for the fixture's 5 s: the leader marks it DRAINING and sends SIGTERM (provider.terminate); an idle
    # worker's drain ends at once.
    agent.wait(40)
    wait_for(lambda: pool_view(api, "dynamic-large")["workers"] == 0, timeout=10, what="the pool to be empty")
    history = api.call("GET", "/api/v1/pools/dynamic-large/scaling/history").json()["events"]
    assert any(e["direction"] == "down" and e["executed"] for e in history), history
