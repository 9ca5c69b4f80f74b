"""Budgets end to end inside the service (accounts, budget store, cycle) over an in-memory etcd: admin updates
persisted, admission refused when an enforced budget is spent, warnings once a month, gauges published."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import FakeClock
from libs.errors import InvalidArgument, NotFound, ResourceExhausted
from libs.etcd.client import KeyValue, WatchEvent
from libs.keys import Keys
from services.cost.accounts import CostAccounts
from services.cost.budget_store import BudgetStore
from services.cost.cycle import CostCycle
from services.cost.keys import CostKeys
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.recommendations import Thresholds
from services.cost.workers import WorkerLedger
from tests.unit.cost_builders import HOUR, MIDNIGHT, FakeEtcd, JobBuilder, priced_mesh, sample, usage_event

pytestmark = pytest.mark.asyncio

KEYS = Keys("/jobmesh")
COST_KEYS = CostKeys("/jobmesh")
# acme has 0.25 a month, enforced; globex 1.00, notify only; initech none.
CONFIG = priced_mesh(
    acme={"weight": 1, "monthly_budget": 0.25, "budget_policy": "enforce"},
    globex={"weight": 2, "monthly_budget": 1.0},
    initech={"weight": 3},
)


class Service:
    """The cost service's core wired as app.py wires it, on a fake etcd and a fake clock."""

    def __init__(self, etcd: FakeEtcd | None = None, now: float = MIDNIGHT + 5 * HOUR):
        self.etcd = etcd or FakeEtcd()
        self.clock = FakeClock(now)
        self.registry = CollectorRegistry()
        metrics = CostMetrics(self.registry)
        self.ledger = CostLedger(self.etcd, KEYS, CONFIG, self.clock, metrics)
        workers = WorkerLedger(self.etcd, COST_KEYS, CONFIG, self.clock, metrics)
        self.budgets = BudgetStore(self.etcd, COST_KEYS, CONFIG)
        self.accounts = CostAccounts(self.ledger, workers, self.budgets, CONFIG, self.clock, Thresholds())
        self.jobs: dict[str, t.Job] = {}
        self.cycle = CostCycle(self.accounts, lambda: self.jobs.items(), metrics, interval=1, rescan_every=1)

    def restarted(self) -> Service:
        """A new process on the same etcd: budgets and records are read back as the informers would."""
        again = Service(self.etcd, self.clock.now())
        for key, value in self.etcd.data.items():
            event = WatchEvent("put", KeyValue(key, value, 1, 1, 1, 0), 1)
            if key.startswith(COST_KEYS.budgets):
                again.budgets.on_budget_event(event)
            elif key.startswith(KEYS.cost_records):
                again.ledger.on_record_event(event)
        return again

    async def charge_hours(self, tenant_id: str, hours: float, job_id: str = "job") -> None:
        """A job of 1 core / 1 GiB on the static pool (0.10 an hour), ended just now."""
        now = self.clock.now()
        job = JobBuilder(f"{job_id}-{tenant_id}", tenant_id).ended(now - hours * HOUR, now).build()
        self.jobs[KEYS.job(tenant_id, job.job_id)] = job
        await self.cycle.run_once()

    def gauge(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


async def test_the_configured_budget_applies_until_an_admin_overrides_it() -> None:
    service = Service()

    before = service.accounts.budget("acme")
    after = await service.accounts.update_budget("acme", "250.00", "")

    assert (before.setting.limit_micros, before.setting.policy) == (250_000, "enforce")  # type: ignore[union-attr]
    assert (after.setting.limit_micros, after.setting.policy) == (250_000_000, "enforce")  # type: ignore[union-attr]


async def test_an_admin_budget_is_persisted_and_survives_a_restart() -> None:
    service = Service()

    await service.accounts.update_budget("initech", "12.5", "notify")

    assert service.etcd.data["/jobmesh/cost/budgets/initech"]
    status = service.restarted().accounts.budget("initech")
    assert (status.setting.limit_micros, status.setting.policy) == (12_500_000, "notify")  # type: ignore[union-attr]


async def test_a_limit_of_zero_removes_even_a_configured_budget_across_restarts() -> None:
    service = Service()

    await service.accounts.update_budget("acme", "0", "")

    assert service.accounts.budget("acme").setting is None
    assert service.restarted().accounts.budget("acme").setting is None


@pytest.mark.parametrize(
    ("limit", "policy", "field"),
    [
        pytest.param("lots", "notify", "monthly_limit", id="bad-amount"),
        pytest.param("", "notify", "monthly_limit", id="missing-amount"),
        pytest.param("5", "block", "policy", id="bad-policy"),
    ],
)
async def test_an_invalid_update_names_the_field_and_changes_nothing(limit: str, policy: str, field: str) -> None:
    service = Service()

    with pytest.raises(InvalidArgument) as err:
        await service.accounts.update_budget("globex", limit, policy)

    assert err.value.field == field
    assert not any(k.startswith(COST_KEYS.budgets) for k in service.etcd.data)


async def test_an_unknown_tenant_is_not_found_for_every_budget_call() -> None:
    service = Service()

    with pytest.raises(NotFound):
        await service.accounts.update_budget("umbrella", "5", "notify")
    with pytest.raises(NotFound):
        service.accounts.budget("umbrella")
    with pytest.raises(NotFound):
        service.accounts.check_budget("umbrella")


async def test_submits_are_refused_once_an_enforced_budget_is_spent() -> None:
    service = Service()
    await service.charge_hours("acme", 2)  # 0.20 of 0.25
    service.accounts.check_budget("acme")

    await service.charge_hours("acme", 0.5, "more")  # 0.25 of 0.25

    with pytest.raises(ResourceExhausted) as err:
        service.accounts.check_budget("acme")
    assert err.value.reason == "BUDGET_EXCEEDED"
    assert (err.value.metadata["limit"], err.value.metadata["spent"]) == ("0.250000", "0.250000")


async def test_a_running_job_counts_against_an_enforced_budget_before_it_ends() -> None:
    service = Service()
    job = JobBuilder("long", "acme").running(service.clock.now()).build()
    await service.ledger.on_job_event(
        WatchEvent("put", KeyValue(KEYS.job("acme", "long"), job.SerializeToString(), 1, 1, 1, 0), 1)
    )

    service.clock.advance(2.5 * HOUR)

    with pytest.raises(ResourceExhausted):
        service.accounts.check_budget("acme")


async def test_a_notify_budget_never_refuses_but_reports_its_utilization() -> None:
    service = Service()

    await service.charge_hours("globex", 15)  # 1.50 of 1.00

    service.accounts.check_budget("globex")
    assert service.accounts.budget("globex").utilization == pytest.approx(1.5)
    assert service.gauge("jobmesh_cost_budget_utilization_ratio", tenant="globex") == pytest.approx(1.5)


async def test_each_threshold_is_warned_about_once_per_tenant_and_month(caplog: pytest.LogCaptureFixture) -> None:
    service = Service()
    caplog.set_level(logging.WARNING, logger="services.cost.cycle")

    await service.charge_hours("globex", 8.5, "a")  # 85%
    await service.cycle.run_once()
    restarted = service.restarted()
    await restarted.cycle.run_once()
    assert restarted.accounts.budget("globex").utilization == pytest.approx(0.85)  # it would warn if it could
    await service.charge_hours("globex", 2, "b")  # 105%
    await service.cycle.run_once()

    warnings = [r.getMessage() for r in caplog.records if "monthly budget" in r.getMessage()]
    assert len(warnings) == 2
    assert "crossed 80%" in warnings[0] and "85% spent" in warnings[0]
    assert "crossed 100%" in warnings[1] and "105% spent" in warnings[1]


async def test_the_warnings_come_again_in_a_new_month(caplog: pytest.LogCaptureFixture) -> None:
    service = Service()
    caplog.set_level(logging.WARNING, logger="services.cost.cycle")
    await service.charge_hours("globex", 9, "march")

    service.clock.advance(31 * 24 * HOUR)
    await service.charge_hours("globex", 9, "april")

    assert len([r for r in caplog.records if "monthly budget" in r.getMessage()]) == 2


async def test_the_cycle_publishes_spend_per_tenant_and_cost_per_pool() -> None:
    service = Service()
    await service.charge_hours("acme", 1)

    assert service.gauge("jobmesh_cost_tenant_today_micros", tenant="acme") == 100_000
    assert service.gauge("jobmesh_cost_tenant_month_micros", tenant="acme") == 100_000
    assert service.gauge("jobmesh_cost_tenant_running_micros", tenant="acme") == 0
    assert service.gauge("jobmesh_cost_budget_limit_micros", tenant="acme") == 250_000
    assert service.gauge("jobmesh_cost_pool_month_micros", pool="static-general") == 0  # no workers seen
    assert service.gauge("jobmesh_cost_pool_idle_month_micros", pool="static-general") == -100_000


async def test_the_running_gauge_and_the_budget_price_a_running_attempt_at_its_measured_use() -> None:
    service = Service(now=MIDNIGHT + HOUR)
    job = JobBuilder("busy", "globex").running(MIDNIGHT).build()
    service.jobs[KEYS.job("globex", job.job_id)] = job
    service.ledger.observe(KEYS.job("globex", job.job_id), job)
    await service.cycle.run_once()
    at_request = service.gauge("jobmesh_cost_tenant_running_micros", tenant="globex")

    # 3 cores in its first 20 minutes, on a 1-core request: (0.05 + 3 x 0.04 + 0.01) for the hour so far.
    worker = job.attempts[0].worker_id
    service.ledger.usage.on_usage_event(usage_event(worker, sample(job, MIDNIGHT + 1200, cpu_seconds=3600)))
    await service.cycle.run_once()

    assert at_request == 100_000
    assert service.gauge("jobmesh_cost_tenant_running_micros", tenant="globex") == 180_000
    assert service.gauge("jobmesh_cost_tenant_today_micros", tenant="globex") == 180_000
    assert service.accounts.budget("globex").spent_micros == 180_000


async def test_a_report_defaults_to_the_last_30_days_and_refuses_an_empty_window() -> None:
    service = Service()
    await service.charge_hours("acme", 1)
    service.clock.advance(31 * 24 * HOUR)
    await service.charge_hours("acme", 2, "recent")

    (report,) = service.accounts.reports("acme").reports

    assert report.total_micros == 200_000  # the first job ended 31 days ago
    with pytest.raises(InvalidArgument) as err:
        service.accounts.reports("acme", start=MIDNIGHT, end=MIDNIGHT)
    assert err.value.field == "start"


async def test_a_report_period_longer_than_the_cap_is_refused_naming_the_limit() -> None:
    from services.cost.accounts import MAX_REPORT_DAYS

    service = Service()
    await service.charge_hours("acme", 1)
    now = service.clock.now()
    with pytest.raises(InvalidArgument) as err:
        service.accounts.reports("acme", start=-62135596800.0, end=now)
    assert err.value.field == "start" and f"{MAX_REPORT_DAYS} days" in str(err.value)
    # Exactly the cap is answered.
    (report,) = service.accounts.reports("acme", start=now + 1 - MAX_REPORT_DAYS * 86400, end=now + 1).reports
    assert report.total_micros == 100_000
