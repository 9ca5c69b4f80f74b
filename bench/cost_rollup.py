"""What the cost roll-up buys, against a private etcd: per-attempt records of `--jobs` jobs spread over `--days`
days are charged through the ledger, then rolled up into daily aggregates. Prints the keys and bytes the cost
prefix holds, how long an all-tenants report over the whole span and over 30 days takes, before and after, the
roll-up rate, and whether the reports are equal to the micro.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry

from devtools.launcher import Ports, Stack
from libs.clock import FakeClock
from libs.etcd.client import Etcd, KeyValue, WatchEvent
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
from tests.helpers import FIXTURE_CONFIG
from tests.unit.cost_builders import HOUR, MIDNIGHT, JobBuilder, priced_mesh

CONFIG = priced_mesh()
KEYS, COST_KEYS = Keys("/jobmesh"), CostKeys("/jobmesh")
DAY = 24 * HOUR


def jobs(count: int, days: int) -> list[WatchEvent]:
    events = []
    for i in range(count):
        start = MIDNIGHT + (i * days * DAY) / count
        job = JobBuilder(f"j{i:06d}", ("acme", "globex", "initech")[i % 3], cpu_millis=250 * (1 + i % 4))
        job.ended(start, start + 600 + i % 1800, "dynamic-large" if i % 2 else "static-general", 60.0, 100)
        if i % 7 == 0:
            job.ended(start + 3000, start + 3600)  # retried
        built = job.build()
        events.append(
            WatchEvent(
                "put", KeyValue(KEYS.job(built.tenant_id, built.job_id), built.SerializeToString(), 1, 1, 1, 0), 1
            )
        )
    return events


async def prefix_size(etcd: Etcd, prefix: str) -> tuple[int, int]:
    kvs, _, _ = await etcd.get_prefix(prefix)
    return len(kvs), sum(len(kv.key) + len(kv.value) for kv in kvs)


def same_money(a: Reports, b: Reports) -> bool:
    """Equal to the micro in every amount and recommendation; `jobs` may differ by the jobs whose attempts ended on
    both sides of a period's edge (a rolled-up job counts on the day of its last attempt: docs/cost.md)."""
    return replace(a, reports=[replace(r, jobs=0) for r in a.reports]) == replace(
        b, reports=[replace(r, jobs=0) for r in b.reports]
    )


def timed_report(accounts: CostAccounts, start: float, end: float) -> tuple[float, Reports]:
    began = time.perf_counter()
    report = accounts.reports("", start, end)
    return (time.perf_counter() - began) * 1000, report


async def run(etcd: Etcd, count: int, days: int) -> dict[str, object]:
    clock = FakeClock(MIDNIGHT + (days + 8) * DAY)
    metrics = CostMetrics(CollectorRegistry())
    ledger = CostLedger(etcd, KEYS, CONFIG, clock, metrics)
    workers = WorkerLedger(etcd, COST_KEYS, CONFIG, clock, metrics)
    accounts = CostAccounts(ledger, workers, BudgetStore(etcd, COST_KEYS, CONFIG), CONFIG, clock, Thresholds())
    rollup = CostRollup(
        etcd,
        KEYS,
        COST_KEYS,
        ledger,
        CONFIG,
        clock,
        metrics,
        Thresholds(),
        stored_jobs=lambda: (),
        age_seconds=7 * DAY,
        max_batches=10**9,
        limits=Limits(),
    )
    events = jobs(count, days)
    for first in range(0, len(events), 500):
        await ledger.on_job_events(events[first : first + 500])
    records = len(ledger.records)
    span = (MIDNIGHT, MIDNIGHT + days * DAY)
    month = (MIDNIGHT + (days - 30) * DAY, MIDNIGHT + days * DAY)
    out: dict[str, object] = {"jobs": count, "records": records, "days": days}
    keys_before = await prefix_size(etcd, KEYS.cost_records)
    span_ms, span_report = timed_report(accounts, *span)
    month_ms, month_report = timed_report(accounts, *month)

    began = time.perf_counter()
    rolled = await rollup.run_once()
    seconds = time.perf_counter() - began

    keys_after = await prefix_size(etcd, KEYS.cost_records)
    daily = await prefix_size(etcd, COST_KEYS.daily)
    span_ms_after, span_after = timed_report(accounts, *span)
    month_ms_after, month_after = timed_report(accounts, *month)
    out.update(
        rolled=rolled,
        rollup_seconds=round(seconds, 2),
        records_per_second=round(rolled / seconds),
        transactions=metrics.rollups.labels("done")._value.get(),
        before={"record_keys": keys_before[0], "bytes": keys_before[1]},
        after={"record_keys": keys_after[0], "daily_keys": daily[0], "bytes": keys_after[1] + daily[1]},
        report_ms={
            f"{days} days before": round(span_ms, 1),
            f"{days} days after": round(span_ms_after, 1),
            "30 days before": round(month_ms, 1),
            "30 days after": round(month_ms_after, 1),
        },
        money_equal=same_money(span_report, span_after) and same_money(month_report, month_after),
        jobs_counted={
            "before": [sum(r.jobs for r in rep.reports) for rep in (span_report, month_report)],
            "after": [sum(r.jobs for r in rep.reports) for rep in (span_after, month_after)],
        },
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=90)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(data_dir=Path(tmp), config_path=FIXTURE_CONFIG, ports=Ports.free(), env={})
        try:
            stack.start_etcd()
            stack.wait_etcd(30)

            async def go() -> dict[str, object]:
                etcd = stack.etcd_client(timeout=30)
                try:
                    return await run(etcd, args.jobs, args.days)
                finally:
                    await etcd.close()

            print(json.dumps(asyncio.run(go()), indent=2))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
