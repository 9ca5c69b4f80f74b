"""The gateway's budget gate (services/gateway/budgets.py) when the cost service cannot answer: open admits, closed
refuses the tenants whose budget is enforced (as the cost service last said, else as configured)."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from jobmesh.cost.v1 import cost_pb2 as c
from libs.clock import FakeClock
from libs.errors import Unavailable
from services.gateway.budgets import BudgetGate
from tests.unit.cost_builders import priced_mesh

pytestmark = pytest.mark.asyncio

# globex: enforced in config; initech: a notify budget in config.
CONFIG = priced_mesh(
    globex={"weight": 1, "monthly_budget": 10.0, "budget_policy": "enforce"},
    initech={"weight": 1, "monthly_budget": 10.0, "budget_policy": "notify"},
)


class Cost:
    """The cost service's CheckBudget: answers `enforced` per tenant while up, UNAVAILABLE while down."""

    def __init__(self, enforced: set[str]):
        self.enforced = enforced
        self.up = True

    async def CheckBudget(self, request: c.CheckBudgetRequest, timeout: float) -> c.CheckBudgetResponse:
        if not self.up:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        return c.CheckBudgetResponse(enforced=request.tenant_id in self.enforced)


def gate(mode: str, cost: Cost) -> tuple[BudgetGate, FakeClock]:
    clock = FakeClock()
    return BudgetGate(cost, clock, replace(CONFIG, budget_check_failure=mode)), clock


async def test_failing_open_admits_every_tenant_while_cost_is_down() -> None:
    g, _ = gate("open", cost := Cost(set()))
    cost.up = False
    for tenant in ("acme", "globex", "initech"):
        await g.check(tenant)


async def test_failing_closed_refuses_only_tenants_with_an_enforced_budget_as_configured() -> None:
    g, _ = gate("closed", cost := Cost(set()))
    cost.up = False
    with pytest.raises(Unavailable) as refused:
        await g.check("globex")
    assert refused.value.reason == "BUDGET_CHECK_UNAVAILABLE"
    assert refused.value.metadata == {"tenant_id": "globex"}
    await g.check("acme")
    await g.check("initech")


async def test_failing_closed_follows_what_the_cost_service_last_said_over_the_config() -> None:
    # An admin enforced initech's budget and lifted globex's: the last answers win over the config.
    g, clock = gate("closed", cost := Cost({"initech"}))
    await g.check("initech")
    await g.check("globex")
    cost.up = False
    clock.advance(3)  # past the remembered answers
    with pytest.raises(Unavailable):
        await g.check("initech")
    await g.check("globex")
