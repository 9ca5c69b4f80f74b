"""SIGKILL of one process of each replicated kind on the whole stack while jobs are submitted at a steady rate
through Envoy: the quota, queueing or cost leader (the standby takes over within the lease), a gateway (Envoy
sends what no gateway received to the other), and Envoy itself (the supervisor starts it again). Every new submit
succeeds again within the lease, no accepted job is lost, run twice or charged twice, quota usage returns to 0,
and the supervisor starts the killed process again."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from devtools.launcher import Stack, admin_get
from devtools.supervisor import RestartPolicy, StackProcesses, Supervisor
from libs.errors import Unavailable
from libs.etcd.maintenance import EtcdMaintenance
from libs.keys import Keys
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for

LEASE = float(FAST_FAILOVER["JOBMESH_LEADER_TTL"])
RATE = 10  # submits per second, steady
SECONDS = 14.0  # of submitting: at most RATE * SECONDS submits
KILL_AT = 3.0
UNREACHABLE = 0  # the status recorded for a submit that found nothing listening (Envoy down)


def submit_steadily(stack: Stack, answers: list[tuple[float, int, str]], start: float) -> None:
    """One submit every 1/RATE s for SECONDS: (seconds since start, HTTP status, job id or error reason)."""
    headers = {"Authorization": f"Bearer {token(stack, 'acme')}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client:
        for n in range(int(RATE * SECONDS)):
            due = start + n / RATE
            time.sleep(max(0.0, due - time.monotonic()))
            sent = time.monotonic() - start
            try:
                resp = client.post("/api/v1/jobs", json=job_spec(f"steady-{n}", ["sleep", "0.2"]))
            except httpx.TransportError as exc:  # refused or cut: nothing is listening on the public port
                answers.append((sent, UNREACHABLE, type(exc).__name__))
                continue
            body = resp.json()
            failed = body.get("details", [{}])[0].get("reason", "")
            ident = body.get("job_id", "") if resp.status_code == 200 else failed
            answers.append((sent, resp.status_code, ident))


@dataclass
class Run:
    """What a steady run with one SIGKILL saw."""

    killed: str
    old_pid: int
    killed_at: float = 0.0  # seconds after the first submit
    answers: list[tuple[float, int, str]] = field(default_factory=list)
    said: list[str] = field(default_factory=list)  # the supervisor's lines

    def after(self, settled: float) -> list[tuple[float, int, str]]:
        return [a for a in self.answers if a[0] >= settled]

    def accepted(self) -> list[str]:
        return [what for _, status, what in self.answers if status == 200]


def submit_and_kill(stack: Stack, name: str) -> Run:
    """Submits steadily for SECONDS, SIGKILLs `name` KILL_AT seconds in, and supervises the stack meanwhile and
    until `name` is running again (bounded)."""
    policy = RestartPolicy(initial_backoff=0.2, max_backoff=1.0)
    run = Run(name, stack.procs[name].pid)
    sup = Supervisor(StackProcesses(stack), time.monotonic, policy, CollectorRegistry(), run.said.append)
    start = time.monotonic()
    submitter = threading.Thread(target=submit_steadily, args=(stack, run.answers, start))
    submitter.start()
    while submitter.is_alive():
        if not run.killed_at and time.monotonic() - start >= KILL_AT:
            stack.kill(name, signal.SIGKILL)
            run.killed_at = time.monotonic() - start
        sup.tick()
        time.sleep(0.05)
    submitter.join()
    assert run.killed_at
    end = time.monotonic() + 30
    while not stack.procs[name].alive() and time.monotonic() < end:
        sup.tick()
        time.sleep(0.05)
    assert stack.procs[name].pid != run.old_pid
    assert any(line.startswith(f"{name} restarted") for line in run.said), run.said
    return run


def charged_attempts(stack: Stack) -> Counter[str]:
    """How many attempts of each job have a cost record (one key per attempt: a second charge of one attempt
    would need a second key)."""

    async def read() -> Counter[str]:
        etcd = stack.etcd_client()
        try:
            kvs, _, _ = await etcd.get_prefix(Keys("/jobmesh").cost_records, keys_only=True)
            return Counter(kv.key.rsplit("/", 2)[-2] for kv in kvs)
        finally:
            await etcd.close()

    return asyncio.run(read())


def assert_each_accepted_job_ended_once_and_quota_is_back(stack: Stack, run: Run) -> None:
    api = Api(stack.url, token(stack, "acme"))
    accepted = run.accepted()
    assert len(accepted) == len(set(accepted)) >= RATE * (SECONDS - LEASE - 4)
    attempts: dict[str, int] = {}
    for job_id in accepted:
        done = api.wait_terminal(job_id, timeout=120)
        assert done["state"] == "JOB_STATE_SUCCEEDED", done
        # One attempt, or more only where the worker-lease rules stopped one (on a starved machine a worker that
        # hears from no pool-manager for 2 s fences itself): never a second run for another reason.
        assert all(a["reason"] in ("INTERRUPTED", "WORKER_LOST") for a in done["attempts"][:-1]), done["attempts"]
        attempts[job_id] = done["attempt"]
    # Each attempt is charged once, by whichever cost replica led when it ended.
    wait_for(
        lambda: {job_id: charged_attempts(stack)[job_id] for job_id in accepted} == attempts,
        timeout=30,
        what="one cost record per attempt of every accepted job",
    )
    # And what they held is given back.
    wait_for(
        lambda: api.call("GET", "/api/v1/tenants/acme/quotas").json()["usage"].get("concurrent_jobs", 0) == 0,
        timeout=30,
        what="quota usage to return to 0",
    )


@pytest.mark.parametrize("kind", ["quota", "queueing", "cost"])
def test_killing_a_leader_under_steady_submits_loses_nothing_and_it_comes_back(fresh_stack: Stack, kind: str) -> None:
    stack = fresh_stack
    run = submit_and_kill(stack, stack.wait_leader(kind))

    # Within the lease (plus the time to notice the key is gone) every new submit succeeds again; before, a
    # submit may only have been refused as unavailable (503), never with another error. (A cost failover delays
    # submits at most by their budget check's deadline: budget checks fail open.)
    assert all(status in (200, 503) for _, status, _ in run.answers), sorted({s for _, s, _ in run.answers})
    late = run.after(run.killed_at + LEASE + 2.0)
    assert late and all(status == 200 for _, status, _ in late), [a for a in late if a[1] != 200]
    # A replica leads again (the restarted one may have won the vacancy as well as the standby: both wait for the
    # dead leader's key to go), and the restarted one is healthy.
    stack.wait_leader(kind, 10)
    stack.wait_healthy(run.killed, 60)
    assert_each_accepted_job_ended_once_and_quota_is_back(stack, run)


def gateways_in_rotation(stack: Stack) -> int:
    """How many gateway endpoints Envoy's gateway cluster holds healthy (its admin /clusters)."""
    status, body = admin_get(stack.envoy_admin_socket, "/clusters")
    if status != 200:
        return 0
    flags = [line for line in body.splitlines() if line.startswith("jobmesh_gateway::") and "::health_flags::" in line]
    return sum(1 for line in flags if line.endswith("::healthy"))


@pytest.mark.parametrize("name", ["gateway-1", "envoy"])
def test_killing_a_front_process_under_steady_submits_loses_nothing_and_it_comes_back(
    fresh_stack: Stack, name: str
) -> None:
    stack = fresh_stack
    assert gateways_in_rotation(stack) == 2
    run = submit_and_kill(stack, name)

    failed = [a for a in run.answers if a[1] != 200]
    if name.startswith("gateway-"):
        # Envoy sends what the dead gateway never received to the other one: at most the one submit that was in
        # flight at the kill fails (503: it may have been stored, so Envoy does not repeat a write; a client with
        # an idempotency key retries it).
        assert len(failed) <= 1 and all(a[1] == 503 for a in failed), failed
    else:
        # Nothing listens on the public port until the supervisor has started Envoy again.
        assert all(status in (UNREACHABLE, 503) for _, status, _ in failed), failed
    late = run.after(run.killed_at + LEASE + 2.0)
    assert late and all(status == 200 for _, status, _ in late), [a for a in late if a[1] != 200]
    stack.wait_envoy(30) if name == "envoy" else stack.wait_healthy(name, 60)
    # Envoy has both gateways in its rotation again (it health-checks them every second).
    wait_for(lambda: gateways_in_rotation(stack) == 2, timeout=15, what="both gateways healthy in Envoy")
    assert_each_accepted_job_ended_once_and_quota_is_back(stack, run)


def etcd_leader(stack: Stack) -> str:
    """The process name of the etcd member that leads the cluster now."""

    async def find() -> str | None:
        tls = stack.pki.etcd("client-launcher", "launcher")
        for name, endpoint in zip(stack.etcd_names(), stack.etcd_endpoints(), strict=True):
            member = EtcdMaintenance(endpoint, tls, timeout=2)
            try:
                if (await member.status()).leader:
                    return name
            except Unavailable:
                continue
            finally:
                await member.close()
        return None  # between two leaders

    return wait_for(lambda: asyncio.run(find()), timeout=30, what="an etcd leader")


@pytest.fixture
def three_member_stack(tmp_path: Path) -> Iterator[Stack]:
    """The stack on a three-member etcd cluster, as on Kubernetes (`jobmesh run --etcd-members 3`)."""
    s = start_stack(tmp_path / "stack", etcd_members=3)
    try:
        yield s
    finally:
        s.stop()


def test_killing_the_etcd_leader_member_under_steady_submits_loses_nothing_and_it_comes_back(
    three_member_stack: Stack,
) -> None:
    stack = three_member_stack
    assert len(stack.etcd_names()) == 3
    run = submit_and_kill(stack, etcd_leader(stack))

    # The two members left elect a leader within etcd's election timeout; the services' clients balance over the
    # three endpoints and leave the dead one. A submit in the gap may be refused as unavailable, never otherwise.
    assert all(status in (200, 503) for _, status, _ in run.answers), sorted({s for _, s, _ in run.answers})
    late = run.after(run.killed_at + LEASE + 2.0)
    assert late and all(status == 200 for _, status, _ in late), [a for a in late if a[1] != 200]
    # The restarted member rejoined on its data dir, and the cluster has a leader.
    stack.wait_etcd(30, run.killed)
    etcd_leader(stack)
    assert_each_accepted_job_ended_once_and_quota_is_back(stack, run)
