"""Cost reports (services/cost/reports.py): per tenant by pool and day, burst spend, and the idle row."""

from __future__ import annotations

from services.cost.idle import Allocation, WorkerInterval
from services.cost.recommendations import Thresholds
from services.cost.records import CostRecord, base_micros
from services.cost.reports import IDLE_ROW, Period, Reports, build_reports
from tests.unit.cost_builders import HOUR, MIDNIGHT, priced, priced_mesh, record

CONFIG = priced_mesh()
DAY = 24 * HOUR
PERIOD = Period(MIDNIGHT, MIDNIGHT + 2 * DAY, now=MIDNIGHT + 3 * DAY)

RECORDS = [
    # acme: 0.100000 on static on day 1, two attempts of one job on dynamic on day 2 (one on burst).
    priced(record("acme", "a1"), CONFIG),
    priced(record("acme", "a2", start=MIDNIGHT + DAY, pool_id="dynamic-large"), CONFIG),
    priced(record("acme", "a2", start=MIDNIGHT + DAY + HOUR, pool_id="dynamic-large", burst=True, attempt=2), CONFIG),
    # globex: one hour of half a core on static.
    priced(record("globex", "g1", cpu_millis=500, memory_mb=512), CONFIG),
    # Outside the period: ended before it, and ended after it.
    priced(record("acme", "old", start=MIDNIGHT - 2 * HOUR), CONFIG),
    priced(record("acme", "late", start=MIDNIGHT + 2 * DAY - HOUR / 2), CONFIG),
]
WORKERS = [WorkerInterval(f"s{i}", "static-general", MIDNIGHT, MIDNIGHT + 2 * DAY, 1000, 1024) for i in (1, 2)]


def allocations(records: list[CostRecord]) -> list[Allocation]:
    return [Allocation(r.pool_id, r.start, r.end, base_micros(r, CONFIG)) for r in records]


def reports_for(tenant_id: str) -> Reports:
    return build_reports(RECORDS, tenant_id, PERIOD, CONFIG, WORKERS, allocations(RECORDS), Thresholds())


def test_a_tenant_report_totals_its_attempts_by_pool_and_by_day() -> None:
    (acme,) = reports_for("acme").reports

    # Static 0.100000; dynamic 0.160000 an hour for 1 core / 1 GiB, plus 0.240000 for the burst hour.
    assert acme.tenant_id == "acme"
    assert acme.total_micros == 100_000 + 160_000 + 240_000
    assert acme.by_pool == {"dynamic-large": 400_000, "static-general": 100_000}
    assert acme.by_day == {"2026-03-10": 100_000, "2026-03-11": 400_000}
    assert acme.burst_micros == 240_000
    assert acme.jobs == 2


def test_a_tenant_only_ever_sees_its_own_attempts_and_no_idle_row() -> None:
    reports = reports_for("globex").reports

    assert [r.tenant_id for r in reports] == ["globex"]
    assert reports[0].total_micros == 75_000


def test_a_tenant_without_charges_gets_an_empty_report() -> None:
    (report,) = reports_for("initech").reports

    assert (report.tenant_id, report.total_micros, report.jobs, report.by_pool) == ("initech", 0, 0, {})


def test_the_all_tenants_view_adds_the_idle_row_that_makes_pool_cost_add_up() -> None:
    result = reports_for("")

    assert [r.tenant_id for r in result.reports] == ["acme", "globex", IDLE_ROW]
    idle = result.reports[-1]
    # The static pool: 2 workers x 48 h x 0.10 = 9.600000; jobs on it used 0.100000 + 0.075000, and the half
    # hour of `late` that falls in the period (0.050000, though it is charged in the next period).
    assert idle.by_pool["static-general"] == 9_600_000 - (100_000 + 75_000 + 50_000)
    # No dynamic workers were seen, so the dynamic jobs' 0.400000 (at base price: 0.160000 x 2) shows as negative.
    assert idle.by_pool["dynamic-large"] == -320_000
    assert idle.total_micros == result.idle_micros == sum(idle.by_pool.values()) == sum(idle.by_day.values())


def test_an_admin_asking_for_one_tenant_gets_that_tenant_and_the_idle_total_only() -> None:
    result = reports_for("acme")

    assert [r.tenant_id for r in result.reports] == ["acme"]
    assert result.idle_micros == reports_for("").idle_micros


def test_an_attempt_is_charged_in_the_period_in_which_it_ended() -> None:
    after = Period(PERIOD.end, PERIOD.end + DAY, now=PERIOD.now)

    (acme,) = build_reports(RECORDS, "acme", after, CONFIG, [], [], Thresholds()).reports

    assert acme.by_day == {"2026-03-12": 100_000}  # `late`: started in the period before, ended in this one


def test_recommendations_are_part_of_the_tenant_report() -> None:
    wasteful = [
        priced(record("acme", f"w{i}", start=MIDNIGHT + i * HOUR, used_memory_mb=10, used_cpu_seconds=3600), CONFIG)
        for i in range(2)
    ]

    (report,) = build_reports(wasteful, "acme", PERIOD, CONFIG, [], [], Thresholds()).reports

    assert [r.kind for r in report.recommendations] == ["RIGHTSIZE_MEMORY"]
