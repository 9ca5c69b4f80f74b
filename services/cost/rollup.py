"""Rolls old cost records up into daily aggregates (services/cost/daily.py) and deletes them, in one etcd
transaction per batch, so that a crash anywhere leaves each batch either whole or untouched.

Each transaction compares that every record is still there, that every job's record is gone (a stored job could
have its attempts charged again) and that every aggregate is unchanged since we read it, then writes the new
aggregates and deletes the records. So no record's cost is lost or counted twice, whatever crashes, whichever
replica runs it, and however often: a batch that lost a race is simply planned again from what is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError
from libs.etcd.client import cmp_exists, cmp_missing, cmp_mod, op_delete, op_put
from libs.keys import Keys
from services.cost.daily import Limits, batches, due_jobs, fold, merged
from services.cost.keys import CostKeys
from services.cost.ledger import CostLedger, RecordStore
from services.cost.metrics import CostMetrics
from services.cost.recommendations import Thresholds
from services.cost.records import CostRecord

log = logging.getLogger(__name__)


class CostRollup:
    def __init__(
        self,
        store: RecordStore,
        keys: Keys,
        cost_keys: CostKeys,
        ledger: CostLedger,
        config: MeshConfig,
        clock: Clock,
        metrics: CostMetrics,
        thresholds: Thresholds,
        *,
        stored_jobs: Callable[[], Iterable[str]],
        age_seconds: float,
        max_batches: int = 25,
        limits: Limits = Limits(),
    ):
        self.store = store
        self.keys = keys
        self.cost_keys = cost_keys
        self.ledger = ledger
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.thresholds = thresholds
        self.stored_jobs = stored_jobs  # "tenant/job" of every job record the cost service sees
        self.age = age_seconds  # 0: never
        self.max_batches = max_batches  # per run: a long backlog is worked off over several cycles
        self.limits = limits

    def held(self) -> set[str]:
        """Jobs whose records must stay: still stored, or with an attempt whose record is not written yet."""
        pending = {f"{r.tenant_id}/{r.job_id}" for r in self.ledger.pending.values()}
        return pending | set(self.stored_jobs())

    async def run_once(self) -> int:
        """Rolls up what is due, up to `max_batches` transactions; returns how many records were rolled up."""
        if self.age <= 0:
            return 0
        due = due_jobs(self.ledger.records, self.clock.now() - self.age, self.held())
        rolled = 0
        for batch in batches(due, self.limits)[: self.max_batches]:
            rolled += await self._roll(batch)
        self.metrics.daily_aggregates.set(len(self.ledger.daily))
        self.metrics.stored_records.set(len(self.ledger.records))
        if rolled:
            log.info("rolled %d cost records up into daily aggregates", rolled)
        return rolled

    async def _roll(self, jobs: list[list[tuple[str, CostRecord]]]) -> int:
        daily = merged(self.ledger.daily, fold(jobs, self.config, self.thresholds)).values()
        records = [key for group in jobs for key, _ in group]
        compares = [cmp_exists(key) for key in records]
        compares += [cmp_missing(self.keys.job(r.tenant_id, r.job_id)) for r in (group[0][1] for group in jobs)]
        ops = []
        for d in daily:
            key = self.cost_keys.daily_cost(d.tenant_id, d.day, d.pool_id)
            revision = self.ledger.daily_revision.get(d.cell, 0)
            compares.append(cmp_mod(key, revision) if revision else cmp_missing(key))
            ops.append(op_put(key, d.to_json()))
        ops += [op_delete(key) for key in records]
        try:
            result = await self.store.txn(compares, ops)
        except JobMeshError as exc:
            # Applied or not, the informers will say; the next run plans from what they said.
            self.metrics.rollups.labels("failed").inc()
            log.warning("cost roll-up of %d records not written (%s); retrying next cycle", len(records), exc.reason)
            return 0
        if not result.succeeded:
            self.metrics.rollups.labels("conflict").inc()
            log.info("cost roll-up lost a race (an aggregate, record or job changed); replanned next cycle")
            return 0
        self.ledger.rolled_up(records, daily, result.revision)
        self.metrics.rollups.labels("done").inc()
        self.metrics.rolled_records.inc(len(records))
        return len(records)
