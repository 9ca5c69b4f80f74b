"""gRPC adapter of the cost service: proto in, the accounts, proto out."""

from __future__ import annotations

import asyncio

import grpc

from jobmesh.cost.v1 import cost_pb2 as c
from jobmesh.cost.v1 import cost_pb2_grpc
from services.cost import convert
from services.cost.accounts import CostAccounts


class CostServicer(cost_pb2_grpc.CostServiceServicer):
    def __init__(self, accounts: CostAccounts):
        self.accounts = accounts
        self.currency = accounts.config.currency

    async def GetCostReports(
        self, request: c.GetCostReportsRequest, context: grpc.aio.ServicerContext
    ) -> c.GetCostReportsResponse:
        start = convert.parse_time("start", request.start)
        end = convert.parse_time("end", request.end)
        # Validated and snapshotted on the loop, computed off it: a long report never holds up budget checks.
        work = self.accounts.report_job(request.tenant_id, start, end)
        return convert.reports(await asyncio.to_thread(work), self.currency)

    async def GetJobCost(self, request: c.GetJobCostRequest, context: grpc.aio.ServicerContext) -> c.GetJobCostResponse:
        return c.GetJobCostResponse(cost=convert.job_cost(self.accounts.job_cost(request.job), self.currency))

    async def GetBudget(self, request: c.GetBudgetRequest, context: grpc.aio.ServicerContext) -> c.GetBudgetResponse:
        return c.GetBudgetResponse(budget=convert.budget(self.accounts.budget(request.tenant_id), self.currency))

    async def UpdateBudget(
        self, request: c.UpdateBudgetRequest, context: grpc.aio.ServicerContext
    ) -> c.UpdateBudgetResponse:
        status = await self.accounts.update_budget(request.tenant_id, request.monthly_limit, request.policy)
        return c.UpdateBudgetResponse(budget=convert.budget(status, self.currency))

    async def CheckBudget(
        self, request: c.CheckBudgetRequest, context: grpc.aio.ServicerContext
    ) -> c.CheckBudgetResponse:
        return c.CheckBudgetResponse(enforced=self.accounts.check_budget(request.tenant_id))
