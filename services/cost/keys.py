"""The cost service's own etcd keys (records live in libs.keys, which other services read too)."""

from __future__ import annotations


class CostKeys:
    def __init__(self, prefix: str):
        self.p = prefix.rstrip("/")

    @property
    def workers(self) -> str:
        """Worker lifetimes, kept after the worker's own (leased) key is gone."""
        return f"{self.p}/cost/workers/"

    def worker(self, worker_id: str) -> str:
        return f"{self.p}/cost/workers/{worker_id}"

    @property
    def daily(self) -> str:
        """Rolled-up cost records: one aggregate per tenant, UTC day and pool (services/cost/daily.py)."""
        return f"{self.p}/cost/daily/"

    def daily_cost(self, tenant_id: str, day: str, pool_id: str) -> str:
        return f"{self.p}/cost/daily/{tenant_id}/{day}/{pool_id}"

    @property
    def capacity(self) -> str:
        """Pruned worker lifetimes: what each pool's workers cost per UTC day (services/cost/capacity.py)."""
        return f"{self.p}/cost/capacity/"

    def capacity_day(self, pool_id: str, day: str) -> str:
        return f"{self.p}/cost/capacity/{pool_id}/{day}"

    @property
    def budgets(self) -> str:
        return f"{self.p}/cost/budgets/"

    def budget(self, tenant_id: str) -> str:
        return f"{self.p}/cost/budgets/{tenant_id}"

    def budget_alert(self, tenant_id: str, month: str, percent: int) -> str:
        """Marks that a threshold's warning was logged for a tenant and month, so it is logged once."""
        return f"{self.p}/cost/budget-alerts/{tenant_id}/{month}/{percent}"
