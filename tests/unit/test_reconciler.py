"""The pool-manager's decisions (services/poolmanager/reconciler.py), pure, with a fake clock: lost workers,
drained and used-up workers, scale-up triggers, cooldowns and their one refusal per window, scale-down after
the idle time."""

from __future__ import annotations

from typing import Any

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import FakeClock
from libs.etcd.client import KeyValue
from libs.keys import Keys
from services.poolmanager.reconciler import (
    Action,
    Memory,
    NoteIdle,
    PoolStatus,
    QueueDepth,
    Reclaim,
    Refuse,
    Retire,
    ScaleDown,
    ScaleUp,
    StopDrained,
    View,
    reconcile,
)
from tests.unit.builders import ConfigBuilder

KEYS = Keys("/jobmesh")


class ViewBuilder:
    """A view of one mesh, built up fluently; `memory` carries over between cycles like the controller's."""

    def __init__(self, **pool: Any) -> None:
        builder = ConfigBuilder()
        static_workers = pool.pop("static_workers", 0)
        if static_workers:
            builder.pool("static-general", "static", workers=static_workers)
        builder.pool("dyn", "dynamic", **pool)
        self.pools = builder.build().pools
        self.workers: list[t.Worker] = []
        self.assignments: dict[str, KeyValue] = {}
        self.starting: dict[str, int] = {}
        self.depth: dict[str, int] = {}
        self.memory = Memory()

    def worker(self, worker_id: str, pool: str = "dyn", *, draining: bool = False, jobs_run: int = 0) -> ViewBuilder:
        state = t.WORKER_STATE_DRAINING if draining else t.WORKER_STATE_IDLE
        self.workers.append(t.Worker(worker_id=worker_id, pool_id=pool, state=state, jobs_run=jobs_run))
        return self

    def busy(self, worker_id: str, job_id: str = "j-1") -> ViewBuilder:
        key = KEYS.assignment(worker_id, job_id)
        value = t.Assignment(job_id=job_id, tenant_id="acme", worker_id=worker_id).SerializeToString()
        self.assignments[key] = KeyValue(key, value, 5, 5, 1, 0)
        return self

    def waiting(self, queue: str, jobs: int) -> ViewBuilder:
        self.depth[queue] = jobs
        return self

    def build(self) -> View:
        return View(self.pools, self.workers, self.assignments, self.starting, self.memory, QueueDepth(self.depth, {}))


def of(kind: type, actions: list[Action]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def applied(view: View, actions: list[Action], clock: FakeClock) -> None:
    """What the executor remembers of the actions it applies."""
    for a in actions:
        if isinstance(a, NoteIdle):
            view.memory.idle_since.setdefault(a.worker_id, a.at)
        elif isinstance(a, ScaleUp):
            view.memory.last_action[(a.pool.pool_id, "up")] = clock.monotonic()
        elif isinstance(a, ScaleDown):
            view.memory.last_action[(a.pool.pool_id, "down")] = clock.monotonic()
        elif isinstance(a, Refuse):
            view.memory.last_refusal[(a.pool.pool_id, a.direction)] = clock.monotonic()


def test_an_assignment_whose_worker_has_no_record_is_taken_back() -> None:
    view = ViewBuilder().worker("w-live").busy("w-live").busy("w-gone", "j-2").build()

    reclaims = of(Reclaim, reconcile(view, FakeClock()))

    assert [(r.worker_id, r.assignment.key) for r in reclaims] == [("w-gone", KEYS.assignment("w-gone", "j-2"))]


def test_a_drained_worker_is_stopped_once_idle_and_only_once() -> None:
    builder = ViewBuilder().worker("w-idle", draining=True).worker("w-busy", draining=True).busy("w-busy")
    builder.memory.stopped.add("w-asked")
    builder.worker("w-asked", draining=True)

    stops = of(StopDrained, reconcile(builder.build(), FakeClock()))

    assert [s.worker.worker_id for s in stops] == ["w-idle"]


def test_a_worker_past_its_pools_jobs_per_worker_is_retired() -> None:
    view = ViewBuilder(max_jobs_per_worker=3).worker("w-new", jobs_run=2).worker("w-old", jobs_run=3).build()

    assert [r.worker.worker_id for r in of(Retire, reconcile(view, FakeClock()))] == ["w-old"]


def test_waiting_jobs_scale_a_dynamic_pool_up_by_at_most_one_step() -> None:
    view = ViewBuilder(scale_up_step=2, max_workers=8).waiting("dyn", 5).build()

    (up,) = of(ScaleUp, reconcile(view, FakeClock()))

    assert (up.pool.pool_id, up.count, up.current, up.trigger) == ("dyn", 2, 0, "queue_depth")


def test_a_static_pool_below_its_size_is_filled_at_once_whatever_the_cooldown() -> None:
    builder = ViewBuilder(static_workers=3).worker("s-1", "static-general")
    builder.memory.last_action[("static-general", "up")] = 0.0

    (up,) = of(ScaleUp, reconcile(builder.build(), FakeClock()))

    assert (up.pool.pool_id, up.count, up.trigger) == ("static-general", 2, "pool_size")


def test_a_step_in_cooldown_is_refused_once_per_window_then_taken() -> None:
    clock = FakeClock()
    builder = ViewBuilder(scale_up_cooldown_seconds=10).waiting("dyn", 1)
    view = builder.build()
    applied(view, reconcile(view, clock), clock)  # the first step is taken at t=0
    builder.waiting("dyn", 3)
    view = builder.build()

    clock.advance(2)
    first = reconcile(view, clock)
    applied(view, first, clock)
    clock.advance(2)
    second = reconcile(view, clock)
    clock.advance(7)
    third = reconcile(view, clock)

    assert [(r.direction, r.reason.startswith("in cooldown")) for r in of(Refuse, first)] == [("up", True)]
    assert of(Refuse, second) == [] and of(ScaleUp, second) == []
    assert [u.count for u in of(ScaleUp, third)] == [3]


def test_an_idle_worker_is_scaled_down_only_after_the_pools_idle_time() -> None:
    clock = FakeClock()
    builder = ViewBuilder(scale_down_idle_seconds=30, scale_down_cooldown_seconds=0).worker("w-1")
    view = builder.build()

    first = reconcile(view, clock)
    applied(view, first, clock)
    clock.advance(29)
    early = reconcile(view, clock)
    clock.advance(1)
    due = reconcile(view, clock)

    assert of(NoteIdle, first) == [NoteIdle("w-1", 0.0)] and of(ScaleDown, first) == []
    assert of(ScaleDown, early) == []
    assert [[w.worker_id for w in d.workers] for d in of(ScaleDown, due)] == [["w-1"]]


def test_a_busy_worker_is_never_scaled_down() -> None:
    clock = FakeClock()
    view = ViewBuilder(scale_down_idle_seconds=0, scale_down_cooldown_seconds=0).worker("w-1").busy("w-1").build()
    clock.advance(100)

    assert of(ScaleDown, reconcile(view, clock)) == []


def test_a_pool_run_by_another_provider_is_reported_but_never_scaled() -> None:
    view = ViewBuilder(provider="kubernetes").worker("w-1").busy("w-1").waiting("dyn", 10).build()

    assert reconcile(view, FakeClock()) == [PoolStatus("dyn", 1, 0, 0)]
