"""Unit tests of the scheduler's worker claims (services/scheduler/capacity.py and dispatcher.py): a worker it
dispatched to is not offered again until its assignment cache has caught up, and is offered again as soon as it
has, even when the job started and ended between two cycles."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.clock import FakeClock
from libs.config import load_config
from libs.etcd.client import KeyValue, WatchEvent
from libs.keys import Keys
from services.scheduler.capacity import Capacity
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.placement import Candidate
from tests.helpers import FIXTURE_CONFIG

KEYS = Keys("/jobmesh")


@dataclass
class Cache:
    """What the scheduler reads of an informer: its cache."""

    cache: dict[str, KeyValue] = field(default_factory=dict)


def kv(key: str, value: bytes, revision: int) -> KeyValue:
    return KeyValue(key, value, revision, revision, 1, 0)


@dataclass
class Sched:
    """The scheduler's capacity snapshot and dispatcher, over plain caches."""

    capacity: Capacity
    dispatcher: Dispatcher

    def idle_workers(self) -> list[Candidate]:
        return self.capacity.snapshot()

    def on_assignment(self, event: WatchEvent) -> None:
        self.capacity.on_assignment(event)


def scheduler_with(worker_ids: list[str]) -> tuple[Sched, Cache]:
    workers, assignments = Cache(), Cache()
    for n, worker_id in enumerate(worker_ids, start=1):
        worker = t.Worker(worker_id=worker_id, pool_id="static-general", state=t.WORKER_STATE_IDLE)
        worker.capacity.cpu_millis, worker.capacity.memory_mb = 1000, 1024
        workers.cache[KEYS.worker(worker_id)] = kv(KEYS.worker(worker_id), worker.SerializeToString(), n)
    clock = FakeClock(1_700_000_000.0)
    capacity = Capacity(load_config(FIXTURE_CONFIG), clock, workers, assignments)
    metrics = SchedulerMetrics(CollectorRegistry())
    dispatcher = Dispatcher(KEYS, clock, election=None, capacity=capacity, metrics=metrics)  # type: ignore[arg-type]
    return Sched(capacity, dispatcher), assignments


def dispatch(sched: Sched, cand: Candidate, job_id: str) -> t.Assignment:
    job = t.Job(job_id=job_id, tenant_id="acme", state=t.JOB_STATE_PENDING)
    job.spec.resources.cpu_millis, job.spec.resources.memory_mb = 100, 64
    d = sched.dispatcher.prepare(q.QueuedJob(job=job, mod_revision=5), cand)
    assignment = t.Assignment()
    assignment.ParseFromString(d.txn.ops[1].request_put.value)
    return assignment


def idle_ids(sched: Sched) -> list[str]:
    return sorted(c.worker.worker_id for c in sched.idle_workers())


def test_a_worker_just_dispatched_to_is_not_offered_before_the_cache_shows_it() -> None:
    sched, _ = scheduler_with(["w-1", "w-2"])
    first = sched.idle_workers()
    chosen = next(c for c in first if c.worker.worker_id == "w-1")

    dispatch(sched, chosen, "job-1")

    assert idle_ids(sched) == ["w-2"]


def dispatched_and_seen(sched: Sched, assignments: Cache) -> tuple[t.Assignment, str]:
    """Dispatches job-1 to the only worker, w-1, and hands the scheduler the informer's put of it."""
    (chosen,) = sched.idle_workers()
    assignment = dispatch(sched, chosen, "job-1")
    key = KEYS.assignment("w-1", "job-1")
    put = kv(key, assignment.SerializeToString(), 10)
    assignments.cache[key] = put
    sched.on_assignment(WatchEvent("put", put, 10))
    return assignment, key


def test_a_job_that_started_and_ended_between_two_cycles_frees_its_worker_at_once() -> None:
    sched, assignments = scheduler_with(["w-1"])
    # The informer hands over our put and the result's delete before the next cycle looks.
    assignment, key = dispatched_and_seen(sched, assignments)
    del assignments.cache[key]
    sched.on_assignment(WatchEvent("delete", kv(key, assignment.SerializeToString(), 11), 11))

    assert idle_ids(sched) == ["w-1"]


def test_a_worker_stays_busy_while_its_assignment_is_in_the_cache() -> None:
    sched, assignments = scheduler_with(["w-1"])
    assignment, _ = dispatched_and_seen(sched, assignments)

    assert idle_ids(sched) == []
    assert assignment.job.job_id == "job-1"  # the assignment carries the job as dispatched
    assert assignment.job.state == t.JOB_STATE_RUNNING


def test_only_a_freed_worker_wakes_the_scheduling_loop() -> None:
    sched, assignments = scheduler_with(["w-1"])
    sched.capacity.changed.clear()
    assignment, key = dispatched_and_seen(sched, assignments)  # our own dispatch landing
    assert not sched.capacity.changed.is_set()

    del assignments.cache[key]
    sched.on_assignment(WatchEvent("delete", kv(key, assignment.SerializeToString(), 11), 11))

    assert sched.capacity.changed.is_set()


def test_a_worker_not_heard_in_etcds_current_term_is_not_offered_until_its_record_is() -> None:
    """etcd renews every lease when it elects a leader (a restart), so a record of an older term may be a dead
    worker's: it is offered again only once a heartbeat has brought it up to the current term."""
    workers, assignments = Cache(), Cache()
    term = [7]
    for n, (worker_id, heard) in enumerate([("w-old", 6), ("w-new", 7)], start=1):
        worker = t.Worker(worker_id=worker_id, pool_id="static-general", state=t.WORKER_STATE_IDLE, etcd_term=heard)
        worker.capacity.cpu_millis, worker.capacity.memory_mb = 1000, 1024
        workers.cache[KEYS.worker(worker_id)] = kv(KEYS.worker(worker_id), worker.SerializeToString(), n)
    capacity = Capacity(
        load_config(FIXTURE_CONFIG), FakeClock(1_700_000_000.0), workers, assignments, etcd_term=lambda: term[0]
    )
    assert [c.worker.worker_id for c in capacity.snapshot()] == ["w-new"]
    assert capacity.unheard == 1
    confirmed = t.Worker.FromString(workers.cache[KEYS.worker("w-old")].value)
    confirmed.etcd_term = 7
    workers.cache[KEYS.worker("w-old")] = kv(KEYS.worker("w-old"), confirmed.SerializeToString(), 3)
    assert sorted(c.worker.worker_id for c in capacity.snapshot()) == ["w-new", "w-old"]
    assert capacity.unheard == 0
    term[0] = 8  # a new election: nobody is offered until heard again
    assert capacity.snapshot() == []
    assert capacity.unheard == 2
