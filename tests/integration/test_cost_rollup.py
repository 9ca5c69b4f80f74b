"""The cost roll-up (services/cost/rollup.py) against a real etcd: reports over old periods are the same to the
micro before and after the records roll up, read back by a restarted ledger, whatever crashes around the roll-up
transaction; a job that is still stored keeps its records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import FakeClock
from libs.errors import Unavailable
from libs.etcd.client import Compare, Etcd, KeyValue, RequestOp, TxnResult, WatchEvent
from libs.keys import Keys
from services.cost.accounts import CostAccounts
from services.cost.budget_store import BudgetStore
from services.cost.daily import Limits
from services.cost.keys import CostKeys
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.recommendations import Thresholds
from services.cost.reports import Reports
from services.cost.rollup import CostRollup
from services.cost.workers import WorkerLedger
from tests.unit.cost_builders import HOUR, MIDNIGHT, JobBuilder, priced_mesh

pytestmark = pytest.mark.asyncio

CONFIG = priced_mesh()
KEYS, COST_KEYS = Keys("/jobmesh"), CostKeys("/jobmesh")
DAY = 24 * HOUR
WEEK = 7 * DAY
# Thirty jobs over three days (retried, burst, across midnight, measured), two tenants and both pools.
JOBS = [
    (
        JobBuilder(f"j{i}", "acme" if i % 3 else "globex", cpu_millis=250 * (1 + i % 4))
        .ended(
            MIDNIGHT + i * 2.3 * HOUR,
            MIDNIGHT + i * 2.3 * HOUR + (i % 5 + 1) * 0.7 * HOUR,
            pool_id="dynamic-large" if i % 2 else "static-general",
            cpu_seconds=30.0 * i,
            memory_mb=50 + i,
        )
        .build()
    )
    for i in range(30)
]
JOBS[4].burst_session_id = "burst-1"
JOBS[7].burst_session_id = "burst-1"
JOBS[9].burst_session_id = "burst-1"
JOBS[10] = (
    JobBuilder("retried", "acme")
    .ended(MIDNIGHT + 3 * HOUR, MIDNIGHT + 4 * HOUR)
    .ended(MIDNIGHT + DAY + HOUR, MIDNIGHT + DAY + 2 * HOUR)
    .build()
)
NOW = MIDNIGHT + 3 * DAY + WEEK + HOUR  # every attempt ended more than a week ago


class Service:
    """The cost core as app.py composes it, over a real etcd; `restart()` builds a new one from what is stored."""

    def __init__(self, store: Any, clock: FakeClock, limits: Limits = Limits()):
        self.store = store
        self.clock = clock
        self.registry = CollectorRegistry()
        metrics = CostMetrics(self.registry)
        self.ledger = CostLedger(store, KEYS, CONFIG, clock, metrics)
        workers = WorkerLedger(store, COST_KEYS, CONFIG, clock, metrics)
        self.accounts = CostAccounts(
            self.ledger, workers, BudgetStore(store, COST_KEYS, CONFIG), CONFIG, clock, Thresholds()
        )
        self.stored_jobs: set[str] = set()
        self.rollup = CostRollup(
            store,
            KEYS,
            COST_KEYS,
            self.ledger,
            CONFIG,
            clock,
            metrics,
            Thresholds(),
            stored_jobs=lambda: self.stored_jobs,
            age_seconds=WEEK,
            limits=limits,
        )

    async def load(self, etcd: Etcd) -> None:
        for prefix, handler in (
            (KEYS.cost_records, self.ledger.on_record_event),
            (COST_KEYS.daily, self.ledger.on_daily_event),
        ):
            kvs, revision, _ = await etcd.get_prefix(prefix)
            for kv in kvs:
                handler(WatchEvent("put", kv, revision))

    def report(self, tenant: str = "") -> Reports:
        return self.accounts.reports(tenant, MIDNIGHT - DAY, MIDNIGHT + 5 * DAY)

    def reports(self) -> list[Reports]:
        return [self.report(tenant) for tenant in ("", "acme", "globex")]

    def spent(self) -> list[int]:
        return [self.ledger.spent(tenant, month="2026-03") for tenant in ("acme", "globex")]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def charged(etcd: Etcd, clock: FakeClock) -> Service:
    """A service that charged every job of JOBS (whose records are then gone from etcd: retention deleted them)."""
    service = Service(etcd, clock)
    events = [WatchEvent("put", _job_kv(job), 1) for job in JOBS]
    await service.ledger.on_job_events(events)
    assert not service.ledger.pending
    assert len(service.ledger.records) == 31
    return service


def _job_kv(job: t.Job) -> KeyValue:
    return KeyValue(KEYS.job(job.tenant_id, job.job_id), job.SerializeToString(), 1, 1, 1, 0)


async def stored_keys(etcd: Etcd, prefix: str) -> list[str]:
    kvs, _, _ = await etcd.get_prefix(prefix, keys_only=True)
    return [kv.key for kv in kvs]


async def test_reports_are_the_same_to_the_micro_after_the_records_roll_up_and_after_a_restart(etcd: Etcd) -> None:
    clock = FakeClock(NOW)
    service = await charged(etcd, clock)
    before, spent = service.reports(), service.spent()
    assert before[0].reports[0].total_micros > 0 and before[0].idle_micros != 0

    # Small batches: several transactions, aggregates written more than once.
    service.rollup.limits = Limits(records=7, jobs=5, cells=8)
    assert await service.rollup.run_once() == 31

    assert await stored_keys(etcd, KEYS.cost_records) == []
    assert len(await stored_keys(etcd, COST_KEYS.daily)) == len(service.ledger.daily) > 0
    assert service.reports() == before and service.spent() == spent
    assert service.metric("jobmesh_cost_rolled_up_records_total") == 31
    assert service.metric("jobmesh_cost_stored_records") == 0
    restarted = Service(etcd, clock)
    await restarted.load(etcd)
    assert restarted.reports() == before and restarted.spent() == spent
    assert await restarted.rollup.run_once() == 0


async def test_records_younger_than_the_roll_up_age_or_of_a_stored_job_stay(etcd: Etcd) -> None:
    clock = FakeClock(MIDNIGHT + DAY + WEEK)  # the first day's attempts are due, not the later ones
    service = await charged(etcd, clock)
    before = service.reports()
    service.stored_jobs = {"acme/j1"}  # the informer still sees it
    # j2 is stored in etcd but the cache missed it: the transaction's compare still keeps its records.
    job = JOBS[2]
    await etcd.put(KEYS.job(job.tenant_id, job.job_id), job.SerializeToString())
    service.rollup.limits = Limits(records=1, jobs=1, cells=8)

    rolled = await service.rollup.run_once()

    kept = await stored_keys(etcd, KEYS.cost_records)
    left = {key.rsplit("/", 2)[-2] for key in kept}
    assert {"j1", "j2", "retried"} <= left  # retried's second attempt is not old enough
    assert rolled == 31 - len(kept)
    assert any(j.job_id not in left for j in JOBS)
    assert service.metric("jobmesh_cost_rollup_transactions_total", outcome="conflict") == 1
    assert service.reports() == before


class LostReply:
    """etcd applies the transaction, and the reply is lost: the process died before it learnt the outcome."""

    def __init__(self, etcd: Etcd, before: bool = False):
        self.etcd = etcd
        self.before = before  # the crash comes before the transaction reaches etcd instead

    def __getattr__(self, name: str) -> Any:
        return getattr(self.etcd, name)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult:
        if not self.before:
            await self.etcd.txn(compare, success, failure)
        raise Unavailable("etcd: UNAVAILABLE", reason="STORE_UNAVAILABLE")


@pytest.mark.parametrize("crash", ["after the roll-up transaction", "before the roll-up transaction"])
async def test_a_crash_around_a_roll_up_loses_no_cost_and_counts_nothing_twice(etcd: Etcd, crash: str) -> None:
    clock = FakeClock(NOW)
    service = await charged(etcd, clock)
    before, spent = service.reports(), service.spent()
    service.rollup.store = LostReply(etcd, before=crash.startswith("before"))

    assert await service.rollup.run_once() == 0  # the outcome is unknown to the process
    assert service.metric("jobmesh_cost_rollup_transactions_total", outcome="failed") >= 1

    # The process is gone; the next one reads etcd, rolls up what is left, and its reports have not moved.
    restarted = Service(etcd, clock)
    await restarted.load(etcd)
    assert restarted.reports() == before and restarted.spent() == spent
    await restarted.rollup.run_once()
    assert await stored_keys(etcd, KEYS.cost_records) == []
    again = Service(etcd, clock)
    await again.load(etcd)
    assert again.reports() == before and again.spent() == spent
