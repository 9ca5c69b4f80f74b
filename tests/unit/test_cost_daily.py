"""Daily aggregates (services/cost/daily.py): which records roll up, how they fold, and that reports, spend and idle
cost read the same from aggregates as from the records they replaced."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry

from libs.clock import FakeClock
from libs.keys import Keys
from services.cost.daily import DailyCost, Limits, batches, due_jobs, fold, job_of, merged
from services.cost.idle import Allocation, WorkerInterval
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.recommendations import Thresholds
from services.cost.records import CostRecord, base_micros
from services.cost.reports import Period, Reports, build_reports
from tests.unit.cost_builders import HOUR, MIDNIGHT, FakeEtcd, priced, priced_mesh, record

CONFIG = priced_mesh()
KEYS = Keys("/jobmesh")
DAY = 24 * HOUR
TH = Thresholds()


def keyed(records: list[CostRecord]) -> dict[str, CostRecord]:
    return {KEYS.cost_record(r.tenant_id, r.job_id, r.attempt): r for r in records}


# A mix that exercises every sum: two tenants, both pools, burst, a retried job whose attempts end on different
# days, an attempt across midnight, measured (oversized) attempts, and steady dynamic load.
RECORDS = keyed(
    [
        priced(record("acme", "a1", used_memory_mb=100, used_cpu_seconds=60), CONFIG),
        priced(record("acme", "a2", start=MIDNIGHT + DAY - HOUR, hours=3, pool_id="dynamic-large"), CONFIG),
        priced(record("acme", "a3", start=MIDNIGHT + DAY, burst=True, pool_id="dynamic-large"), CONFIG),
        priced(record("acme", "a3", start=MIDNIGHT + DAY + HOUR, burst=True, attempt=2), CONFIG),
        priced(record("acme", "a4", start=MIDNIGHT + 2 * DAY, burst=True, cpu_millis=500), CONFIG),
        priced(record("acme", "r1", start=MIDNIGHT + 2 * HOUR), CONFIG),
        priced(record("acme", "r1", start=MIDNIGHT + DAY + 2 * HOUR, attempt=2), CONFIG),
        *(
            priced(record("globex", f"s{i}", start=MIDNIGHT + i * HOUR, pool_id="dynamic-large"), CONFIG)
            for i in range(20)
        ),
    ]
)
WORKERS = [
    WorkerInterval("s1", "static-general", MIDNIGHT - DAY, None, 1000, 1024),
    WorkerInterval("d1", "dynamic-large", MIDNIGHT, MIDNIGHT + 3 * DAY, 2000, 2048),
]
NOW = MIDNIGHT + 10 * DAY


def report(records: dict[str, CostRecord], daily: list[DailyCost], period: Period, tenant: str = "") -> Reports:
    allocations = [Allocation(r.pool_id, r.start, r.end, base_micros(r, CONFIG)) for r in records.values()]
    return build_reports(records.values(), tenant, period, CONFIG, WORKERS, allocations, TH, daily)


def rolled(records: dict[str, CostRecord], jobs: list[str]) -> tuple[dict[str, CostRecord], list[DailyCost]]:
    """The records left and the aggregates made when the given jobs ("tenant/job") are rolled up."""
    groups = [[(k, r) for k, r in records.items() if job_of(k) == job] for job in jobs]
    daily = list(fold(groups, CONFIG, TH).values())
    return {k: r for k, r in records.items() if job_of(k) not in jobs}, daily


def test_a_report_over_whole_days_is_the_same_to_the_micro_after_everything_rolls_up() -> None:
    period = Period(MIDNIGHT - DAY, MIDNIGHT + 4 * DAY, NOW)
    before = report(RECORDS, [], period)

    left, daily = rolled(RECORDS, sorted({job_of(k) for k in RECORDS}))

    assert left == {}
    assert report(left, daily, period) == before
    for tenant in ("acme", "globex"):
        assert report(left, daily, period, tenant) == report(RECORDS, [], period, tenant)
    kinds = {rec.kind for r in before.reports for rec in r.recommendations}
    assert {"RIGHTSIZE_MEMORY", "RIGHTSIZE_CPU", "QUOTA_INSTEAD_OF_BURST"} <= kinds
    assert before.idle_micros != 0


def test_a_report_is_the_same_when_only_some_jobs_rolled_up_and_others_are_still_records() -> None:
    period = Period(MIDNIGHT, MIDNIGHT + 2 * DAY, NOW)
    left, daily = rolled(RECORDS, ["acme/a1", "acme/a3", "globex/s3", "globex/s4"])

    assert report(left, daily, period) == report(RECORDS, [], period)


def without_jobs(reports: Reports) -> Reports:
    return replace(reports, reports=[replace(r, jobs=0) for r in reports.reports])


def test_each_day_of_a_longer_period_matches_as_well_but_a_job_split_across_days_counts_on_its_last() -> None:
    left, daily = rolled(RECORDS, sorted({job_of(k) for k in RECORDS}))
    jobs_after = 0
    for first in range(-1, 4):
        day = Period(MIDNIGHT + first * DAY, MIDNIGHT + (first + 1) * DAY, NOW)
        after = report(left, daily, day)
        assert without_jobs(after) == without_jobs(report(RECORDS, [], day))
        jobs_after += sum(r.jobs for r in after.reports)
        if first == 0:
            assert "MOVE_TO_STATIC_POOL" in {rec.kind for r in after.reports for rec in r.recommendations}
    assert jobs_after == len({job_of(k) for k in RECORDS})  # r1 (attempts on two days) once, on its last day


def test_a_job_whose_attempts_ended_on_two_days_counts_once_on_the_day_of_its_last_attempt() -> None:
    _, daily = rolled(RECORDS, ["acme/r1"])
    by_day = {d.day: d for d in daily}

    assert {d: (c.attempts, c.jobs) for d, c in by_day.items()} == {"2026-03-10": (1, 0), "2026-03-11": (1, 1)}


def test_an_attempt_across_midnight_is_charged_on_its_last_day_and_allocated_on_both() -> None:
    (a2,) = [r for r in RECORDS.values() if r.job_id == "a2"]
    _, daily = rolled(RECORDS, ["acme/a2"])
    by_day = {d.day: d for d in daily}

    assert by_day["2026-03-11"].cost_micros == a2.cost_micros and by_day["2026-03-10"].cost_micros == 0
    assert sum(d.allocated_micros for d in daily) == base_micros(a2, CONFIG)
    assert by_day["2026-03-10"].allocated_micros > 0


def test_an_aggregate_round_trips_through_json_and_adds_up() -> None:
    _, daily = rolled(RECORDS, ["acme/a3"])
    for d in daily:
        assert DailyCost.from_json(d.to_json()) == d
    (cell,) = [d for d in daily if d.pool_id == "dynamic-large"]
    assert (cell + cell).cost_micros == 2 * cell.cost_micros
    assert merged({cell.cell: cell}, {cell.cell: cell})[cell.cell].attempts == 2


class TestWhatIsDue:
    def test_only_jobs_whose_every_attempt_ended_before_the_cutoff_and_that_are_not_held(self) -> None:
        cutoff = MIDNIGHT + DAY + 2.5 * HOUR  # r1's second attempt ends later, a3's second attempt before
        due = due_jobs(RECORDS, cutoff, held={"acme/a1"})
        jobs = [job_of(group[0][0]) for group in due]

        assert "acme/a1" not in jobs and "acme/r1" not in jobs and "acme/a4" not in jobs
        assert "acme/a2" in jobs and "acme/a3" in jobs and "globex/s0" in jobs
        assert jobs[0] == "globex/s0"  # oldest first

    def test_nothing_is_due_before_its_time(self) -> None:
        assert due_jobs(RECORDS, MIDNIGHT) == []


def test_batches_keep_a_job_s_records_together_and_stay_within_the_transaction_limits() -> None:
    due = due_jobs(RECORDS, NOW)
    limits = Limits(records=5, jobs=3, cells=4)

    out = batches(due, limits)

    assert [g for batch in out for g in batch] == due
    for batch in out:
        assert (len(batch) <= 3 and sum(len(g) for g in batch) <= 5) or len(batch) == 1
        jobs = [job_of(g[0][0]) for g in batch]
        assert len(set(jobs)) == len(jobs)


def test_the_ledger_counts_spend_and_idle_from_aggregates_as_from_the_records_they_replaced() -> None:
    def ledger_with(records: dict[str, CostRecord]) -> CostLedger:
        ledger = CostLedger(FakeEtcd(), KEYS, CONFIG, FakeClock(NOW), CostMetrics(CollectorRegistry()))
        for key, r in records.items():
            ledger._remember(key, r)
        return ledger

    full = ledger_with(RECORDS)
    rolling = ledger_with(RECORDS)
    due = due_jobs(rolling.records, NOW)
    for batch in batches(due, Limits(records=7, jobs=4, cells=6)):
        daily = merged(rolling.daily, fold(batch, CONFIG, TH))
        rolling.rolled_up([k for g in batch for k, _ in g], daily.values(), revision=1)

    assert rolling.records == {}
    assert rolling.allocated_by_day == full.allocated_by_day
    for tenant in ("acme", "globex"):
        assert rolling.spent(tenant, month="2026-03") == full.spent(tenant, month="2026-03")
        for day in ("2026-03-10", "2026-03-11", "2026-03-12"):
            assert rolling.spent(tenant, day=day) == full.spent(tenant, day=day)


def test_an_aggregate_event_older_than_what_the_ledger_applied_is_ignored() -> None:
    from libs.etcd.client import KeyValue, WatchEvent
    from services.cost.keys import CostKeys

    ledger = CostLedger(FakeEtcd(), KEYS, CONFIG, FakeClock(NOW), CostMetrics(CollectorRegistry()))
    old = DailyCost("acme", "static-general", "2026-03-10", cost_micros=5)
    new = replace(old, cost_micros=7)
    key = CostKeys("/jobmesh").daily_cost("acme", "2026-03-10", "static-general")
    ledger.rolled_up([], [new], revision=9)

    ledger.on_daily_event(WatchEvent("put", KeyValue(key, old.to_json(), 3, 8, 1, 0), 8))
    assert ledger.spent("acme", day="2026-03-10") == 7
    ledger.on_daily_event(WatchEvent("put", KeyValue(key, new.to_json(), 3, 9, 2, 0), 9))
    assert ledger.spent("acme", day="2026-03-10") == 7
    ledger.on_daily_event(WatchEvent("delete", KeyValue(key, b"", 0, 10, 0, 0), 10))
    assert ledger.spent("acme", day="2026-03-10") == 0
