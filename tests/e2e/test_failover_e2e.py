"""SIGKILL of the quota or the queueing leader on the whole stack while jobs are submitted at a steady rate through
Envoy: the standby takes over within the lease, no accepted job is lost or run twice, quota usage returns to 0, and
the supervisor starts the killed process again."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from devtools.launcher import Stack
from devtools.supervisor import RestartPolicy, StackProcesses, Supervisor
from tests.helpers import FAST_FAILOVER, Api, job_spec, token, wait_for

LEASE = float(FAST_FAILOVER["JOBMESH_LEADER_TTL"])
RATE = 10  # submits per second, steady
SECONDS = 14.0  # of submitting: at most RATE * SECONDS submits
KILL_AT = 3.0


def submit_steadily(stack: Stack, answers: list[tuple[float, int, str]], start: float) -> None:
    """One submit every 1/RATE s for SECONDS: (seconds since start, HTTP status, job id or error reason)."""
    headers = {"Authorization": f"Bearer {token(stack, 'acme')}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client:
        for n in range(int(RATE * SECONDS)):
            due = start + n / RATE
            time.sleep(max(0.0, due - time.monotonic()))
            sent = time.monotonic() - start
            resp = client.post("/api/v1/jobs", json=job_spec(f"steady-{n}", ["sleep", "0.2"]))
            body = resp.json()
            failed = body.get("details", [{}])[0].get("reason", "")
            ident = body.get("job_id", "") if resp.status_code == 200 else failed
            answers.append((sent, resp.status_code, ident))


@pytest.mark.parametrize("kind", ["quota", "queueing"])
def test_killing_a_leader_under_steady_submits_loses_nothing_and_it_comes_back(fresh_stack: Stack, kind: str) -> None:
    stack = fresh_stack
    said: list[str] = []
    policy = RestartPolicy(initial_backoff=0.2, max_backoff=1.0)
    sup = Supervisor(StackProcesses(stack), time.monotonic, policy, CollectorRegistry(), said.append)
    leader = stack.wait_leader(kind)
    old_pid = stack.procs[leader].pid
    answers: list[tuple[float, int, str]] = []
    start = time.monotonic()
    submitter = threading.Thread(target=submit_steadily, args=(stack, answers, start))
    submitter.start()
    killed_at = None
    while submitter.is_alive():
        if killed_at is None and time.monotonic() - start >= KILL_AT:
            stack.kill(leader, signal.SIGKILL)
            killed_at = time.monotonic() - start
        sup.tick()
        time.sleep(0.05)
    submitter.join()
    assert killed_at is not None

    # Within the lease (plus the time to notice the key is gone) every new submit succeeds again; before, a
    # submit may only have been refused as unavailable (503), never with another error.
    settled = killed_at + LEASE + 2.0
    assert all(status in (200, 503) for _, status, _ in answers), sorted({s for _, s, _ in answers})
    late = [(at, status, what) for at, status, what in answers if at >= settled]
    assert late and all(status == 200 for _, status, _ in late), [a for a in late if a[1] != 200]
    # The supervisor started the killed replica again (it may have won the vacancy as well as the standby:
    # both wait for the dead leader's key to go).
    stack.wait_leader(kind, 10)
    assert stack.procs[leader].alive() and stack.procs[leader].pid != old_pid
    assert any(line.startswith(f"{leader} restarted") for line in said), said
    stack.wait_healthy(leader, 60)

    # Every accepted job ends exactly once.
    api = Api(stack.url, token(stack, "acme"))
    accepted = [what for _, status, what in answers if status == 200]
    assert len(accepted) == len(set(accepted)) >= RATE * (SECONDS - LEASE - 4)
    for job_id in accepted:
        done = api.wait_terminal(job_id, timeout=120)
        assert done["state"] == "JOB_STATE_SUCCEEDED", done
        assert done["attempt"] == 1, done
    # And what they held is given back.
    wait_for(
        lambda: api.call("GET", "/api/v1/tenants/acme/quotas").json()["usage"].get("concurrent_jobs", 0) == 0,
        timeout=30,
        what="quota usage to return to 0",
    )
