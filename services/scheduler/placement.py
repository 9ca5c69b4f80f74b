"""Placement (pure): which worker with room takes which queued job, in queue order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.queueing.v1 import queueing_pb2 as q
from libs.config import POOL_KINDS
from libs.lifecycle.routing import fits, may_place
from libs.lifecycle.transitions import may_start

# Placement order (the seed's pool selection chart) is the order of POOL_KINDS: static, dynamic, burst.
TIERS = {kind: rank for rank, kind in enumerate(POOL_KINDS)}
TIER_STATIC, TIER_DYNAMIC, TIER_BURST = TIERS["static"], TIERS["dynamic"], TIERS["burst"]


@dataclass
class Candidate:
    """A worker with room for at least one more job: `free` is what its running jobs leave of its size, `slots`
    how many more jobs it may take."""

    worker: t.Worker
    mod_revision: int
    tier: int = TIER_STATIC
    slots: int = 1
    free: t.Resources | None = None

    def __post_init__(self) -> None:
        if self.free is None:
            self.free = t.Resources()
            self.free.CopyFrom(self.worker.capacity)

    def room(self) -> t.Resources:
        assert self.free is not None
        return self.free

    def take(self, spec: t.JobSpec) -> None:
        """Counts a job placed on this worker within the cycle that placed it."""
        self.slots -= 1
        self.room().cpu_millis -= spec.resources.cpu_millis
        self.room().memory_mb -= spec.resources.memory_mb


def pick_worker(spec: t.JobSpec, idle: list[Candidate], burst_ok: bool = False) -> Candidate | None:
    """Static pools first, then dynamic, then (only for a job admitted against a burst session) burst capacity;
    within a tier the tightest fit (least CPU, then memory, left over), so jobs pack onto busy workers and
    big workers stay free."""
    suitable = [
        c
        for c in idle
        if c.slots > 0
        and may_place(spec, c.worker.pool_id, POOL_KINDS[c.tier], burst_ok)
        and fits(c.room().cpu_millis, c.room().memory_mb, c.worker.labels, spec)
    ]
    if not suitable:
        return None
    return min(
        suitable,
        key=lambda c: (
            c.tier,
            c.room().cpu_millis - spec.resources.cpu_millis,
            c.room().memory_mb - spec.resources.memory_mb,
            c.worker.worker_id,
        ),
    )


def nominate(
    heads: Sequence[q.QueuedJob], idle: list[Candidate], now: float | None = None
) -> list[tuple[q.QueuedJob, Candidate]]:
    """A worker for each head that one suits, in queue order; each placement takes its room from the candidate
    (and a full one leaves `idle`), so later heads see what earlier ones left. With `now`, a retry still backing
    off is passed over (queueing does not hand those out; this holds even if its view were behind)."""
    plan: list[tuple[q.QueuedJob, Candidate]] = []
    for queued in heads:
        if now is not None and not may_start(queued.job, now):
            continue
        choice = pick_worker(queued.job.spec, idle, burst_ok=bool(queued.job.burst_session_id))
        if choice is not None:
            plan.append((queued, choice))
            choice.take(queued.job.spec)
            if choice.slots <= 0:
                idle.remove(choice)
    return plan
