"""The ledger (services/cost/ledger.py) over an in-memory etcd: each attempt charged exactly once, failed writes
retried, running attempts accruing, and worker lifetimes kept."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import FakeClock
from libs.etcd.client import KeyValue, TxnResult, WatchEvent
from libs.keys import Keys
from services.cost.keys import CostKeys
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.records import CostRecord
from services.cost.workers import WorkerLedger
from tests.unit.cost_builders import HOUR, MIDNIGHT, FakeEtcd, JobBuilder, priced_mesh, sample, usage_event

pytestmark = pytest.mark.asyncio

CONFIG = priced_mesh()
KEYS = Keys("/jobmesh")


class Harness:
    def __init__(self, etcd: FakeEtcd | None = None, now: float = MIDNIGHT + 2 * HOUR):
        self.etcd = etcd or FakeEtcd()
        self.clock = FakeClock(now)
        self.registry = CollectorRegistry()
        self.ledger = CostLedger(self.etcd, KEYS, CONFIG, self.clock, CostMetrics(self.registry))

    async def see(self, job: t.Job, kind: str = "put") -> None:
        key = KEYS.job(job.tenant_id, job.job_id)
        await self.ledger.on_job_event(WatchEvent(kind, KeyValue(key, job.SerializeToString(), 1, 1, 1, 0), 1))

    def stored(self) -> dict[str, CostRecord]:
        return {k: CostRecord.from_json(v) for k, v in self.etcd.data.items() if k.startswith(KEYS.cost_records)}

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


# One hour of 1 core and 1 GiB on the static pool: 0.100000.
ONE_HOUR = JobBuilder("job-1").ended(MIDNIGHT, MIDNIGHT + HOUR).build()


async def test_an_ended_attempt_is_charged_once_even_when_its_job_is_seen_again() -> None:
    h = Harness()

    await h.see(ONE_HOUR)
    await h.see(ONE_HOUR)
    await h.ledger.rescan([("k", ONE_HOUR)])

    assert list(h.stored()) == [KEYS.cost_record("acme", "job-1", 1)]
    assert h.stored()[KEYS.cost_record("acme", "job-1", 1)].cost_micros == 100_000
    assert h.metric("jobmesh_cost_records_total") == 1
    assert h.metric("jobmesh_cost_charged_micros_total", tenant="acme", pool="static-general") == 100_000


async def test_a_record_the_informer_hands_back_before_the_write_returns_is_still_counted_once() -> None:
    h = Harness()
    write = h.etcd.txn

    async def write_then_echo(*args: Any, **kwargs: Any) -> TxnResult:
        result = await write(*args, **kwargs)
        for key, value in h.etcd.data.items():  # the watch delivers the put before the txn call returns
            h.ledger.on_record_event(WatchEvent("put", KeyValue(key, value, 1, 1, 1, 0), 1))
        return result

    h.etcd.txn = write_then_echo  # type: ignore[method-assign]
    await h.see(ONE_HOUR)

    assert h.metric("jobmesh_cost_records_total") == 1
    assert h.metric("jobmesh_cost_charged_micros_total", tenant="acme", pool="static-general") == 100_000
    assert h.ledger.spent("acme", month="2026-03") == 100_000


async def test_a_second_ledger_after_a_restart_adopts_the_stored_record_and_writes_nothing() -> None:
    first = Harness()
    await first.see(ONE_HOUR)
    before = dict(first.etcd.data)

    again = Harness(first.etcd)  # restarted without having read the records back
    await again.see(ONE_HOUR)

    assert first.etcd.data == before
    assert again.ledger.records == first.ledger.records
    assert again.metric("jobmesh_cost_records_total") == 0


async def test_every_attempt_of_a_retried_job_is_charged_once() -> None:
    h = Harness()
    job = JobBuilder("job-2").ended(MIDNIGHT, MIDNIGHT + HOUR / 2).ended(MIDNIGHT + HOUR, MIDNIGHT + 2 * HOUR).build()

    await h.see(job)

    assert sorted(r.attempt for r in h.stored().values()) == [1, 2]
    assert sum(r.cost_micros for r in h.stored().values()) == 50_000 + 100_000


async def test_a_record_that_cannot_be_written_is_counted_and_written_by_the_next_cycle() -> None:
    h = Harness()
    h.etcd.fail_next(1)

    await h.see(ONE_HOUR)

    assert h.stored() == {}
    assert h.metric("jobmesh_cost_record_write_failures_total", record="attempt") == 1
    assert h.metric("jobmesh_cost_unrecorded_attempts") == 1
    assert await h.ledger.flush() == 0
    assert len(h.stored()) == 1
    assert h.metric("jobmesh_cost_unrecorded_attempts") == 0


async def test_a_rescan_charges_ended_attempts_that_no_event_delivered() -> None:
    h = Harness()

    still_pending = await h.ledger.rescan([(KEYS.job("acme", "job-1"), ONE_HOUR)])

    assert still_pending == 0
    assert len(h.stored()) == 1


async def test_a_rescan_reads_again_only_the_stored_jobs_that_have_had_an_attempt_not_the_pending_backlog() -> None:
    from libs.etcd.informer import Informer
    from services.cost.app import attempted_jobs

    h = Harness()
    waiting = [JobBuilder(f"waiting-{i}").build() for i in range(3)]
    running = JobBuilder("job-2").running(MIDNIGHT).build()
    for job in [*waiting, ONE_HOUR, running]:
        await h.see(job)
    assert h.ledger.attempted == {job_key(ONE_HOUR), job_key(running)}

    jobs = Informer(None, KEYS.jobs)  # type: ignore[arg-type]  # a cache only: never started
    for job in [*waiting, ONE_HOUR, running]:
        jobs.cache[job_key(job)] = KeyValue(job_key(job), job.SerializeToString(), 1, 1, 1, 0)
    assert sorted(key for key, _ in attempted_jobs(jobs, h.ledger.attempted)) == sorted(h.ledger.attempted)

    await h.see(ONE_HOUR, kind="delete")
    assert h.ledger.attempted == {job_key(running)}


async def test_a_deleted_job_still_has_its_ended_attempts_charged() -> None:
    h = Harness()

    await h.see(ONE_HOUR, kind="delete")

    assert len(h.stored()) == 1


async def test_a_running_attempt_accrues_at_its_requested_resources_as_time_passes() -> None:
    h = Harness(now=MIDNIGHT + HOUR / 2)
    job = JobBuilder("job-3").running(MIDNIGHT).build()
    await h.see(job)

    half = h.ledger.job_cost(job)
    h.clock.advance(HOUR / 2)
    whole = h.ledger.job_cost(job)

    assert [r.cost_micros for r in half] == [50_000]
    assert [r.cost_micros for r in whole] == [100_000]
    assert h.stored() == {}  # nothing is charged before the attempt ends


async def test_a_running_attempt_accrues_at_its_latest_usage_sample_where_that_is_above_its_request() -> None:
    h = Harness(now=MIDNIGHT + HOUR / 2)
    busy = JobBuilder("busy").running(MIDNIGHT).build()
    idle = JobBuilder("idle").running(MIDNIGHT).build()
    await h.see(busy)
    await h.see(idle)
    worker = busy.attempts[0].worker_id
    # busy: 2 cores since it started (0.14 an hour); idle: a tenth of its core (charged its request, 0.10).
    h.ledger.usage.on_usage_event(
        usage_event(worker, sample(busy, MIDNIGHT + 600, cpu_seconds=1200), sample(idle, MIDNIGHT + 600, 60))
    )

    assert {r.job_id: r.cost_micros for r in h.ledger.accruing()} == {"busy": 70_000, "idle": 50_000}
    assert [r.cost_micros for r in h.ledger.job_cost(busy)] == [70_000]
    assert h.ledger.spent_with_running("acme", h.clock.now()) == 120_000

    # The worker runs neither any more (its key deleted): back to what they requested.
    h.ledger.usage.on_usage_event(usage_event(worker, kind="delete"))

    assert h.ledger.spent_with_running("acme", h.clock.now()) == 100_000


@pytest.mark.parametrize(
    "stray",
    [
        pytest.param(lambda job: ("static-general-w", sample(job, MIDNIGHT + 600, 1200), 2), id="another-attempt"),
        pytest.param(lambda job: ("another-worker", sample(job, MIDNIGHT + 600, 1200), 1), id="another-worker"),
    ],
)
async def test_a_sample_counts_only_for_its_own_attempt_on_its_own_worker(stray: Any) -> None:
    h = Harness(now=MIDNIGHT + HOUR / 2)
    job = JobBuilder("job-1").running(MIDNIGHT).build()
    await h.see(job)
    worker, usage, attempt = stray(job)
    usage.attempt = attempt

    h.ledger.usage.on_usage_event(usage_event(worker, usage))

    assert [r.cost_micros for r in h.ledger.accruing()] == [50_000]


async def test_another_tenants_sample_never_prices_a_job_of_the_same_id() -> None:
    h = Harness(now=MIDNIGHT + HOUR / 2)
    mine = JobBuilder("job-1", tenant_id="acme").running(MIDNIGHT).build()
    theirs = JobBuilder("job-1", tenant_id="globex").running(MIDNIGHT).build()
    await h.see(mine)

    h.ledger.usage.on_usage_event(usage_event(theirs.attempts[0].worker_id, sample(theirs, MIDNIGHT + 600, 1200)))

    assert h.ledger.spent_with_running("acme", h.clock.now()) == 50_000


async def test_the_cost_of_an_ended_attempt_is_shown_before_its_record_is_written() -> None:
    h = Harness()
    h.etcd.fail_next(1)
    await h.see(ONE_HOUR)

    (shown,) = h.ledger.job_cost(ONE_HOUR)
    await h.ledger.flush()

    assert shown == h.stored()[KEYS.cost_record("acme", "job-1", 1)]


async def test_month_spend_counts_charged_unwritten_and_running_attempts_of_this_month_only() -> None:
    h = Harness(now=MIDNIGHT + 3 * HOUR)
    last_month = JobBuilder("old").ended(MIDNIGHT - 20 * 24 * HOUR, MIDNIGHT - 20 * 24 * HOUR + HOUR).build()
    await h.see(last_month)
    await h.see(ONE_HOUR)
    h.etcd.fail_next(1)
    await h.see(JobBuilder("unwritten").ended(MIDNIGHT + HOUR, MIDNIGHT + 2 * HOUR).build())
    await h.see(JobBuilder("running").running(MIDNIGHT + 2 * HOUR).build())
    await h.see(JobBuilder("globex-job", tenant_id="globex").ended(MIDNIGHT, MIDNIGHT + HOUR).build())

    assert h.ledger.spent_with_running("acme", h.clock.now()) == 3 * 100_000
    assert h.ledger.spent("acme", month="2026-02") == 100_000


async def test_records_read_back_from_etcd_count_towards_spend_once() -> None:
    h = Harness()
    await h.see(ONE_HOUR)
    key = KEYS.cost_record("acme", "job-1", 1)

    h.ledger.on_record_event(WatchEvent("put", KeyValue(key, h.etcd.data[key], 1, 1, 1, 0), 1))

    assert h.ledger.spent("acme", month="2026-03") == 100_000


async def test_a_standby_ledger_writes_nothing_and_its_first_term_writes_what_no_leader_wrote() -> None:
    leading = False
    h = Harness()
    h.ledger.may_write = lambda: leading
    charged_elsewhere = JobBuilder("job-2").ended(MIDNIGHT, MIDNIGHT + HOUR).build()

    await h.see(ONE_HOUR)
    await h.see(charged_elsewhere)
    await h.ledger.flush()
    assert h.stored() == {} and h.metric("jobmesh_cost_records_total") == 0
    # The leader's record of one of them comes back through the records informer: no longer pending here.
    h.etcd.data[KEYS.cost_record("acme", "job-2", 1)] = h.ledger.pending[KEYS.cost_record("acme", "job-2", 1)].to_json()
    key = KEYS.cost_record("acme", "job-2", 1)
    h.ledger.on_record_event(WatchEvent("put", KeyValue(key, h.etcd.data[key], 1, 1, 1, 0), 1))

    leading = True  # the leader died before writing job-1's record; this replica's term begins
    assert await h.ledger.rescan([]) == 0

    assert sorted(h.stored()) == sorted([KEYS.cost_record("acme", "job-1", 1), key])
    assert h.metric("jobmesh_cost_records_total") == 1  # job-1's, written here; job-2's was the leader's
    assert h.ledger.spent("acme", month="2026-03") == 200_000


class TestWorkerLedger:
    @staticmethod
    def worker(worker_id: str, registered: float) -> t.Worker:
        worker = t.Worker(worker_id=worker_id, pool_id="static-general", capacity=t.Resources(cpu_millis=1000))
        worker.register_time.FromNanoseconds(int(registered * 1e9))
        return worker

    @classmethod
    def event(cls, kind: str, worker_id: str, registered: float) -> WatchEvent:
        raw = cls.worker(worker_id, registered).SerializeToString()
        return WatchEvent(kind, KeyValue(KEYS.worker(worker_id), raw, 1, 1, 1, 0), 1)

    async def test_a_worker_lifetime_is_persisted_from_registration_to_deletion(self) -> None:
        etcd, clock = FakeEtcd(), FakeClock(MIDNIGHT)
        workers = WorkerLedger(etcd, CostKeys("/jobmesh"), CONFIG, clock, CostMetrics(CollectorRegistry()))

        await workers.on_worker_event(self.event("put", "w1", MIDNIGHT - 60))
        clock.advance(HOUR)
        await workers.on_worker_event(self.event("delete", "w1", MIDNIGHT - 60))

        (interval,) = workers.intervals
        assert (interval.start, interval.end) == (MIDNIGHT - 60, MIDNIGHT + HOUR)
        assert (interval.cpu_millis, interval.memory_mb) == (1000, 1024)  # memory from the pool's config
        assert etcd.data["/jobmesh/cost/workers/w1"] == interval.to_json()

    async def test_lifetimes_survive_a_restart_and_workers_gone_meanwhile_are_closed(self) -> None:
        etcd, clock = FakeEtcd(), FakeClock(MIDNIGHT)
        first = WorkerLedger(etcd, CostKeys("/jobmesh"), CONFIG, clock, CostMetrics(CollectorRegistry()))
        await first.on_worker_event(self.event("put", "w1", MIDNIGHT))
        await first.on_worker_event(self.event("put", "w2", MIDNIGHT))

        clock.advance(HOUR)
        second = WorkerLedger(etcd, CostKeys("/jobmesh"), CONFIG, clock, CostMetrics(CollectorRegistry()))
        await second.load()
        await second.on_worker_event(self.event("put", "w2", MIDNIGHT + HOUR))  # re-registered since
        await second.close_missing({"w2"})

        ends = {i.worker_id: (i.start, i.end) for i in second.intervals}
        assert ends == {"w1": (MIDNIGHT, MIDNIGHT + HOUR), "w2": (MIDNIGHT, None)}

    async def test_a_takeover_keeps_stored_starts_adds_workers_seen_meanwhile_and_ends_those_gone(self) -> None:
        etcd, clock = FakeEtcd(), FakeClock(MIDNIGHT)
        leader = WorkerLedger(etcd, CostKeys("/jobmesh"), CONFIG, clock, CostMetrics(CollectorRegistry()))
        await leader.on_worker_event(self.event("put", "w1", MIDNIGHT))
        await leader.on_worker_event(self.event("put", "w2", MIDNIGHT))
        standby = WorkerLedger(
            etcd, CostKeys("/jobmesh"), CONFIG, clock, CostMetrics(CollectorRegistry()), may_write=lambda: False
        )
        # The standby followed the workers from a later start (re-registrations), and wrote nothing.
        for worker_id in ("w1", "w2"):
            await standby.on_worker_event(self.event("put", worker_id, MIDNIGHT + HOUR))
        written = dict(etcd.data)

        # The leader dies; meanwhile w2 leaves and w3 joins. Then the standby's term begins.
        clock.advance(2 * HOUR)
        live = [self.worker("w1", MIDNIGHT + HOUR), self.worker("w3", MIDNIGHT + 2 * HOUR)]
        standby.may_write = lambda: True
        await standby.take_over(lambda: live)
        assert etcd.data != written  # w2's end and w3's start, written by the takeover's flush

        ends = {i.worker_id: (i.start, i.end) for i in standby.intervals}
        assert ends == {
            "w1": (MIDNIGHT, None),  # the stored start, not the standby's later one
            "w2": (MIDNIGHT, MIDNIGHT + 2 * HOUR),  # ended at the takeover: it left while no leader wrote
            "w3": (MIDNIGHT + 2 * HOUR, None),
        }
        assert standby.dirty == set()

    async def test_a_lifetime_that_cannot_be_written_is_retried(self) -> None:
        etcd, registry = FakeEtcd(), CollectorRegistry()
        workers = WorkerLedger(etcd, CostKeys("/jobmesh"), CONFIG, FakeClock(MIDNIGHT), CostMetrics(registry))
        etcd.fail_next(1)

        await workers.on_worker_event(self.event("put", "w1", MIDNIGHT))
        assert workers.dirty == {"w1"}
        await workers.flush()

        assert workers.dirty == set()
        assert "/jobmesh/cost/workers/w1" in etcd.data
        assert registry.get_sample_value(
            "jobmesh_cost_record_write_failures_total", {"record": "worker_lifetime"}
        ) == pytest.approx(1)


def job_key(job: t.Job) -> str:
    return KEYS.job(job.tenant_id, job.job_id)


async def test_attempts_ended_in_one_watch_response_are_charged_in_one_transaction() -> None:
    h = Harness()
    jobs = [JobBuilder(f"job-{i}").ended(MIDNIGHT, MIDNIGHT + HOUR).build() for i in range(5)]

    await h.ledger.on_job_events(
        [WatchEvent("put", KeyValue(job_key(j), j.SerializeToString(), 1, 1, 1, 0), 1) for j in jobs]
    )

    assert h.etcd.calls == 1
    assert len(h.stored()) == 5
    assert h.metric("jobmesh_cost_records_total") == 5


async def test_a_batch_holding_an_already_charged_attempt_charges_each_of_the_others_once() -> None:
    h = Harness()
    first = JobBuilder("job-0").ended(MIDNIGHT, MIDNIGHT + HOUR).build()
    await Harness(h.etcd).see(first)  # charged by an earlier incarnation this ledger never heard from
    jobs = [first, *(JobBuilder(f"job-{i}").ended(MIDNIGHT, MIDNIGHT + HOUR).build() for i in (1, 2))]

    await h.ledger.on_job_events(
        [WatchEvent("put", KeyValue(job_key(j), j.SerializeToString(), 1, 1, 1, 0), 1) for j in jobs]
    )

    assert len(h.stored()) == 3
    assert h.metric("jobmesh_cost_records_total") == 2  # the stored one is adopted, not charged again
    assert h.ledger.spent("acme", month="2026-03") == 300_000


async def test_the_per_day_index_gives_the_month_s_idle_cost_exactly_as_a_full_recount() -> None:
    from services.cost.budgets import month_window
    from services.cost.idle import WorkerInterval, idle_cells

    now = MIDNIGHT + 5 * HOUR
    h = Harness(now=now)
    jobs = [
        JobBuilder("across-months").ended(MIDNIGHT - 10 * 24 * HOUR - HOUR, MIDNIGHT - 9 * 24 * HOUR + 7),
        JobBuilder("across-midnight").ended(MIDNIGHT - 3 * HOUR, MIDNIGHT + 2 * HOUR + 0.3),
        JobBuilder("burst").burst().ended(MIDNIGHT + HOUR, MIDNIGHT + HOUR + 91.7),
        JobBuilder("retried").ended(MIDNIGHT - 30 * HOUR, MIDNIGHT - 29 * HOUR).ended(MIDNIGHT, MIDNIGHT + 1.5),
        JobBuilder("running").running(MIDNIGHT + 4 * HOUR),
    ]
    for job in jobs:
        await h.see(job.build())
    # One record written by someone else and only read back, one still unwritten.
    h.etcd.fail_next(1)
    await h.see(JobBuilder("unwritten").ended(MIDNIGHT + 2 * HOUR, MIDNIGHT + 3 * HOUR).build())
    assert h.ledger.pending
    start, end = month_window(now)
    workers = [WorkerInterval("w1", "static-general", MIDNIGHT - 40 * 24 * HOUR, None, 2000, 2048)]

    full = idle_cells(CONFIG, workers, h.ledger.allocations(since=start), start, end, now)
    fast = idle_cells(
        CONFIG, workers, h.ledger.unwritten_allocations(since=start), start, end, now, h.ledger.allocated_by_day
    )

    assert fast == full
    assert sum(cell.allocated_micros for cell in full.values()) > 0


async def test_with_a_record_delay_attempts_from_several_watch_responses_share_one_delayed_write() -> None:
    h = Harness()
    h.ledger.record_delay = 0.05
    jobs = [JobBuilder(f"job-{i}").ended(MIDNIGHT, MIDNIGHT + HOUR).build() for i in range(3)]

    for j in jobs:  # three watch responses, one ended attempt each
        await h.ledger.on_job_events([WatchEvent("put", KeyValue(job_key(j), j.SerializeToString(), 1, 1, 1, 0), 1)])
    assert h.etcd.calls == 0
    assert h.ledger.spent("acme", month="2026-03") == 300_000  # charged (shown) before it is written

    await asyncio.sleep(0.2)

    assert h.etcd.calls == 1
    assert len(h.stored()) == 3
    assert h.metric("jobmesh_cost_records_total") == 3


async def test_closing_the_ledger_writes_what_a_delayed_write_was_waiting_for() -> None:
    h = Harness()
    h.ledger.record_delay = 60.0

    await h.see(ONE_HOUR)
    assert h.stored() == {}
    await h.ledger.close()

    assert list(h.stored()) == [KEYS.cost_record("acme", "job-1", 1)]
