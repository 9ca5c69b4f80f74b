"""The periodic cost cycle: retry unwritten records, then publish spend, pool and budget gauges and warnings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from jobmesh.common.v1 import types_pb2 as t
from libs.config import Pruning
from services.cost.accounts import CostAccounts
from services.cost.budgets import month_window
from services.cost.capacity import capacity_in
from services.cost.idle import by_pool, idle_cells
from services.cost.metrics import CostMetrics
from services.cost.pricing import format_micros
from services.cost.records import month_of
from services.cost.rollup import CostRollup

log = logging.getLogger(__name__)

JobSource = Callable[[], Iterable[tuple[str, t.Job]]]


class CostCycle:
    def __init__(
        self,
        accounts: CostAccounts,
        jobs: JobSource,
        metrics: CostMetrics,
        *,
        interval: float,
        rescan_every: int,
        rollup: CostRollup | None = None,
        lifetimes: Pruning | None = None,
        leading: Callable[[], bool] = lambda: True,
    ):
        self.accounts = accounts
        self.rollup = rollup
        self.lifetimes = lifetimes  # how worker lifetimes are pruned (None: kept)
        self.jobs = jobs
        self.metrics = metrics
        self.interval = interval
        self.rescan_every = max(rescan_every, 1)
        self.cycles = 0
        # Only the cost leader runs cycles (every phase writes or publishes what one replica must); a standby
        # looks again this often, so a new term's first cycle follows its start closely.
        self.leading = leading
        self.standby_poll = min(interval, 0.25)
        self._wake = asyncio.Event()

    def new_term(self) -> None:
        """A term begins: its first cycle runs now, with a rescan (what ended while no leader wrote is charged)."""
        self.cycles = 0
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            self._wake.clear()
            leading = self.leading()
            if leading:
                try:
                    await self.run_once()
                except Exception:
                    log.exception("cost cycle failed; next one in %.0fs", self.interval)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval if leading else self.standby_poll)
            except TimeoutError:
                pass

    async def run_once(self) -> None:
        # 1. Charge: write records that failed before; now and then re-read every job for anything missed.
        with self.metrics.cycle_seconds.labels("charge").time():
            if self.cycles % self.rescan_every == 0:
                await self.accounts.ledger.rescan(self.jobs())
            else:
                await self.accounts.ledger.flush()
            await self.accounts.workers.flush()
        # 2. Tenants: what they spend today, this month and on running attempts.
        with self.metrics.cycle_seconds.labels("tenants").time():
            self.publish_tenants()
        # 3. Pools: what they cost this month and how much of it no job used.
        with self.metrics.cycle_seconds.labels("pools").time():
            self.publish_pools()
        # 4. Budgets: utilization, and a warning the first time a threshold is crossed in a month.
        with self.metrics.cycle_seconds.labels("budgets").time():
            await self.check_budgets()
        # 5. Bounded state, as often as the rescan (each pass reads every record and lifetime; what it waits for
        # is days old): old records of deleted jobs folded into daily aggregates, old worker lifetimes into daily
        # capacity. Reports over those days stay the same.
        if self.cycles % self.rescan_every == 0:
            with self.metrics.cycle_seconds.labels("rollup").time():
                if self.rollup is not None:
                    await self.rollup.run_once()
                if self.lifetimes is not None:
                    await self.accounts.workers.prune(self.lifetimes)
        self.cycles += 1

    def tenants(self) -> set[str]:
        seen = {r.tenant_id for r in self.accounts.ledger.records.values()}
        seen |= {d.tenant_id for d in self.accounts.ledger.daily.values()}
        return set(self.accounts.config.tenants) | seen

    def publish_tenants(self) -> None:
        ledger, now = self.accounts.ledger, self.accounts.clock.now()
        running: dict[str, int] = {}
        for r in ledger.accruing():
            running[r.tenant_id] = running.get(r.tenant_id, 0) + r.cost_micros
        for tenant_id in self.tenants():
            self.metrics.tenant_running.labels(tenant_id).set(running.get(tenant_id, 0))
            self.metrics.tenant_today.labels(tenant_id).set(ledger.spent_with_running(tenant_id, now, today=True))
            self.metrics.tenant_month.labels(tenant_id).set(ledger.spent_with_running(tenant_id, now))

    def publish_pools(self) -> None:
        a, now = self.accounts, self.accounts.clock.now()
        start, end = month_window(now)
        # Month windows start at a UTC midnight, so durable records count through their per-day index.
        unwritten = a.ledger.unwritten_allocations(since=start)
        capacity = capacity_in(a.workers.capacity.values(), start, now)
        cells = idle_cells(
            a.config, a.workers.intervals, unwritten, start, end, now, a.ledger.allocated_by_day, capacity
        )
        pools = by_pool(cells)
        for pool in a.config.pools:
            cell = pools.get(pool.pool_id)
            self.metrics.pool_month.labels(pool.pool_id).set(cell.capacity_micros if cell else 0)
            self.metrics.pool_idle_month.labels(pool.pool_id).set(cell.idle_micros if cell else 0)

    async def check_budgets(self) -> None:
        a = self.accounts
        month = month_of(a.clock.now())
        for tenant_id in a.config.tenants:
            status = a.budget(tenant_id)
            self.metrics.budget_limit.labels(tenant_id).set(status.limit_micros)
            self.metrics.budget_utilization.labels(tenant_id).set(status.utilization)
            for threshold in status.crossed():
                if await a.budgets.first_warning(tenant_id, month, round(threshold * 100)):
                    log.warning(
                        "tenant %s crossed %.0f%% of its monthly budget: %.0f%% spent (%s of %s %s, policy %s)",
                        tenant_id,
                        threshold * 100,
                        status.utilization * 100,
                        format_micros(status.spent_micros),
                        format_micros(status.limit_micros),
                        a.config.currency,
                        status.setting.policy if status.setting else "",
                        extra={"tenant_id": tenant_id},
                    )
