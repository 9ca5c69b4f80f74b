"""Between the cost core's plain values and the protos of the cost API."""

from __future__ import annotations

from datetime import UTC, datetime

from jobmesh.common.v1 import cost_pb2 as ct
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2 as c
from libs.errors import InvalidArgument
from services.cost.budgets import BudgetStatus
from services.cost.pricing import format_micros
from services.cost.records import CostRecord
from services.cost.reports import Report, Reports


def money(micros: int, currency: str) -> t.Money:
    return t.Money(currency=currency, micros=micros, amount=format_micros(micros))


def parse_time(field: str, value: str) -> float | None:
    """An RFC 3339 time (a date alone, or a time without offset, is taken as UTC); None when empty."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(field, "must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def job_cost(records: list[CostRecord], currency: str) -> t.JobCost:
    attempts = [
        t.AttemptCost(attempt=r.attempt, cost=money(r.cost_micros, currency), run_seconds=r.run_seconds, burst=r.burst)
        for r in records
    ]
    return t.JobCost(total=money(sum(r.cost_micros for r in records), currency), attempts=attempts)


def report(r: Report, currency: str) -> ct.CostReport:
    return ct.CostReport(
        tenant_id=r.tenant_id,
        total=money(r.total_micros, currency),
        by_pool=[ct.CostLine(key=k, cost=money(v, currency)) for k, v in r.by_pool.items()],
        by_day=[ct.CostLine(key=k, cost=money(v, currency)) for k, v in r.by_day.items()],
        burst_spend=money(r.burst_micros, currency),
        jobs=r.jobs,
        recommendations=[
            ct.Recommendation(
                kind=x.kind, description=x.description, estimated_savings=money(x.savings_micros, currency)
            )
            for x in r.recommendations
        ],
    )


def reports(rs: Reports, currency: str) -> c.GetCostReportsResponse:
    return c.GetCostReportsResponse(
        reports=[report(r, currency) for r in rs.reports], idle_cost=money(rs.idle_micros, currency)
    )


def budget(status: BudgetStatus, currency: str) -> ct.Budget:
    out = ct.Budget(
        tenant_id=status.tenant_id,
        spent_this_month=money(status.spent_micros, currency),
        utilization=status.utilization,
    )
    if status.setting is not None and status.setting.active:
        out.monthly_limit.CopyFrom(money(status.setting.limit_micros, currency))
        out.policy = status.setting.policy
    return out
