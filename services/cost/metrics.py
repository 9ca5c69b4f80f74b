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
            "Cost accrued so far by the tenant's running attempts, at max(requested, used) from each one's latest "
            "usage sample (at requested resources until one comes).",
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
        self._retention_metrics(registry)
        self._usage_metrics(registry)
        self.cycle_seconds = Histogram(
            "jobmesh_cost_cycle_phase_seconds",
            "Time spent in each phase of the periodic cost cycle.",
            ["phase"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )

    def forget_published(self) -> None:
        """A replica that stops leading stops showing the spend, pool and budget figures it published: dashboards
        and rules add them over instances, so only the leader's may be there."""
        for gauge in (
            self.tenant_running,
            self.tenant_today,
            self.tenant_month,
            self.pool_month,
            self.pool_idle_month,
            self.budget_limit,
            self.budget_utilization,
        ):
            gauge.clear()
        self.stored_records.set(0)
        self.daily_aggregates.set(0)

    def _usage_metrics(self, registry: CollectorRegistry) -> None:
        """What the tenants' ended attempts used, as measured on the workers (each attempt counted once, when its
        cost record is written)."""
        self.used_cpu = Counter(
            "jobmesh_cost_used_cpu_seconds_total",
            "CPU seconds used by ended attempts (measured: the job's cgroup), by tenant and pool.",
            ["tenant", "pool"],
            registry=registry,
        )
        self.used_memory = Counter(
            "jobmesh_cost_used_memory_byte_seconds_total",
            "Peak memory (bytes, measured) times run time of ended attempts, by tenant and pool.",
            ["tenant", "pool"],
            registry=registry,
        )
        self.execution = Histogram(
            "jobmesh_job_execution_seconds",
            "Run time of ended attempts (start to end on the worker), by tenant and pool.",
            ["tenant", "pool"],
            registry=registry,
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
        )

    def _retention_metrics(self, registry: CollectorRegistry) -> None:
        """What the roll-up of old records and the pruning of worker lifetimes did."""
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
