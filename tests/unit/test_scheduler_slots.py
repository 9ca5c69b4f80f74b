"""Unit tests of worker slots in the scheduler (services/scheduler/capacity.py): a worker with several slots is
offered while it has a slot and room (its size less what its assignments and our in-flight dispatches hold),
jobs pack onto the fullest worker that fits, and a one-slot worker's dispatch is guarded in the store itself."""

from __future__ import annotations

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.etcd.client import WatchEvent
from services.scheduler.placement import Candidate, pick_worker
from tests.unit.test_scheduler_claims import KEYS, dispatch, dispatched_and_seen, kv, scheduler_with


def spec(cpu_millis: int, memory_mb: int = 64) -> t.JobSpec:
    out = t.JobSpec()
    out.resources.cpu_millis, out.resources.memory_mb = cpu_millis, memory_mb
    return out


def room(sched_candidates: list[Candidate]) -> dict[str, tuple[int, int, int]]:
    return {c.worker.worker_id: (c.slots, c.room().cpu_millis, c.room().memory_mb) for c in sched_candidates}


def test_a_worker_with_slots_stays_on_offer_with_what_is_left_of_it() -> None:
    sched, _ = scheduler_with(["w-1"])
    sched.capacity.slots["static-general"] = 3
    (cand,) = sched.idle_workers()
    dispatch(sched, cand, "job-1")  # 100m, 64 MB; not yet in the cache: held by our claim

    assert room(sched.idle_workers()) == {"w-1": (2, 900, 960)}


def test_assignments_in_the_cache_hold_their_room_and_a_delete_gives_it_back() -> None:
    sched, assignments = scheduler_with(["w-1"])
    sched.capacity.slots["static-general"] = 2
    assignment, key = dispatched_and_seen(sched, assignments)

    assert room(sched.idle_workers()) == {"w-1": (1, 900, 960)}

    del assignments.cache[key]
    sched.on_assignment(WatchEvent("delete", kv(key, assignment.SerializeToString(), 11), 11))
    assert room(sched.idle_workers()) == {"w-1": (2, 1000, 1024)}


def test_a_full_worker_is_not_offered() -> None:
    sched, _ = scheduler_with(["w-1"])
    sched.capacity.slots["static-general"] = 2
    for n in range(2):
        (cand,) = sched.idle_workers()
        dispatch(sched, cand, f"job-{n}")

    assert sched.idle_workers() == []


def test_jobs_pack_onto_the_fullest_worker_they_fit() -> None:
    sched, _ = scheduler_with(["w-1", "w-2"])
    sched.capacity.slots["static-general"] = 4
    w1 = next(c for c in sched.idle_workers() if c.worker.worker_id == "w-1")
    dispatch(sched, w1, "job-1")
    offered = sched.idle_workers()

    choice = pick_worker(spec(100), offered)
    assert choice is not None and choice.worker.worker_id == "w-1"  # 800m left there beats 900m on w-2
    too_big = pick_worker(spec(950), offered)
    assert too_big is not None and too_big.worker.worker_id == "w-2"  # only the empty worker has room


def test_taking_a_slot_within_a_cycle_shrinks_the_candidate() -> None:
    worker = t.Worker(worker_id="w-1", pool_id="p")
    worker.capacity.cpu_millis, worker.capacity.memory_mb = 1000, 1024
    cand = Candidate(worker, 1, slots=2)
    cand.take(spec(600, 512))

    assert (cand.slots, cand.room().cpu_millis, cand.room().memory_mb) == (1, 400, 512)
    assert pick_worker(spec(500), [cand]) is None  # a slot is left, but not the CPU


def test_a_one_slot_dispatch_is_refused_by_the_store_if_the_worker_holds_any_job() -> None:
    sched, _ = scheduler_with(["w-1", "w-2"])
    sched.capacity.slots["static-general"] = 1
    one = next(c for c in sched.idle_workers() if c.worker.worker_id == "w-1")
    job = t.Job(job_id="job-1", tenant_id="acme", state=t.JOB_STATE_PENDING)

    guarded = sched.dispatcher.prepare(q.QueuedJob(job=job, mod_revision=5), one)
    ranged = [c for c in guarded.txn.compares if c.range_end]
    assert [c.key.decode() for c in ranged] == [KEYS.worker_assignments("w-1")]

    sched.capacity.slots["static-general"] = 2
    two = next(c for c in sched.idle_workers() if c.worker.worker_id == "w-2")
    shared = sched.dispatcher.prepare(q.QueuedJob(job=t.Job(job_id="job-2", tenant_id="acme"), mod_revision=6), two)
    assert not [c for c in shared.txn.compares if c.range_end]


def test_a_max_jobs_per_worker_counts_jobs_in_flight() -> None:
    sched, _ = scheduler_with(["w-1"])
    sched.capacity.slots["static-general"] = 4
    sched.capacity.max_jobs["static-general"] = 2
    (cand,) = sched.idle_workers()
    assert cand.slots == 2  # four slots, but only two jobs left in its life
    dispatch(sched, cand, "job-1")
    dispatch(sched, cand, "job-2")

    assert sched.idle_workers() == []
