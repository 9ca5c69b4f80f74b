"""The scheduler's snapshot of capacity: the workers with room for another job, from the worker and assignment
watch caches plus the dispatches it made that the caches do not show yet (its claims)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig
from libs.etcd.client import KeyValue, WatchEvent
from libs.keys import Keys
from libs.lifecycle.codec import decode_assignment, decode_worker
from services.scheduler.placement import TIER_DYNAMIC, TIERS, Candidate

# A claim the assignment cache never confirmed is dropped after this long (the dispatch's transaction failed
# in a way we did not see, or the watch is far behind).
CLAIM_TTL_SECONDS = 5.0


class Cache(Protocol):
    """What the snapshot reads of an informer."""

    @property
    def cache(self) -> Mapping[str, KeyValue]: ...


@dataclass(frozen=True)
class _Claim:
    worker_id: str
    at: float
    cpu_millis: int
    memory_mb: int


def _add(holdings: dict[str, list[int]], worker_id: str, cpu_millis: int, memory_mb: int) -> None:
    held = holdings.setdefault(worker_id, [0, 0, 0])
    held[0] += 1
    held[1] += cpu_millis
    held[2] += memory_mb


class Capacity:
    """Workers with room, as of the caches and our claims. `changed` is set (and `epoch` bumped) whenever room may
    have appeared: a worker's record changed, or an assignment went away."""

    def __init__(
        self,
        config: MeshConfig,
        clock: Clock,
        workers: Cache,
        assignments: Cache,
        etcd_term: Callable[[], int] = lambda: 0,
    ):
        self.clock = clock
        # etcd's current raft term as the scheduler last heard it: a worker not heard in it may be dead (see
        # Worker.etcd_term) and gets nothing until a heartbeat brings its record up to date.
        self.etcd_term = etcd_term
        self.unheard = 0  # workers the last snapshot left out for not being heard in the current term
        self.workers = workers
        self.assignments = assignments
        self.tiers = {p.pool_id: TIERS[p.kind] for p in config.pools}
        self.max_jobs = {p.pool_id: p.max_jobs_per_worker for p in config.pools if p.max_jobs_per_worker}
        self.slots = {p.pool_id: p.worker_slots for p in config.pools}
        self.changed = asyncio.Event()
        self.epoch = 0  # bumped on every worker or assignment change that may free room
        # Assignments we wrote that the assignment cache has not shown yet: they hold their worker's room.
        self._claimed: dict[str, _Claim] = {}
        self._held: dict[str, tuple[int, int, int]] = {}  # assignment key -> (mod revision, CPU, memory)
        self._decoded: dict[str, tuple[int, t.Worker]] = {}  # worker key -> (mod revision, parsed record)

    # Informer hooks ---------------------------------------------------------------------------------------------

    def on_worker(self, _event: object) -> None:
        self.epoch += 1
        self.changed.set()

    def on_assignment(self, event: WatchEvent) -> None:
        """Any change of an assignment we claimed means the cache now speaks for it, and the claim can go.
        Waiting to see it in the cache instead would miss a job that started and ended between two cycles,
        and leave its room unused until the claim expired.

        Only a delete frees room: a put is our own dispatch landing, so it wakes no scheduling cycle."""
        self._claimed.pop(event.kv.key, None)
        if event.kind == "delete":
            self.on_worker(event)

    # Claims -----------------------------------------------------------------------------------------------------

    def exclusive(self, pool_id: str) -> bool:
        """Workers of the pool run one job at a time."""
        return self.slots.get(pool_id, 1) == 1

    def claim(self, assign_key: str, worker_id: str, resources: t.Resources) -> None:
        self._claimed[assign_key] = _Claim(worker_id, self.clock.monotonic(), resources.cpu_millis, resources.memory_mb)

    def release(self, assign_key: str) -> None:
        self._claimed.pop(assign_key, None)

    def forget_claims(self) -> None:
        self._claimed.clear()

    # The snapshot -----------------------------------------------------------------------------------------------

    def snapshot(self) -> list[Candidate]:
        """Workers with room for another job (an idle one, or one with a free slot), heard in etcd's current term."""
        holdings = self._holdings()
        out = []
        decoded: dict[str, tuple[int, t.Worker]] = {}
        term = self.etcd_term()
        unheard = 0
        for key, kv in self.workers.cache.items():
            known = self._decoded.get(key)
            worker = known[1] if known is not None and known[0] == kv.mod_revision else decode_worker(kv.value)
            decoded[key] = (kv.mod_revision, worker)
            if worker.state == t.WORKER_STATE_DRAINING:
                continue
            if worker.etcd_term < term:
                unheard += 1
                continue
            jobs, cpu, memory = holdings.get(worker.worker_id, (0, 0, 0))
            slots = self.slots.get(worker.pool_id, 1) - jobs
            limit = self.max_jobs.get(worker.pool_id)
            if limit:
                slots = min(slots, limit - worker.jobs_run - jobs)  # used up: the pool-manager replaces it
            if slots <= 0:
                continue
            free = t.Resources(
                cpu_millis=worker.capacity.cpu_millis - cpu, memory_mb=worker.capacity.memory_mb - memory
            )
            tier = self.tiers.get(worker.pool_id, TIER_DYNAMIC)
            out.append(Candidate(worker, kv.mod_revision, tier, slots=slots, free=free))
        self._decoded = decoded
        self.unheard = unheard
        return out

    def _holdings(self) -> dict[str, list[int]]:
        """worker id -> [jobs, CPU, memory] it holds: its assignments in the cache and the ones we claimed."""
        cache = self.assignments.cache
        now = self.clock.monotonic()
        for key in [k for k, c in self._claimed.items() if k in cache or now - c.at > CLAIM_TTL_SECONDS]:
            del self._claimed[key]
        held: dict[str, tuple[int, int, int]] = {}
        out: dict[str, list[int]] = {}
        for key, kv in cache.items():
            known = self._held.get(key)
            if known is None or known[0] != kv.mod_revision:
                res = decode_assignment(kv.value).spec.resources
                known = (kv.mod_revision, res.cpu_millis, res.memory_mb)
            held[key] = known
            _add(out, Keys.assignment_worker(key), known[1], known[2])
        self._held = held
        for claim in self._claimed.values():
            _add(out, claim.worker_id, claim.cpu_millis, claim.memory_mb)
        return out
