"""The pool-manager leader's decisions, pure: `reconcile(view, clock) -> actions`.

Given what the caches show (workers, assignments, workers still starting, queue depth) and what the controller
remembers (when workers went idle, cooldowns), it says what to do, in order:
  1. take back the assignments of workers that are gone (their jobs are retried or fail, WORKER_LOST);
  2. stop drained workers that hold no job, and retire (drain, then stop) workers that may not be reused;
  3. move every pool toward the size its load asks for (`scaling_target`), one step at a time, after its
     cooldown; a refused step is recorded once per cooldown window.
The executor (executor.py) applies the actions, fenced by the cycle's leadership."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import PoolConfig
from libs.etcd.client import KeyValue
from libs.keys import Keys
from libs.lifecycle.routing import queues_served


@dataclass(frozen=True)
class QueueDepth:
    """Waiting jobs per queue, how many of them were admitted against a burst session, and how long the
    longest-waiting one has waited (seconds)."""

    by_queue: dict[str, int]
    burst_by_queue: dict[str, int]
    oldest_wait: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolLoad:
    active: int  # registered and not draining
    starting: int  # provisioned, not registered yet
    busy: int
    backlog: int  # waiting jobs this pool may take
    oldest_wait: float = 0.0  # seconds the longest-waiting of them has waited

    @property
    def current(self) -> int:
        return self.active + self.starting


@dataclass
class Memory:
    """What the controller remembers between cycles (monotonic seconds): when each worker was last seen go
    idle, the workers it asked to stop, and each pool's last scaling action and last refusal by direction."""

    idle_since: dict[str, float] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    last_action: dict[tuple[str, str], float] = field(default_factory=dict)
    last_refusal: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class View:
    pools: Sequence[PoolConfig]
    workers: Sequence[t.Worker]
    assignments: Mapping[str, KeyValue]  # assignment key -> record
    starting: Mapping[str, int]  # pool id -> workers provisioned and not registered yet
    memory: Memory
    depth: QueueDepth = field(default_factory=lambda: QueueDepth({}, {}))


# Actions ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reclaim:
    worker_id: str
    assignment: KeyValue


@dataclass(frozen=True)
class StopDrained:
    worker: t.Worker


@dataclass(frozen=True)
class Retire:
    worker: t.Worker


@dataclass(frozen=True)
class PoolStatus:
    pool_id: str
    busy: int
    idle: int
    starting: int


@dataclass(frozen=True)
class NoteIdle:
    """A worker seen idle for the first time: its idle clock starts now."""

    worker_id: str
    at: float


@dataclass(frozen=True)
class ScaleUp:
    pool: PoolConfig
    count: int
    current: int
    trigger: str
    reason: str


@dataclass(frozen=True)
class ScaleDown:
    """Drain these idle workers (each only if still idle) and stop them."""

    pool: PoolConfig
    workers: tuple[t.Worker, ...]
    current: int
    reason: str


@dataclass(frozen=True)
class Refuse:
    """A step the cooldown holds back, recorded (not executed)."""

    pool: PoolConfig
    direction: str
    current: int
    to: int
    trigger: str
    reason: str


Action = Reclaim | StopDrained | Retire | PoolStatus | NoteIdle | ScaleUp | ScaleDown | Refuse


# The policy -------------------------------------------------------------------------------------------------


def scaling_target(pool: PoolConfig, load: PoolLoad) -> tuple[int, str]:
    """The size a pool should move to, and the trigger that asks for it.

    Static pools hold their size. Dynamic and burst pools grow to their busy workers plus one worker per
    `worker_slots` waiting jobs (one per job with the default single slot) when
    enough jobs wait (`scale_up_queue_depth`) or one has waited too long (`scale_up_queue_wait_seconds`), and
    by one worker of headroom when `scale_up_utilization` of the active workers are busy; they shrink (idle
    workers only) to what the running and waiting jobs need plus that headroom, never below `min_workers`.
    `reconcile` applies steps and cooldowns."""
    current = load.current
    if pool.kind == "static":
        return pool.max_workers, "pool_size"
    need = load.busy + math.ceil(load.backlog / pool.worker_slots)
    utilization = pool.scale_up_utilization
    want, trigger = current, ""
    if need > current and load.backlog >= pool.scale_up_queue_depth:
        want, trigger = need, "burst_demand" if pool.kind == "burst" else "queue_depth"
    elif need > current and load.backlog and 0 < pool.scale_up_queue_wait_seconds <= load.oldest_wait:
        want, trigger = need, "queue_wait"
    elif utilization and load.active and load.busy >= utilization * load.active and load.starting == 0:
        want, trigger = current + 1, "utilization"
    else:
        keep = need
        if utilization and load.busy:
            keep = max(keep, math.floor(load.busy / utilization) + 1)  # scaling down must not re-trigger it
        want = min(current, keep)
    want = max(pool.min_workers, min(pool.max_workers, want))
    if want > current and not trigger:
        trigger = "min_workers"
    elif want < current:
        trigger = "idle_workers"
    return want, trigger


class _Derived:
    """What several phases ask of the view, computed once per cycle."""

    def __init__(self, view: View):
        self.view = view
        self.busy = {Keys.assignment_worker(k) for k in view.assignments}
        self.by_pool: dict[str, list[t.Worker]] = {p.pool_id: [] for p in view.pools}
        for w in view.workers:
            self.by_pool.setdefault(w.pool_id, []).append(w)

    def active(self, pool_id: str) -> list[t.Worker]:
        return [w for w in self.by_pool.get(pool_id, []) if w.state != t.WORKER_STATE_DRAINING]

    def idle(self, pool_id: str) -> list[t.Worker]:
        return [w for w in self.active(pool_id) if w.worker_id not in self.busy]

    def at_max(self, pool: PoolConfig) -> bool:
        return len(self.active(pool.pool_id)) + self.view.starting.get(pool.pool_id, 0) >= pool.max_workers

    def static_has_room(self) -> bool:
        return any(self.idle(p.pool_id) for p in self.view.pools if p.kind == "static")

    def backlog(self, pool: PoolConfig) -> tuple[int, float]:
        """(waiting jobs this pool may take, the longest wait among their queues)."""
        depth = self.view.depth
        queues, burst_only = queues_served(
            pool, self.view.pools, static_has_room=self.static_has_room(), at_max=self.at_max
        )
        if not burst_only:
            return sum(depth.by_queue.get(q, 0) for q in queues), max(depth.oldest_wait.get(q, 0.0) for q in queues)
        waiting = [q for q in queues if depth.burst_by_queue.get(q, 0)]
        backlog = sum(depth.burst_by_queue.get(q, 0) for q in waiting)
        return backlog, max((depth.oldest_wait.get(q, 0.0) for q in waiting), default=0.0)


def reconcile(view: View, clock: Clock) -> list[Action]:
    """Everything the leader should do, in order (the controller runs the two halves as separate phases, so a
    slow queue-depth answer never delays taking back a lost worker's jobs)."""
    return reconcile_workers(view) + reconcile_pools(view, clock)


def reconcile_workers(view: View) -> list[Action]:
    """Phases 1 and 2: lost workers, then drained and used-up ones (no queue depth needed)."""
    return lost_workers(view) + used_up_workers(view, _Derived(view))


def pool_backlogs(view: View) -> dict[str, int]:
    """Per pool, the waiting jobs it may take (the routing rule of libs/lifecycle/routing.py): its queue depth as
    its metrics show it."""
    derived = _Derived(view)
    return {pool.pool_id: derived.backlog(pool)[0] for pool in view.pools}


def reconcile_pools(view: View, clock: Clock) -> list[Action]:
    """Phase 3: every pool toward the size its load asks for."""
    derived = _Derived(view)
    now = clock.monotonic()
    return [action for pool in view.pools for action in scale_pool(pool, view, derived, now)]


def lost_workers(view: View) -> list[Action]:
    """Phase 1: every assignment whose worker has no record (its lease ran out) is taken back."""
    live = {w.worker_id for w in view.workers}
    return [
        Reclaim(Keys.assignment_worker(key), kv)
        for key, kv in view.assignments.items()
        if Keys.assignment_worker(key) not in live
    ]


def used_up_workers(view: View, derived: _Derived) -> list[Action]:
    """Phase 2: drained workers (a failed health check, or our own drain) are stopped once they hold no job;
    workers past the pool's jobs per worker are retired, to be replaced."""
    actions: list[Action] = []
    for pool in view.pools:
        for worker in derived.by_pool.get(pool.pool_id, []):
            if worker.state == t.WORKER_STATE_DRAINING:
                if worker.worker_id not in derived.busy and worker.worker_id not in view.memory.stopped:
                    actions.append(StopDrained(worker))
            elif pool.max_jobs_per_worker and worker.jobs_run >= pool.max_jobs_per_worker:
                actions.append(Retire(worker))
    return actions


def scale_pool(pool: PoolConfig, view: View, derived: _Derived, now: float) -> list[Action]:
    """Phase 3, one pool: toward `scaling_target`, a step at a time, after the direction's cooldown."""
    active, idle = derived.active(pool.pool_id), derived.idle(pool.pool_id)
    starting = view.starting.get(pool.pool_id, 0)
    busy = len(active) - len(idle)
    actions: list[Action] = [PoolStatus(pool.pool_id, busy, len(idle), starting)]
    current = len(active) + starting
    if pool.provider != "local":
        return actions  # workers of this pool are run by something else (e.g. a Kubernetes Deployment)
    backlog, oldest_wait = derived.backlog(pool)
    want, trigger = scaling_target(pool, PoolLoad(len(active), starting, busy, backlog, oldest_wait))
    elastic = pool.kind != "static"
    memory = view.memory
    if want > current:
        step = min(want - current, pool.scale_up_step) if elastic else want - current
        reason = f"{busy} busy, {backlog} waiting (longest {oldest_wait:.1f}s), {current} workers"
        if elastic and not _cooled(memory.last_action, pool, "up", now):
            return actions + _refusal(memory, pool, "up", current, current + step, trigger, reason, now)
        return [*actions, ScaleUp(pool, step, current, trigger, reason)]
    if want < current and elastic:
        noted = [NoteIdle(w.worker_id, now) for w in idle if w.worker_id not in memory.idle_since]
        since = {**memory.idle_since, **{n.worker_id: n.at for n in noted}}
        idle_long = [w for w in idle if now - since[w.worker_id] >= pool.scale_down_idle_seconds]
        actions += noted
        if not idle_long:
            return actions
        target = max(want, current - pool.scale_down_step)
        reason = f"{len(idle_long)} idle for {pool.scale_down_idle_seconds:.0f}s, {backlog} waiting"
        if not _cooled(memory.last_action, pool, "down", now):
            return actions + _refusal(memory, pool, "down", current, target, "idle_workers", reason, now)
        actions.append(ScaleDown(pool, tuple(idle_long[: current - target]), current, reason))
    return actions


def cooldown(pool: PoolConfig, direction: str) -> float:
    return pool.scale_up_cooldown_seconds if direction == "up" else pool.scale_down_cooldown_seconds


def _cooled(last_action: Mapping[tuple[str, str], float], pool: PoolConfig, direction: str, now: float) -> bool:
    last = last_action.get((pool.pool_id, direction))
    return last is None or now - last >= cooldown(pool, direction)


def _refusal(
    memory: Memory, pool: PoolConfig, direction: str, cur: int, to: int, trigger: str, reason: str, now: float
) -> list[Action]:
    """One "in cooldown" record per cooldown window keeps the history readable."""
    last = memory.last_refusal.get((pool.pool_id, direction), -1e9)
    if now - last < cooldown(pool, direction):
        return []
    return [Refuse(pool, direction, cur, to, trigger, f"in cooldown: {reason}")]
