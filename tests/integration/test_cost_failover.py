"""The cost service as two real replicas over a real etcd: one leads and alone serves; a leader paused past its
lease (SIGSTOP) is replaced, and nothing it writes after SIGCONT lands."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from devtools.launcher import Stack
from jobmesh.cost.v1 import cost_pb2 as c
from jobmesh.cost.v1 import cost_pb2_grpc
from services.cost.keys import CostKeys
from tests.helpers import resume_and_stop, start_replicas, stored_value, wait_for
from tests.integration.test_quota_failover import outcomes_of, reason_of

REPLICAS = ("cost-1", "cost-2")
COST = "jobmesh.cost.v1.CostService"


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[Stack]:
    """etcd and two cost replicas (a 2 s lease), nothing else: the test plays the gateway."""
    stack = start_replicas(tmp_path / "stack", REPLICAS, ("cost",))
    try:
        yield stack
    finally:
        resume_and_stop(stack)


class AsGateway:
    """Blocking stubs, as the gateway's identity, to each cost replica by its own port."""

    def __init__(self, stack: Stack):
        self.channels = {name: stack.channel(stack.procs[name].port, "gateway") for name in REPLICAS}
        self.cost = {name: cost_pb2_grpc.CostServiceStub(ch) for name, ch in self.channels.items()}

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def update_budget(self, replica: str, limit: str) -> c.UpdateBudgetResponse:
        request = c.UpdateBudgetRequest(tenant_id="globex", monthly_limit=limit, policy="enforce")
        return self.cost[replica].UpdateBudget(request, timeout=5)


def stored_budget(stack: Stack) -> bytes | None:
    return stored_value(stack, CostKeys("/jobmesh").budget("globex"))


def test_the_cost_standby_refuses_every_call_and_reports_the_service_not_serving(pair: Stack) -> None:
    leader = pair.wait_leader("cost")
    standby = next(n for n in REPLICAS if n != leader)
    assert not pair.serving(standby, COST)
    assert pair.serving(standby, "")  # alive and warm: not a failed process
    gw = AsGateway(pair)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            gw.cost[standby].GetBudget(c.GetBudgetRequest(tenant_id="acme"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason_of(refused.value) == "NOT_LEADER"
        assert gw.cost[leader].GetBudget(c.GetBudgetRequest(tenant_id="acme"), timeout=5).budget.tenant_id == "acme"
    finally:
        gw.close()


def test_a_cost_leader_paused_past_its_lease_cannot_write_after_it_resumes(pair: Stack) -> None:
    old = pair.wait_leader("cost")
    new = next(n for n in REPLICAS if n != old)
    gw = AsGateway(pair)
    try:
        gw.update_budget(old, "100")
        pair.kill(old, signal.SIGSTOP)  # a long GC pause, a frozen VM: its lease runs out
        try:
            wait_for(lambda: pair.serving(new, COST), timeout=15, what="the takeover")
            # The new leader serves the budget the old one stored (its informers caught up before it served) and
            # changes it.
            seen = gw.cost[new].GetBudget(c.GetBudgetRequest(tenant_id="globex"), timeout=5).budget
            assert seen.monthly_limit.micros == 100_000_000, seen
            gw.update_budget(new, "200")
            before = stored_budget(pair)
        finally:
            pair.kill(old, signal.SIGCONT)
        # At once after SIGCONT, before it may notice that its lease is gone, the old leader is asked to write.
        outcomes = outcomes_of(lambda: gw.update_budget(old, "300"))
        assert all(o.startswith("UNAVAILABLE:") for o in outcomes), outcomes
        assert stored_budget(pair) == before  # nothing the old leader did landed
        assert pair.procs[old].alive()
        # It is the standby now, and the new leader still serves.
        wait_for(lambda: not pair.serving(old, COST), timeout=10, what="the old leader to stand by")
        assert pair.serving(new, COST)
    finally:
        gw.close()
