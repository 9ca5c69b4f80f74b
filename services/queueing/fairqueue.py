"""Weighted fair queue by virtual finish time across tenants; pure and deterministic."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class QueueItem:
    job_id: str
    tenant_id: str
    queue: str
    cost: float  # virtual-time cost: the job's dominant resource share, see `job_cost`
    priority: int = 0  # higher first within a tenant
    seq: int = 0  # submission order


def job_cost(cpu_millis: int, memory_mb: int) -> float:
    """A job's size in virtual time: its dominant resource, in cores or GiB (a 1-core/1-GiB job costs 1)."""
    return max(cpu_millis / 1000.0, memory_mb / 1024.0, 1e-3)


@dataclass
class _Tenant:
    tenant_id: str
    weight: float
    last_finish: float = 0.0
    heap: list[tuple[int, int, str]] = field(default_factory=list)  # (-priority, seq, job_id)


class WeightedFairQueue:
    """Start tag = max(V, tenant's last finish); finish = start + cost / weight; lowest finish goes first.

    An idle tenant banks no credit: its start tag is never below the current virtual time V.
    Removing any job (dispatch or cancel) charges the tenant only when the job was dispatched.
    """

    def __init__(self, weights: dict[str, float] | None = None, default_weight: float = 1.0):
        self.weights = dict(weights or {})
        self.default_weight = default_weight
        self.virtual_time = 0.0
        self._tenants: dict[str, _Tenant] = {}
        self._items: dict[str, QueueItem] = {}
        self._seq = itertools.count()
        self.version = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._items

    def get(self, job_id: str) -> QueueItem | None:
        return self._items.get(job_id)

    def set_weight(self, tenant_id: str, weight: float) -> None:
        self.weights[tenant_id] = weight
        if tenant_id in self._tenants:
            self._tenants[tenant_id].weight = weight

    def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            tenant = _Tenant(tenant_id, self.weights.get(tenant_id, self.default_weight))
            self._tenants[tenant_id] = tenant
        return tenant

    def push(self, item: QueueItem) -> bool:
        if item.job_id in self._items:
            return False
        seq = item.seq if item.seq else next(self._seq)
        stored = QueueItem(item.job_id, item.tenant_id, item.queue, item.cost, item.priority, seq)
        self._items[item.job_id] = stored
        heapq.heappush(self._tenant(item.tenant_id).heap, (-item.priority, seq, item.job_id))
        self.version += 1
        return True

    def _clean_head(self, tenant: _Tenant) -> str | None:
        while tenant.heap and tenant.heap[0][2] not in self._items:
            heapq.heappop(tenant.heap)
        return tenant.heap[0][2] if tenant.heap else None

    def _finish(self, tenant: _Tenant, cost: float, last_finish: float | None = None) -> tuple[float, float]:
        start = max(self.virtual_time, tenant.last_finish if last_finish is None else last_finish)
        return start, start + cost / tenant.weight

    def remove(self, job_id: str, *, dispatched: bool) -> QueueItem | None:
        """Take a job out; when it was dispatched, advance its tenant's finish tag and virtual time."""
        item = self._items.pop(job_id, None)
        if item is None:
            return None
        tenant = self._tenants[item.tenant_id]
        if dispatched:
            start, finish = self._finish(tenant, item.cost)
            tenant.last_finish = finish
            self.virtual_time = max(self.virtual_time, start)
        self._clean_head(tenant)
        self.version += 1
        return item

    def peek(self, limit: int, queue: str | None = None) -> list[QueueItem]:
        """The next `limit` jobs in fair order, without taking them (simulates dispatch on copies)."""
        cursors: dict[str, list[tuple[int, int, str]]] = {}
        frontier: list[tuple[float, int, str]] = []
        finish_of: dict[str, float] = {}
        for tenant in self._tenants.values():
            if self._clean_head(tenant) is None:
                continue
            ordered = heapq.nsmallest(limit, tenant.heap) if limit < len(tenant.heap) else sorted(tenant.heap)
            ordered = [e for e in ordered if e[2] in self._items]
            if queue is not None:
                ordered = [e for e in ordered if self._items[e[2]].queue == queue]
            if not ordered:
                continue
            cursors[tenant.tenant_id] = ordered
            _, finish = self._finish(tenant, self._items[ordered[0][2]].cost)
            finish_of[tenant.tenant_id] = finish
            heapq.heappush(frontier, (finish, ordered[0][1], tenant.tenant_id))
        out: list[QueueItem] = []
        while frontier and len(out) < limit:
            finish, _, tenant_id = heapq.heappop(frontier)
            entries = cursors[tenant_id]
            out.append(self._items[entries.pop(0)[2]])
            if entries:
                tenant = self._tenants[tenant_id]
                nxt = self._items[entries[0][2]]
                _, next_finish = self._finish(tenant, nxt.cost, last_finish=finish)
                heapq.heappush(frontier, (next_finish, entries[0][1], tenant_id))
        return out

    def depth_by(self) -> tuple[dict[str, int], dict[str, int]]:
        by_queue: dict[str, int] = {}
        by_tenant: dict[str, int] = {}
        for item in self._items.values():
            by_queue[item.queue] = by_queue.get(item.queue, 0) + 1
            by_tenant[item.tenant_id] = by_tenant.get(item.tenant_id, 0) + 1
        return by_queue, by_tenant
