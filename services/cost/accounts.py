"""What the cost service answers: reports, a job's cost, budgets and admission; over the ledger, worker lifetimes
and budgets in force."""

from __future__ import annotations

from collections.abc import Callable

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import InvalidArgument
from services.cost.budget_store import BudgetStore
from services.cost.budgets import BudgetStatus, parse_update
from services.cost.ledger import CostLedger
from services.cost.recommendations import Thresholds
from services.cost.records import CostRecord
from services.cost.reports import Period, Reports, build_reports
from services.cost.workers import WorkerLedger

DEFAULT_REPORT_DAYS = 30
# The longest period one report covers: a year and a month. Longer asks are refused, not cut, so a caller never
# mistakes a partial answer for the whole.
MAX_REPORT_DAYS = 400


class CostAccounts:
    def __init__(
        self,
        ledger: CostLedger,
        workers: WorkerLedger,
        budgets: BudgetStore,
        config: MeshConfig,
        clock: Clock,
        thresholds: Thresholds,
    ):
        self.ledger = ledger
        self.workers = workers
        self.budgets = budgets
        self.config = config
        self.clock = clock
        self.thresholds = thresholds

    def reports(self, tenant_id: str, start: float | None = None, end: float | None = None) -> Reports:
        """Over [start, end); by default the last 30 days up to now."""
        return self.report_job(tenant_id, start, end)()

    def report_job(self, tenant_id: str, start: float | None = None, end: float | None = None) -> Callable[[], Reports]:
        """Validates the period and takes a snapshot of what the report reads (on the caller's loop); the callable it
        returns computes the report from that snapshot alone, so it may run on another thread."""
        now = self.clock.now()
        end = now + 1 if end is None else end
        start = now - DEFAULT_REPORT_DAYS * 86400 if start is None else start
        if start >= end:
            raise InvalidArgument("start", "must be before end")
        if end - start > MAX_REPORT_DAYS * 86400:
            raise InvalidArgument(
                "start", f"the report period is at most {MAX_REPORT_DAYS} days; ask for several periods instead"
            )
        period = Period(start, end, now)
        records = list(self.ledger.records.values())
        intervals = self.workers.intervals
        allocations = self.ledger.allocations(since=start)
        daily, capacity = list(self.ledger.daily.values()), list(self.workers.capacity.values())
        config, th = self.config, self.thresholds
        return lambda: build_reports(records, tenant_id, period, config, intervals, allocations, th, daily, capacity)

    def job_cost(self, job: t.Job) -> list[CostRecord]:
        return self.ledger.job_cost(job)

    def budget(self, tenant_id: str) -> BudgetStatus:
        self.budgets.require_tenant(tenant_id)
        spent = self.ledger.spent_with_running(tenant_id, self.clock.now())
        return BudgetStatus(tenant_id, self.budgets.setting(tenant_id), spent)

    async def update_budget(self, tenant_id: str, limit: str, policy: str) -> BudgetStatus:
        self.budgets.require_tenant(tenant_id)
        setting = parse_update(limit, policy, self.budgets.setting(tenant_id))
        await self.budgets.update(tenant_id, setting)
        return self.budget(tenant_id)

    def check_budget(self, tenant_id: str) -> bool:
        """Raises ResourceExhausted (BUDGET_EXCEEDED) when the tenant's enforced budget is spent; else returns
        whether its budget is enforced."""
        status = self.budget(tenant_id)
        refusal = status.refusal(self.config.currency)
        if refusal is not None:
            raise refusal
        return status.enforced
