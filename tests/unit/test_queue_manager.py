"""Unit tests for the queueing core (services/queueing/manager.py, sla.py, reasons.py, store.py's batcher):
in-memory job records and a fake clock, no sockets."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import FakeClock
from libs.errors import InvalidArgument, NotFound, Unavailable
from libs.etcd.client import KeyValue, TxnResult, WatchEvent
from libs.jobs import ts
from libs.keys import Keys
from libs.lifecycle.store import JobStore
from libs.lifecycle.transitions import apply_dispatch, apply_worker_lost
from services.queueing.fairqueue import LaneTags
from services.queueing.manager import PendingJobs, QueueManager
from services.queueing.metrics import QueueMetrics
from services.queueing.reasons import (
    BEHIND_FAIR_SHARE,
    DEADLINE_MISSED,
    POOL_SCALING_UP,
    QUEUED,
    RETRYING_AFTER_INTERRUPTION,
    RETRYING_AFTER_WORKER_LOST,
    WAITING_FOR_WORKER,
    waiting_reason,
)
from services.queueing.settings import QueueingSettings
from services.queueing.sla import MET, MISSED_DEADLINE, MISSED_TARGET_WAIT, SlaPolicy, SlaWindow
from services.queueing.store import BatchingJobWriter
from tests.unit.builders import mixed_pools

KEYS = Keys("/jobmesh")
TIERS = SlaPolicy({"gold": 30.0, "standard": 300.0, "batch": 3600.0}, "standard")


# The SLA rule and the waiting reasons, as tables ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "deadline", "expected"),
    [
        pytest.param("gold", None, SlaWindow("gold", 115.0, 130.0), id="gold-urgent-at-half-its-target"),
        pytest.param("", None, SlaWindow("standard", 250.0, 400.0), id="no-tier-is-the-default-tier"),
        pytest.param("platinum", None, SlaWindow("standard", 250.0, 400.0), id="unknown-tier-is-the-default-tier"),
        pytest.param("batch", 700.0, SlaWindow("batch", 400.0, 700.0), id="deadline-before-target-is-due"),
        pytest.param("gold", 5000.0, SlaWindow("gold", 115.0, 130.0), id="deadline-after-target-changes-nothing"),
        pytest.param("batch", 103.0, SlaWindow("batch", 101.0, 103.0), id="tight-deadline-urgent-by-start-slack"),
    ],
)
def test_a_job_is_due_at_its_target_or_deadline_and_urgent_halfway_or_at_the_start_slack(
    tier: str, deadline: float | None, expected: SlaWindow
) -> None:
    assert TIERS.window(tier, submitted=100.0, deadline=deadline) == expected


@pytest.mark.parametrize(
    ("tier", "started", "deadline", "expected"),
    [
        pytest.param("gold", 129.0, None, MET, id="within-target"),
        pytest.param("gold", 131.0, None, MISSED_TARGET_WAIT, id="after-target"),
        pytest.param("batch", 150.0, 140.0, MISSED_DEADLINE, id="after-deadline"),
        pytest.param("gold", 140.0, 135.0, MISSED_DEADLINE, id="deadline-reported-before-target"),
    ],
)
def test_a_start_after_the_target_wait_or_the_deadline_is_an_sla_miss(
    tier: str, started: float, deadline: float | None, expected: str
) -> None:
    assert TIERS.outcome(tier, submitted=100.0, started=started, deadline=deadline) == expected


REASONS = [
    pytest.param({"deadline_missed": True, "recorded": RETRYING_AFTER_WORKER_LOST}, DEADLINE_MISSED, id="deadline"),
    pytest.param({"recorded": RETRYING_AFTER_WORKER_LOST, "offered_recently": True}, RETRYING_AFTER_WORKER_LOST),
    pytest.param(
        {"recorded": RETRYING_AFTER_INTERRUPTION, "offered_recently": True},
        RETRYING_AFTER_INTERRUPTION,
        id="interrupted",
    ),
    pytest.param({"offered_recently": True, "ahead_other_tenants": 3}, WAITING_FOR_WORKER, id="offered"),
    pytest.param({"offered_recently": True, "dynamic_queue": True}, POOL_SCALING_UP, id="offered-dynamic"),
    pytest.param({"ahead_other_tenants": 1, "recorded": "QUEUED"}, BEHIND_FAIR_SHARE, id="others-ahead"),
    pytest.param({}, QUEUED, id="only-own-jobs-ahead"),
]


@pytest.mark.parametrize(("facts", "expected"), REASONS)
def test_the_waiting_reason_is_the_first_rule_that_applies(facts: dict[str, Any], expected: str) -> None:
    given: dict[str, Any] = {
        "recorded": "",
        "deadline_missed": False,
        "offered_recently": False,
        "dynamic_queue": False,
        "ahead_other_tenants": 0,
    }
    assert waiting_reason(**(given | facts)) == expected


# An in-memory etcd for job records, weights and tags ----------------------------------------------------------


class FakeRecords:
    """Job records with mod revisions, as JobWriter, JobReader and StateStore; emits the informer's events."""

    def __init__(self) -> None:
        self.revision = 0
        self.jobs: dict[str, tuple[t.Job, int]] = {}
        self.weights: dict[str, float] = {}
        self.tags: dict[str, LaneTags] = {}
        self.marks = 0
        self.refuse_marks = 0

    def _store(self, job: t.Job) -> int:
        self.revision += 1
        copy = t.Job()
        copy.CopyFrom(job)
        self.jobs[job.job_id] = (copy, self.revision)
        return self.revision

    async def create(self, job: t.Job, fence: int = 0) -> tuple[t.Job, bool, int]:
        if job.job_id in self.jobs:
            first, revision = self.jobs[job.job_id]
            return first, False, revision
        return job, True, self._store(job)

    async def get(self, tenant_id: str, job_id: str) -> t.Job:
        if job_id not in self.jobs or (tenant_id and self.jobs[job_id][0].tenant_id != tenant_id):
            raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
        copy = t.Job()
        copy.CopyFrom(self.jobs[job_id][0])
        return copy

    async def load_weights(self) -> dict[str, float]:
        return dict(self.weights)

    async def save_weight(self, tenant_id: str, weight: float) -> None:
        self.weights[tenant_id] = weight

    async def load_tags(self) -> dict[str, LaneTags]:
        return dict(self.tags)

    async def save_tags(self, lanes: dict[str, LaneTags]) -> None:
        self.tags = dict(lanes)

    async def mark_deadline_missed(self, job: t.Job, revision: int, now: float) -> bool:
        if self.refuse_marks:
            self.refuse_marks -= 1
            return False
        if self.jobs[job.job_id][1] != revision:
            return False
        marked = t.Job()
        marked.CopyFrom(job)
        marked.sla_miss = True
        marked.waiting_reason = DEADLINE_MISSED
        self._store(marked)
        self.marks += 1
        return True

    def event(self, job_id: str) -> WatchEvent:
        job, revision = self.jobs[job_id]
        kv = KeyValue(KEYS.job(job.tenant_id, job_id), job.SerializeToString(), revision, revision, 1, 0)
        return WatchEvent("put", kv, revision)

    def update(self, job: t.Job) -> WatchEvent:
        self._store(job)
        return self.event(job.job_id)

    def all_events(self) -> list[WatchEvent]:
        """What an informer's first list hands over: every record, in key order."""
        return [self.event(job_id) for job_id in sorted(self.jobs)]


class Harness:
    """A manager over fake records, a fake clock and its own metrics registry."""

    def __init__(self, records: FakeRecords | None = None, clock: FakeClock | None = None) -> None:
        self.records = records or FakeRecords()
        self.clock = clock or FakeClock()
        self.registry = CollectorRegistry()
        self.metrics = QueueMetrics(self.registry)
        self.config = mixed_pools().tenant("initech", 3).build()
        self.manager = QueueManager(
            writer=self.records,
            reader=self.records,
            state=self.records,
            config=self.config,
            clock=self.clock,
            metrics=self.metrics,
            settings=QueueingSettings(),
        )
        self.metrics.watch_shape(self.manager.shape)
        self._n = 0

    def job(self, tenant: str = "acme", **spec: Any) -> t.Job:
        self._n += 1
        now = self.clock.now()
        deadline = spec.pop("deadline_in", None)
        job = t.Job(
            job_id=f"{int(now * 1000):012x}{self._n:010d}",
            tenant_id=tenant,
            state=t.JOB_STATE_PENDING,
            create_time=ts(now),
            update_time=ts(now),
            waiting_reason="QUEUED",
            spec=t.JobSpec(name="j", command=["true"], resources=t.Resources(cpu_millis=100, memory_mb=64), **spec),
        )
        if deadline is not None:
            job.spec.deadline.CopyFrom(ts(now + deadline))
        return job

    async def submit(self, tenant: str = "acme", count: int = 1, **spec: Any) -> list[str]:
        ids = []
        for _ in range(count):
            stored, created = await self.manager.enqueue(self.job(tenant, **spec), quota_fence=1)
            assert created
            ids.append(stored.job_id)
        return ids

    async def dispatch(self, job_id: str, *, after: float = 0.0) -> None:
        """What the scheduler does, as the informer reports it: the record turns RUNNING."""
        job, _ = self.records.jobs[job_id]
        running = t.Job()
        running.CopyFrom(job)
        worker = t.Worker(worker_id="w-1", pool_id="static-general")
        apply_dispatch(running, worker, self.clock.now() + after)
        await self.manager.on_job_event(self.records.update(running))

    async def heads(self, limit: int = 100) -> list[str]:
        jobs, _ = await self.manager.next_jobs(limit, -1, 0)
        return [job.job_id for job, _ in jobs]

    async def shown(self, job_id: str) -> t.Job:
        return await self.manager.get_job("", job_id)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


# Jobs in and out ----------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_enqueued_job_is_stored_before_it_is_queued_and_its_informer_echo_adds_nothing() -> None:
    h = Harness()
    [job_id] = await h.submit("acme")

    assert job_id in h.records.jobs
    await h.manager.on_job_event(h.records.event(job_id))

    assert await h.heads() == [job_id]
    assert h.manager.stats() == ({"default": 1}, {"acme": 1})
    assert h.sample("jobmesh_queueing_enqueued_total", tenant="acme") == 1


@pytest.mark.asyncio
async def test_a_dispatched_job_leaves_the_queue_and_is_charged_to_its_tenant() -> None:
    h = Harness()
    acme = await h.submit("acme", 3)
    globex = await h.submit("globex", 3)
    assert (await h.heads(2)) == [globex[0], acme[0]]  # globex (weight 2) finishes its first job at 0.05

    await h.dispatch(globex[0])

    assert globex[0] not in await h.heads()
    assert h.sample("jobmesh_queueing_dispatched_total", tenant="globex") == 1
    charged = h.manager.queue.tags()["default"].tenants["globex"].charged
    assert charged == 100_000  # 0.1 core in cost units (COST_SCALE per core)


@pytest.mark.asyncio
async def test_a_cancelled_job_leaves_the_queue_without_charging_its_tenant() -> None:
    h = Harness()
    [job_id] = await h.submit("acme")
    job, _ = h.records.jobs[job_id]
    job.state = t.JOB_STATE_CANCELLED

    await h.manager.on_job_event(h.records.update(job))

    assert await h.heads() == []
    assert h.manager.queue.virtual_time() == 0.0
    assert h.sample("jobmesh_queueing_dispatched_total", tenant="acme") is None


@pytest.mark.asyncio
async def test_a_late_echo_of_a_dispatched_jobs_creation_does_not_queue_it_again() -> None:
    h = Harness()
    [job_id] = await h.submit("acme")
    created = h.records.event(job_id)
    await h.dispatch(job_id)

    await h.manager.on_job_event(created)

    assert await h.heads() == []


@pytest.mark.asyncio
async def test_a_job_requeued_after_its_worker_was_lost_queues_again_after_its_backoff_and_keeps_its_reason() -> None:
    h = Harness()
    [job_id] = await h.submit("acme", max_retries=2)
    await h.dispatch(job_id)
    running, _ = h.records.jobs[job_id]
    retry = apply_worker_lost(running, h.clock.now())  # the default backoff: 1 s before the first retry

    await h.manager.on_job_event(h.records.update(retry))
    assert await h.heads() == []
    h.clock.advance(1)
    await h.manager.tick()

    assert await h.heads() == [job_id]
    assert (await h.shown(job_id)).waiting_reason == RETRYING_AFTER_WORKER_LOST


@pytest.mark.asyncio
async def test_autoscaling_reads_the_burst_jobs_and_the_oldest_wait_of_the_jobs_that_may_run_now() -> None:
    h = Harness()
    first = h.job("acme", max_retries=2)
    first.burst_session_id = "burst-1"
    await h.manager.enqueue(first, quota_fence=1)
    h.clock.advance(10)
    [second] = await h.submit("globex")
    h.clock.advance(5)
    assert h.manager.demand_by_queue() == ({"default": 1}, {"default": 15.0})

    await h.dispatch(first.job_id)
    assert h.manager.demand_by_queue() == ({}, {"default": 5.0})

    running, _ = h.records.jobs[first.job_id]
    await h.manager.on_job_event(h.records.update(apply_worker_lost(running, h.clock.now())))
    assert h.manager.demand_by_queue() == ({}, {"default": 5.0})  # backing off: no worker may take it yet
    h.clock.advance(1)
    await h.manager.tick()
    assert h.manager.demand_by_queue() == ({"default": 1}, {"default": 16.0})  # it waits since its submission

    for job_id in (first.job_id, second):
        job, _ = h.records.jobs[job_id]
        job.state = t.JOB_STATE_CANCELLED
        await h.manager.on_job_event(h.records.update(job))
    assert h.manager.demand_by_queue() == ({}, {})


def test_pending_records_are_kept_encoded_and_read_back_equal_and_unshared() -> None:
    pending = PendingJobs()
    job = Harness().job("acme", max_retries=2)
    pending[job.job_id] = (job, 7)

    read, revision = pending[job.job_id]
    assert (read, revision, pending.revision(job.job_id), len(pending)) == (job, 7, 7, 1)
    read.state = t.JOB_STATE_CANCELLED  # a decoded copy: the kept record does not change
    assert pending[job.job_id][0] == job
    assert pending.pop(job.job_id) == (job, 7)
    assert (pending.get(job.job_id), pending.pop(job.job_id), job.job_id in pending) == (None, None, False)


# What GetJob shows ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_pending_job_shows_its_queue_its_position_and_that_it_is_behind_fair_share() -> None:
    h = Harness()
    acme = await h.submit("acme", 2)
    initech = await h.submit("initech", 2)

    first_initech, second_acme = await h.shown(initech[0]), await h.shown(acme[1])

    assert (first_initech.queue, first_initech.queue_position, first_initech.waiting_reason) == ("default", 1, QUEUED)
    # initech (weight 3) finishes at 1/3 and 2/3, acme at 1 and 2: three jobs ahead of acme's second, two not its own.
    assert (second_acme.queue_position, second_acme.waiting_reason) == (4, BEHIND_FAIR_SHARE)


@pytest.mark.asyncio
async def test_a_job_handed_to_the_scheduler_and_not_taken_waits_for_a_worker_until_the_offer_window_ends() -> None:
    h = Harness()
    acme = await h.submit("acme", 2)
    await h.submit("initech", 2)

    await h.heads(limit=4)
    offered = await h.shown(acme[1])
    h.clock.advance(2.5)
    later = await h.shown(acme[1])

    assert offered.waiting_reason == WAITING_FOR_WORKER
    assert later.waiting_reason == BEHIND_FAIR_SHARE


@pytest.mark.asyncio
async def test_the_head_of_a_dynamic_pools_queue_that_no_worker_took_shows_the_pool_scaling_up() -> None:
    h = Harness()
    [job_id] = await h.submit("acme", pool="dynamic-large")  # routed to that pool's queue

    await h.heads()

    shown = await h.shown(job_id)
    assert (shown.queue, shown.queue_position, shown.waiting_reason) == ("dynamic-large", 1, POOL_SCALING_UP)


@pytest.mark.asyncio
async def test_a_job_that_is_no_longer_pending_shows_no_position() -> None:
    h = Harness()
    [job_id] = await h.submit("acme")
    await h.dispatch(job_id)

    shown = await h.shown(job_id)

    assert shown.state == t.JOB_STATE_RUNNING
    assert shown.queue_position == 0


# SLA: boost, deadlines, misses ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_boost_moves_a_gold_job_ahead_of_its_own_tenants_batch_backlog_after_half_its_target() -> None:
    h = Harness()
    await h.submit("acme", 50, sla_tier="batch")
    [gold] = await h.submit("acme", sla_tier="gold")

    before = (await h.shown(gold)).queue_position
    h.clock.advance(15.0)
    await h.manager.tick()

    assert before == 51
    assert (await h.heads(1)) == [gold]
    assert h.manager.next_timer() == pytest.approx(1800.0 - 15.0)  # the batch jobs' own boost


@pytest.mark.asyncio
async def test_a_deadline_that_passes_while_the_job_waits_is_written_to_its_record_once() -> None:
    h = Harness()
    [job_id] = await h.submit("acme", deadline_in=10.0)
    h.clock.advance(11.0)

    await h.manager.tick()
    await h.manager.on_job_event(h.records.event(job_id))  # the informer brings the marked record back
    await h.manager.tick()

    record, _ = h.records.jobs[job_id]
    assert (record.sla_miss, record.waiting_reason) == (True, DEADLINE_MISSED)
    assert h.records.marks == 1
    assert h.sample("jobmesh_queueing_sla_misses_total", sla_tier="standard", reason=MISSED_DEADLINE) == 1
    shown = await h.shown(job_id)
    assert (shown.sla_miss, shown.waiting_reason, shown.queue_position) == (True, DEADLINE_MISSED, 1)

    await h.dispatch(job_id)  # it still runs, and the miss is not counted a second time

    assert h.sample("jobmesh_queueing_sla_outcomes_total", sla_tier="standard", outcome="missed") == 1


@pytest.mark.asyncio
async def test_a_deadline_write_that_loses_a_race_is_retried_at_the_next_tick() -> None:
    h = Harness()
    [job_id] = await h.submit("acme", deadline_in=5.0)
    h.records.refuse_marks = 1
    h.clock.advance(6.0)

    await h.manager.tick()
    assert h.records.marks == 0
    await h.manager.tick()

    assert h.records.marks == 1
    assert h.records.jobs[job_id][0].sla_miss


@pytest.mark.asyncio
async def test_jobs_started_after_their_target_wait_are_misses_and_lower_the_tiers_compliance() -> None:
    h = Harness()
    on_time, late = await h.submit("acme", 2, sla_tier="gold")

    await h.dispatch(on_time, after=10.0)
    await h.dispatch(late, after=45.0)

    assert h.sample("jobmesh_queueing_sla_outcomes_total", sla_tier="gold", outcome="met") == 1
    assert h.sample("jobmesh_queueing_sla_misses_total", sla_tier="gold", reason=MISSED_TARGET_WAIT) == 1
    assert h.sample("jobmesh_queueing_sla_compliance_ratio", sla_tier="gold") == 0.5
    assert h.sample("jobmesh_queueing_wait_seconds_count", sla_tier="gold") == 2


@pytest.mark.asyncio
async def test_a_job_that_started_after_its_target_wait_shows_sla_miss_when_read_and_one_on_time_does_not() -> None:
    h = Harness()
    on_time, late = await h.submit("acme", 2, sla_tier="gold")

    await h.dispatch(on_time, after=29.0)
    await h.dispatch(late, after=31.0)

    assert not (await h.shown(on_time)).sla_miss
    assert (await h.shown(late)).sla_miss
    assert not h.records.jobs[late][0].sla_miss  # shown on read; the scheduler's record is left alone


@pytest.mark.asyncio
async def test_the_wait_of_a_job_without_a_tier_is_counted_under_the_default_tier() -> None:
    h = Harness()
    [job_id] = await h.submit("acme")

    await h.dispatch(job_id, after=1.0)

    assert h.sample("jobmesh_queueing_wait_seconds_sum", sla_tier="standard") == pytest.approx(1.0)


# Weights -------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_new_weight_is_persisted_and_changes_the_order() -> None:
    h = Harness()
    acme = await h.submit("acme", 3)
    globex = await h.submit("globex", 3)

    assert await h.manager.set_weight("acme", 4.0) == 4.0

    assert h.records.weights == {"acme": 4.0}
    assert (await h.heads(2)) == [acme[0], acme[1]]  # 0.25 and 0.5 before globex's 0.5 (later submission)
    assert globex[0] in await h.heads(3)
    assert h.sample("jobmesh_queueing_tenant_weight", tenant="acme") == 4.0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("tenant", "weight", "error"),
    [
        pytest.param("nobody", 2.0, NotFound, id="unknown-tenant"),
        pytest.param("acme", 0.0, InvalidArgument, id="zero"),
        pytest.param("acme", -1.0, InvalidArgument, id="negative"),
        pytest.param("acme", 1000.5, InvalidArgument, id="above-1000"),
        pytest.param("acme", math.nan, InvalidArgument, id="not-a-number"),
    ],
)
async def test_a_weight_for_an_unknown_tenant_or_outside_0_to_1000_is_refused_and_not_stored(
    tenant: str, weight: float, error: type[Exception]
) -> None:
    h = Harness()

    with pytest.raises(error) as raised:
        await h.manager.set_weight(tenant, weight)

    assert h.records.weights == {}
    if isinstance(raised.value, InvalidArgument):
        assert raised.value.field == "weight"


# Restart: the same order from the same records ------------------------------------------------------------------


async def restarted(h: Harness) -> Harness:
    again = Harness(h.records, h.clock)
    await again.manager.restore()
    for event in again.records.all_events():
        await again.manager.on_job_event(event)
    again.manager.finish_rebuild()
    return again


@pytest.mark.asyncio
async def test_a_restarted_manager_rebuilds_the_same_order_from_the_records_and_the_saved_tags() -> None:
    h = Harness()
    for tenant in ("acme", "globex", "initech"):
        await h.submit(tenant, 20, priority=0)
        h.clock.advance(0.01)
    await h.submit("acme", 3, priority=5)
    for job_id in (await h.heads(25))[:25]:
        await h.dispatch(job_id)
    await h.manager.set_weight("globex", 5.0)
    assert await h.manager.save_tags()
    before = await h.heads(1000)

    again = await restarted(h)

    assert await again.heads(1000) == before
    assert again.manager.queue.virtual_time() == h.manager.queue.virtual_time()
    assert again.manager.queue.weight("globex") == 5.0


@pytest.mark.asyncio
async def test_tags_are_saved_only_when_they_changed() -> None:
    h = Harness()
    await h.submit("acme", 2)

    assert await h.manager.save_tags()
    assert not await h.manager.save_tags()
    await h.dispatch((await h.heads(1))[0])
    assert await h.manager.save_tags()
    assert h.sample("jobmesh_queueing_tag_snapshots_total") == 2


# The scheduler's long poll ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_next_jobs_waits_for_a_change_past_the_version_it_saw() -> None:
    h = Harness()
    await h.submit("acme")
    _, version = await h.manager.next_jobs(10, -1, 0)

    waiting = asyncio.create_task(h.manager.next_jobs(10, version, 5.0))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    [new] = await h.submit("globex")
    jobs, newer = await asyncio.wait_for(waiting, 1.0)

    assert newer > version
    assert new in [job.job_id for job, _ in jobs]


@pytest.mark.asyncio
async def test_queue_shape_metrics_compare_dispatch_shares_with_weight_shares() -> None:
    h = Harness()
    await h.submit("acme", 4)
    await h.submit("globex", 4)
    for job_id in await h.heads(3):
        await h.dispatch(job_id)

    assert h.sample("jobmesh_queueing_depth_jobs", queue="default") == 5
    assert h.sample("jobmesh_queueing_tenant_depth_jobs", tenant="globex") == 2
    assert h.sample("jobmesh_queueing_dispatch_share_ratio", tenant="globex") == pytest.approx(2 / 3)
    assert h.sample("jobmesh_queueing_weight_share_ratio", tenant="globex") == pytest.approx(2 / 3)
    # V is the start tag of the latest dispatch: globex's second job started at 0.1 / 2.
    assert h.sample("jobmesh_queueing_virtual_time", queue="default") == pytest.approx(0.05)


# The enqueue batcher -------------------------------------------------------------------------------------------


class FakeEtcd:
    def __init__(self, fail: bool = False, conflict: bool = False) -> None:
        self.txns: list[int] = []
        self.fail = fail
        self.conflict = conflict
        self.revision = 0

    async def txn(self, compares: list[object], ops: list[object], failure: list[object] = ()) -> TxnResult:  # type: ignore[assignment]
        await asyncio.sleep(0.001)
        if self.fail:
            raise Unavailable("etcd: UNAVAILABLE")
        self.txns.append(len(compares))
        self.revision += 1
        return TxnResult(not self.conflict, self.revision, [])


class FakeJobStore(JobStore):
    """The real store's batched create over a fake etcd; a single create only records that it was asked."""

    def __init__(self, etcd: FakeEtcd) -> None:
        super().__init__(etcd, KEYS)  # type: ignore[arg-type]
        self.single: list[str] = []

    async def create(self, job: t.Job, fence: int = 0) -> tuple[t.Job, bool, int]:
        self.single.append(job.job_id)
        return job, True, 99


def spec_job(n: int, idempotency_key: str = "") -> t.Job:
    return t.Job(job_id=f"j{n:04d}", tenant_id="acme", spec=t.JobSpec(idempotency_key=idempotency_key))


@pytest.mark.asyncio
async def test_concurrent_creates_share_one_transaction_per_flight_and_each_caller_gets_its_own_job() -> None:
    etcd = FakeEtcd()
    writer = BatchingJobWriter(FakeJobStore(etcd), max_batch=64)  # type: ignore[arg-type]

    results = await asyncio.gather(*(writer.create(spec_job(n)) for n in range(100)))

    assert [job.job_id for job, _, _ in results] == [f"j{n:04d}" for n in range(100)]
    assert all(created for _, created, _ in results)
    assert etcd.txns == [64, 36]  # at most 64 jobs (128 ops, etcd's limit) per transaction
    assert sum(etcd.txns) == 100


@pytest.mark.asyncio
async def test_a_create_with_an_idempotency_key_goes_alone_through_the_job_store() -> None:
    etcd = FakeEtcd()
    store = FakeJobStore(etcd)
    writer = BatchingJobWriter(store)  # type: ignore[arg-type]

    await writer.create(spec_job(1, idempotency_key="k-1"))

    assert store.single == ["j0001"]
    assert etcd.txns == []


@pytest.mark.asyncio
async def test_a_failed_batch_fails_every_caller_in_it_and_none_is_reported_created() -> None:
    writer = BatchingJobWriter(FakeJobStore(FakeEtcd(fail=True)))  # type: ignore[arg-type]

    results = await asyncio.gather(*(writer.create(spec_job(n)) for n in range(5)), return_exceptions=True)

    assert all(isinstance(r, Unavailable) for r in results)


@pytest.mark.asyncio
async def test_a_batch_that_hits_a_taken_job_id_falls_back_to_one_transaction_per_job() -> None:
    store = FakeJobStore(FakeEtcd(conflict=True))
    writer = BatchingJobWriter(store)  # type: ignore[arg-type]

    results = await asyncio.gather(*(writer.create(spec_job(n)) for n in range(3)))

    assert sorted(store.single) == ["j0000", "j0001", "j0002"]
    assert all(revision == 99 for _, _, revision in results)


@pytest.mark.asyncio
async def test_an_enqueue_without_a_quota_admission_fence_is_refused_and_stores_nothing() -> None:
    h = Harness()
    with pytest.raises(InvalidArgument) as refused:
        await h.manager.enqueue(h.job("acme"), quota_fence=0)
    assert refused.value.field == "quota_fence"
    assert h.records.jobs == {}
