"""Weighted fair queueing by virtual finish tag, one lane per queue, with an SLA boost; pure and deterministic.

The rules (docs/queueing.md states them for users):

* Each queue (pool class) is a lane with its own virtual time V and its own per-tenant tags.
* A tenant's service is a chain: `base + charged / weight`, where `charged` is the cost of its jobs dispatched
  since it last became backlogged. When a tenant becomes backlogged its base is `max(V, its last finish tag)` -
  computed once, then: an idle tenant banks no credit, and a backlogged one is never re-based against V
  (re-basing on every look was the old starvation bug).
* Its k-th queued job finishes at `base + (charged + cost of the k jobs up to it) / weight` and jobs leave by
  finish tag; dispatching charges the tenant and sets V = max(V, its start tag before the charge). A cancelled
  job charges nothing.
* Urgent jobs (their SLA boost time has come) form a class served before all others, by the same rule among
  themselves (each tenant's urgent jobs earliest due first); see lanes.py.
"""

from __future__ import annotations

import heapq
from itertools import count, islice

from services.queueing.items import (
    COST_SCALE,
    DEFAULT_QUEUE,
    NEVER,
    Key,
    LaneTags,
    Placement,
    QueueItem,
    TenantTags,
    cost_units,
    job_cost,
)
from services.queueing.lanes import Lane, Tenant

__all__ = [
    "COST_SCALE",
    "DEFAULT_QUEUE",
    "NEVER",
    "Key",
    "LaneTags",
    "Placement",
    "QueueItem",
    "TenantTags",
    "WeightedFairQueue",
    "cost_units",
    "job_cost",
]


class WeightedFairQueue:
    """The fair queue over every queue name: push, remove (dispatched or not), peek in order, position."""

    def __init__(self, weights: dict[str, float] | None = None, default_weight: float = 1.0):
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self._items: dict[str, QueueItem] = {}
        self._lanes: dict[str, Lane] = {}
        self._seq = count(1)
        # Bumped by every change that can give a reader of the heads something new: an arrival, a reorder, and a
        # removal that leaves jobs behind. A removal that empties the queue does not bump it: nothing is left to
        # offer, and the scheduler waiting for a newer queue after dispatching the last head would only be woken
        # to be told so (one round trip per job at light load).
        self.version = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._items

    def get(self, job_id: str) -> QueueItem | None:
        return self._items.get(job_id)

    def queues(self) -> list[str]:
        return sorted(name for name, lane in self._lanes.items() if lane.size)

    def virtual_time(self, queue: str = DEFAULT_QUEUE) -> float:
        lane = self._lanes.get(queue)
        return lane.virtual_time if lane else 0.0

    def virtual_times(self) -> dict[str, float]:
        return {name: lane.virtual_time for name, lane in self._lanes.items()}

    @property
    def tags_version(self) -> int:
        """Changes whenever a persisted tag (virtual time, a tenant's base or charge or weight) changes."""
        return sum(lane.tag_changes for lane in self._lanes.values())

    def weight(self, tenant_id: str) -> float:
        return self.weights.get(tenant_id, self.default_weight)

    def _lane(self, queue: str) -> Lane:
        lane = self._lanes.get(queue)
        if lane is None:
            lane = self._lanes[queue] = Lane(queue, self._items)
        return lane

    # Changes ---------------------------------------------------------------------------------------

    def set_weight(self, tenant_id: str, weight: float) -> None:
        if not weight > 0:
            raise ValueError("a weight must be greater than 0")
        self.weights[tenant_id] = weight
        for lane in self._lanes.values():
            lane.set_weight(tenant_id, weight)
        self.version += 1

    def push(self, item: QueueItem) -> bool:
        if item.job_id in self._items:
            return False
        if not item.seq:
            item = item._replace(seq=next(self._seq))
        self._items[item.job_id] = item
        lane = self._lanes.get(item.queue) or self._lane(item.queue)
        lane.push(item, self.weights.get(item.tenant_id, self.default_weight))
        self.version += 1
        return True

    def remove(self, job_id: str, *, dispatched: bool) -> QueueItem | None:
        """Takes a job out; when it was dispatched its tenant is charged its cost and V may advance."""
        item = self._items.get(job_id)
        if item is None:
            return None
        self._lanes[item.queue].remove(item, dispatched)
        del self._items[job_id]
        if self._items:
            self.version += 1
        return item

    def pop(self, queue: str = DEFAULT_QUEUE, now: float = -NEVER) -> QueueItem | None:
        """Dispatches the head of one queue (what a worker of that queue would take next)."""
        lane = self._lanes.get(queue)
        if lane is None:
            return None
        if lane.boosts and lane.boosts[0][0] <= now and lane.promote(now):
            self.version += 1
        head = lane.pop_head()
        if head is not None:
            del self._items[head.job_id]
            if self._items:
                self.version += 1
        return head

    def promote(self, now: float) -> int:
        """Applies the SLA boost to every job whose boost time is `now` or earlier."""
        moved = 0
        for lane in self._lanes.values():
            if lane.boosts and lane.boosts[0][0] <= now:
                moved += lane.promote(now)
        if moved:
            self.version += 1
        return moved

    def next_boost(self) -> float:
        """The earliest time at which a queued job becomes urgent (inf when none will)."""
        return min((lane.next_boost() for lane in self._lanes.values()), default=NEVER)

    # Reads -----------------------------------------------------------------------------------------

    def peek(self, limit: int, queue: str | None = None, now: float = -NEVER) -> list[QueueItem]:
        """The next `limit` jobs in dispatch order, without taking them. Without `queue`, the queues' orders are
        merged: urgent jobs by due time, then by finish tag relative to each queue's virtual time."""
        self.promote(now)
        if queue is not None:
            lane = self._lanes.get(queue)
            return [item for _, item in islice(lane.order(), limit)] if lane else []
        orders = [lane.order() for name, lane in sorted(self._lanes.items()) if lane.size]
        if len(orders) == 1:
            return [item for _, item in islice(orders[0], limit)]
        return [item for _, item in islice(heapq.merge(*orders, key=lambda e: e[0]), limit)]

    def position(self, job_id: str, now: float = -NEVER) -> Placement | None:
        """A queued job's place in its own queue's dispatch order, in O(tenants x log(jobs))."""
        item = self._items.get(job_id)
        if item is None:
            return None
        self.promote(now)
        return self._lanes[item.queue].placement(item)

    def depth_by(self) -> tuple[dict[str, int], dict[str, int]]:
        by_queue: dict[str, int] = {}
        by_tenant: dict[str, int] = {}
        for name, lane in self._lanes.items():
            if lane.size:
                by_queue[name] = lane.size
                for tid, t in lane.tenants.items():
                    if t.count:
                        by_tenant[tid] = by_tenant.get(tid, 0) + t.count
        return by_queue, by_tenant

    # Persistence -----------------------------------------------------------------------------------

    def tags(self) -> dict[str, LaneTags]:
        """What a restart needs to give queued jobs the same tags: V and the non-trivial tenant chains."""
        out: dict[str, LaneTags] = {}
        for name, lane in self._lanes.items():
            tenants = {
                tid: TenantTags(t.base, t.charged, t.weight, t.count > 0)
                for tid, t in lane.tenants.items()
                if t.count > 0 or t.finish() > lane.virtual_time
            }
            out[name] = LaneTags(lane.virtual_time, tenants)
        return out

    def forget_idle_tenants(self) -> None:
        """Drops idle tenants whose last finish is behind V: max(V, finish) = V, as for a tenant never seen."""
        for lane in self._lanes.values():
            idle = [tid for tid, t in lane.tenants.items() if t.count == 0 and t.finish() <= lane.virtual_time]
            for tid in idle:
                lane.tenants[tid].stamp += 1
                del lane.tenants[tid]

    def restore(self, lanes: dict[str, LaneTags]) -> None:
        """Before the first push: take back persisted tags; backlogged tenants keep them for their jobs."""
        if self._items:
            raise RuntimeError("restore needs an empty queue")
        for name, tags in lanes.items():
            lane = self._lanes[name] = Lane(name, self._items, tags.virtual_time)
            for tid, saved in tags.tenants.items():
                t = lane.tenants[tid] = Tenant(tid, saved.weight, saved.base)
                t.charged = saved.charged
                t.held = saved.backlogged
                current = self.weight(tid)
                if current != saved.weight:
                    t.base, t.charged, t.weight, t.rate = t.finish(), 0, current, current * COST_SCALE

    def end_restore(self) -> None:
        """After the rebuild: a tenant restored as backlogged whose jobs have all gone since is idle now."""
        for lane in self._lanes.values():
            for t in lane.tenants.values():
                if t.held and t.count == 0:
                    lane.went_idle(t)
                t.held = False
