"""Cost reports over a period: per tenant totals by pool and day, burst spend, recommendations, and idle. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from libs.config import MeshConfig
from services.cost.capacity import DailyCapacity, capacity_in
from services.cost.daily import DailyCost, allocated_in, in_period
from services.cost.idle import Allocation, WorkerInterval, by_day, by_pool, idle_cells, total
from services.cost.recommendations import (
    Recommendation,
    Thresholds,
    advice,
    history_of,
    shrink_idle_static_pools,
    tenant_recommendations,
)
from services.cost.records import CostRecord, day_of

# The all-tenants view carries idle cost as one more row, the way OpenCost shows its `__idle__` allocation.
IDLE_ROW = "__idle__"


@dataclass(frozen=True)
class Report:
    tenant_id: str
    total_micros: int = 0
    by_pool: dict[str, int] = field(default_factory=dict)
    by_day: dict[str, int] = field(default_factory=dict)
    burst_micros: int = 0
    jobs: int = 0
    recommendations: list[Recommendation] = field(default_factory=list)


@dataclass(frozen=True)
class Reports:
    reports: list[Report]
    idle_micros: int


@dataclass(frozen=True)
class Period:
    """[start, end) in epoch seconds; what has happened of it ends at `now`."""

    start: float
    end: float
    now: float

    @property
    def elapsed_seconds(self) -> float:
        return max(min(self.end, self.now) - self.start, 0.0)

    def holds(self, seconds: float) -> bool:
        return self.start <= seconds < self.end


def _sum_by(items: Iterable[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, micros in items:
        out[key] = out.get(key, 0) + micros
    return dict(sorted(out.items()))


def tenant_report(
    tenant_id: str,
    records: Sequence[CostRecord],
    config: MeshConfig,
    period: Period,
    th: Thresholds,
    daily: Sequence[DailyCost] = (),
) -> Report:
    """A tenant's charges in the period; an attempt counts in the period (and on the UTC day) in which it ended.
    `daily` are the tenant's rolled-up days in the period (services/cost/daily.py), counted as their records were."""
    history = sum((d.history for d in daily), history_of(records, config, th)) if daily else None
    return Report(
        tenant_id=tenant_id,
        total_micros=sum(r.cost_micros for r in records) + sum(d.cost_micros for d in daily),
        by_pool=_sum_by([*((r.pool_id, r.cost_micros) for r in records), *((d.pool_id, d.cost_micros) for d in daily)]),
        by_day=_sum_by([*((day_of(r.end), r.cost_micros) for r in records), *((d.day, d.cost_micros) for d in daily)]),
        burst_micros=sum(r.cost_micros for r in records if r.burst) + sum(d.burst_micros for d in daily),
        jobs=len({r.job_id for r in records}) + sum(d.jobs for d in daily),
        recommendations=(
            tenant_recommendations(records, config, period.elapsed_seconds, th)
            if history is None
            else advice(history, config, period.elapsed_seconds, th)
        ),
    )


def build_reports(
    records: Iterable[CostRecord],
    tenant_id: str,
    period: Period,
    config: MeshConfig,
    intervals: Iterable[WorkerInterval],
    allocations: Iterable[Allocation],
    th: Thresholds,
    daily: Iterable[DailyCost] = (),
    capacity: Iterable[DailyCapacity] = (),
) -> Reports:
    """One tenant's report, or (tenant_id empty) every charged tenant's plus the idle row; `daily` are the rolled-up
    days (their records are gone), `allocations` the worker time of the records that are not."""
    mine: dict[str, list[CostRecord]] = {tenant_id: []} if tenant_id else {}
    for r in records:
        if (not tenant_id or r.tenant_id == tenant_id) and period.holds(r.end):
            mine.setdefault(r.tenant_id, []).append(r)
    daily = list(daily)
    days: dict[str, list[DailyCost]] = {}
    for d in in_period(daily, period.start, period.end):
        # A day with only the allocation of attempts that ended later is idle cost's, not the tenant's.
        if d.attempts and (not tenant_id or d.tenant_id == tenant_id):
            days.setdefault(d.tenant_id, []).append(d)
            mine.setdefault(d.tenant_id, [])
    reports = [tenant_report(tid, recs, config, period, th, days.get(tid, ())) for tid, recs in sorted(mine.items())]
    until = min(period.end, period.now)
    rolled = allocated_in(daily, period.start, until)
    pruned = capacity_in(capacity, period.start, until)
    cells = idle_cells(config, intervals, allocations, period.start, period.end, period.now, rolled, pruned)
    idle_total = total(cells).idle_micros
    if not tenant_id and cells:
        pools = by_pool(cells)
        reports.append(
            Report(
                tenant_id=IDLE_ROW,
                total_micros=idle_total,
                by_pool={p: c.idle_micros for p, c in sorted(pools.items())},
                by_day={d: c.idle_micros for d, c in sorted(by_day(cells).items())},
                recommendations=shrink_idle_static_pools(pools, config, th),
            )
        )
    return Reports(reports, idle_total)
