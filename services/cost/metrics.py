"""The cost service's Prometheus metrics (all jobmesh_cost_*); amounts are integer micro-units of the currency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CostMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.charged = Counter(
            "jobmesh_cost_charged_micros_total",
            "Cost charged for ended attempts, in micro-units of the currency.",
            ["tenant", "pool"],
            registry=registry,
        )
        self.records = Counter("jobmesh_cost_records_total", "Cost records written.", registry=registry)
        self.write_failures = Counter(
            "jobmesh_cost_record_write_failures_total",
            "Cost record writes that failed (retried by the next cycle), by record: attempt or worker_lifetime.",
            ["record"],
            registry=registry,
        )
        self.unrecorded = Gauge(
            "jobmesh_cost_unrecorded_attempts", "Ended attempts whose record is not written yet.", registry=registry
        )
        self.tenant_running = Gauge(
            "jobmesh_cost_tenant_running_micros",
            "Cost accrued so far by the tenant's running attempts (priced at requested resources).",
            ["tenant"],
            registry=registry,
        )
        self.tenant_today = Gauge(
            "jobmesh_cost_tenant_today_micros",
            "Tenant cost today (UTC): charged attempts plus running ones so far.",
            ["tenant"],
            registry=registry,
        )
        self.tenant_month = Gauge(
            "jobmesh_cost_tenant_month_micros",
            "Tenant cost this calendar month (UTC): charged attempts plus running ones so far.",
            ["tenant"],
            registry=registry,
        )
        self.pool_month = Gauge(
            "jobmesh_cost_pool_month_micros",
            "What the pool's workers cost this month (worker-hours at full capacity).",
            ["pool"],
            registry=registry,
        )
        self.pool_idle_month = Gauge(
            "jobmesh_cost_pool_idle_month_micros",
            "Pool cost this month that no job used (pool cost minus jobs at base price).",
            ["pool"],
            registry=registry,
        )
        self.budget_limit = Gauge(
            "jobmesh_cost_budget_limit_micros", "Monthly budget of the tenant (0: none).", ["tenant"], registry=registry
        )
        self.budget_utilization = Gauge(
            "jobmesh_cost_budget_utilization_ratio",
            "Spend this month over the monthly budget (0 without a budget).",
            ["tenant"],
            registry=registry,
        )
        self.rollups = Counter(
            "jobmesh_cost_rollup_transactions_total",
            "Roll-up transactions of old cost records into daily aggregates, by outcome: done, conflict, failed.",
            ["outcome"],
            registry=registry,
        )
        self.rolled_records = Counter(
            "jobmesh_cost_rolled_up_records_total", "Cost records folded into daily aggregates.", registry=registry
        )
        self.stored_records = Gauge(
            "jobmesh_cost_stored_records", "Per-attempt cost records kept (not rolled up yet).", registry=registry
        )
        self.daily_aggregates = Gauge(
            "jobmesh_cost_daily_aggregates",
            "Daily aggregates (tenant, pool, UTC day) of rolled-up records.",
            registry=registry,
        )
        self.lifetimes_pruned = Counter(
            "jobmesh_cost_worker_lifetimes_pruned_total",
            "Ended worker lifetimes pruned for age or count, their capacity folded into daily aggregates.",
            registry=registry,
        )
        self.cycle_seconds = Histogram(
            "jobmesh_cost_cycle_phase_seconds",
            "Time spent in each phase of the periodic cost cycle.",
            ["phase"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
