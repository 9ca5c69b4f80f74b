"""Cost reports over a period: per tenant totals by pool and day, burst spend, recommendations, and idle. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from libs.config import MeshConfig
from services.cost.idle import Allocation, WorkerInterval, by_day, by_pool, idle_cells, total
from services.cost.recommendations import Recommendation, Thresholds, shrink_idle_static_pools, tenant_recommendations
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
    tenant_id: str, records: Sequence[CostRecord], config: MeshConfig, period: Period, th: Thresholds
) -> Report:
    """A tenant's charges in the period; an attempt counts in the period (and on the UTC day) in which it ended."""
    return Report(
        tenant_id=tenant_id,
        total_micros=sum(r.cost_micros for r in records),
        by_pool=_sum_by((r.pool_id, r.cost_micros) for r in records),
        by_day=_sum_by((day_of(r.end), r.cost_micros) for r in records),
        burst_micros=sum(r.cost_micros for r in records if r.burst),
        jobs=len({r.job_id for r in records}),
        recommendations=tenant_recommendations(records, config, period.elapsed_seconds, th),
    )


def build_reports(
    records: Iterable[CostRecord],
    tenant_id: str,
    period: Period,
    config: MeshConfig,
    intervals: Iterable[WorkerInterval],
    allocations: Iterable[Allocation],
    th: Thresholds,
) -> Reports:
    """One tenant's report, or (tenant_id empty) every charged tenant's plus the idle row."""
    mine: dict[str, list[CostRecord]] = {tenant_id: []} if tenant_id else {}
    for r in records:
        if (not tenant_id or r.tenant_id == tenant_id) and period.holds(r.end):
            mine.setdefault(r.tenant_id, []).append(r)
    reports = [tenant_report(tid, recs, config, period, th) for tid, recs in sorted(mine.items())]
    cells = idle_cells(config, intervals, allocations, period.start, period.end, period.now)
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
