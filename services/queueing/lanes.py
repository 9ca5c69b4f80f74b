"""One queue's fair order: each tenant's service chain, an urgent class and a normal class; pure.

Every tag of a tenant is `base + units / rate` (rate = weight x COST_SCALE), where `units` is an exact integer:
what it was charged since it became backlogged plus the cost of the jobs that would leave before. Peek, position
and the real dispatch compute a job's tag with the same expression, so predictions are exact.

* Urgent class (jobs whose SLA boost time has come) before the normal class, always.
* Within each class, tenants take turns by finish tag (then due time for urgent jobs, then priority,
  submission and job id): a tenant's urgent jobs leave earliest-due first, its normal jobs by priority then
  submission. Both classes draw on the same chain, so a boosted dispatch costs its tenant the same share.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterator
from itertools import accumulate

from services.queueing.items import COST_SCALE, NEVER, UNITS_BY_COST, Key, Placement, QueueItem, cost_units

UrgentEntry = tuple[float, Key, int]  # (due, key, units)
SortKey = tuple[object, ...]  # comparable across lanes: (class, tag relative to V, [due,] key)


def key_of(item: QueueItem) -> Key:
    return (-item.priority, item.seq, item.job_id)


class Tenant:
    """One tenant in one lane: its queued jobs in order (normal and urgent), and its service chain."""

    __slots__ = (
        "base",
        "charged",
        "count",
        "cum",
        "head",
        "held",
        "keys",
        "rate",
        "stamp",
        "tenant_id",
        "units",
        "urgent",
        "urgent_units",
        "ustamp",
        "weight",
    )

    def __init__(self, tenant_id: str, weight: float, base: float):
        self.tenant_id = tenant_id
        self.weight = weight
        self.rate = weight * COST_SCALE  # cost units per unit of virtual time
        self.base = base
        self.charged = 0
        # keys[head:] are the queued normal jobs in order; keys[:head] were taken from the head and are dropped
        # in bulk (amortised O(1) per dispatch instead of an O(n) shift each time).
        self.keys: list[Key] = []
        self.units: list[int] = []
        self.head = 0
        self.cum: list[int] | None = [0]  # cum[i] = sum(units[:i]); None when it must be rebuilt
        self.urgent: list[UrgentEntry] = []  # sorted: earliest due first
        self.urgent_units = 0
        self.count = 0  # queued jobs, urgent ones included
        self.stamp = 0  # bumped whenever the normal head's tag changes; frontier entries carry it
        self.ustamp = 0  # the same for the urgent head
        self.held = False  # tags restored from a snapshot, kept when the first job arrives

    def finish(self) -> float:
        return self.base + self.charged / self.rate

    def prefix(self) -> list[int]:
        if self.cum is None:
            self.cum = list(accumulate(self.units, initial=0))
        return self.cum

    def drop_taken(self) -> None:
        del self.keys[: self.head]
        del self.units[: self.head]
        self.head = 0
        self.cum = None


_Entry = tuple[float, Key, int, Tenant]  # normal class: (finish tag, head key, stamp, tenant)
_UEntry = tuple[float, float, Key, int, Tenant]  # urgent class: (finish tag, due, head key, stamp, tenant)


def ahead_in_normal_class(u: Tenant, target: tuple[float, Key]) -> int:
    """How many of u's normal jobs come before `target` (a finish tag and key).

    u's tags only grow along its order, so this is a search: a C-speed bisect on the exact integer prefix sums
    finds the spot, then the tags themselves (computed exactly as `Lane.order` computes them) settle the last
    step, so float rounding and ties cannot make the count differ from the real order.
    """
    h, n = u.head, len(u.keys)
    if h >= n:
        return 0
    cum = u.prefix()
    offset = u.charged + u.urgent_units - cum[h]
    base, rate, keys = u.base, u.rate, u.keys
    finish, key = target

    def before(j: int) -> bool:
        tag = base + (offset + cum[j + 1]) / rate
        return tag < finish or (tag == finish and keys[j] < key)

    j = bisect_left(cum, (finish - base) * rate - offset, h + 1, n + 1) - 1
    j = min(max(j, h), n)
    while j > h and not before(j - 1):
        j -= 1
    while j < n and before(j):
        j += 1
    return j - h


def ahead_in_urgent_class(u: Tenant, target: tuple[float, float, Key]) -> int:
    """How many of u's urgent jobs come before `target` (tag, due, key); urgent jobs are few, so a walk."""
    acc = u.charged
    ahead = 0
    for due, key, units in u.urgent:
        acc += units
        if (u.base + acc / u.rate, due, key) >= target:
            break
        ahead += 1
    return ahead


class Lane:
    """The fair queue of one queue name."""

    def __init__(self, name: str, items: dict[str, QueueItem], virtual_time: float = 0.0):
        self.name = name
        self.items = items
        self.virtual_time = virtual_time
        self.tenants: dict[str, Tenant] = {}
        self.frontier: list[_Entry] = []  # heap of tenants' normal-head tags; stale entries skipped by stamp
        self.urgent_frontier: list[_UEntry] = []  # the same for urgent heads
        self.urgent_ids: set[str] = set()
        self.boosts: list[tuple[float, str]] = []  # heap (urgent_at, job_id) of jobs not yet urgent
        self.size = 0
        self.tag_changes = 0

    # Tags ------------------------------------------------------------------------------------------

    def _restamp(self, t: Tenant) -> None:
        t.stamp += 1
        if t.head < len(t.keys):
            entry = (t.base + (t.charged + t.units[t.head]) / t.rate, t.keys[t.head], t.stamp, t)
            heapq.heappush(self.frontier, entry)
            if len(self.frontier) > 2 * len(self.tenants) + 64:
                self.frontier = [e for e in self.frontier if e[2] == e[3].stamp]
                heapq.heapify(self.frontier)

    def _restamp_urgent(self, t: Tenant) -> None:
        t.ustamp += 1
        if t.urgent:
            due, key, units = t.urgent[0]
            heapq.heappush(self.urgent_frontier, (t.base + (t.charged + units) / t.rate, due, key, t.ustamp, t))
            if len(self.urgent_frontier) > 2 * len(self.tenants) + 64:
                self.urgent_frontier = [e for e in self.urgent_frontier if e[3] == e[4].ustamp]
                heapq.heapify(self.urgent_frontier)

    def _charge(self, t: Tenant, units: int) -> None:
        start = t.base + t.charged / t.rate
        t.charged += units
        if start > self.virtual_time:
            self.virtual_time = start
        self.tag_changes += 1

    def went_idle(self, t: Tenant) -> None:
        t.base = t.finish()
        t.charged = 0
        t.keys.clear()
        t.units.clear()
        t.head = 0
        t.cum = [0]
        t.stamp += 1
        t.ustamp += 1
        self.tag_changes += 1

    def tenant(self, tenant_id: str, weight: float) -> Tenant:
        t = self.tenants.get(tenant_id)
        if t is None:
            t = self.tenants[tenant_id] = Tenant(tenant_id, weight, self.virtual_time)
            self.tag_changes += 1
        return t

    def set_weight(self, tenant_id: str, weight: float) -> None:
        t = self.tenants.get(tenant_id)
        if t is None or t.weight == weight:
            return
        t.base = t.finish()  # what was charged stays charged at the old weight
        t.charged = 0
        t.weight = weight
        t.rate = weight * COST_SCALE
        self.tag_changes += 1
        self._restamp(t)
        self._restamp_urgent(t)

    # Changes ---------------------------------------------------------------------------------------

    def push(self, item: QueueItem, weight: float) -> None:
        t = self.tenants.get(item.tenant_id) or self.tenant(item.tenant_id, weight)
        if t.count == 0 and not t.held:
            last = t.base + t.charged / t.rate  # becoming backlogged: the only moment V enters its tags
            t.base = last if last > self.virtual_time else self.virtual_time
            t.charged = 0
            self.tag_changes += 1
        units = UNITS_BY_COST.get(item.cost) or cost_units(item.cost)
        key = (-item.priority, item.seq, item.job_id)
        keys = t.keys
        n = len(keys)
        if t.head == n or key > keys[-1]:
            keys.append(key)
            t.units.append(units)
            cum = t.cum
            if cum is not None:
                cum.append(cum[-1] + units)
            at_head = t.head == n
        else:
            i = bisect_left(keys, key, t.head)
            keys.insert(i, key)
            t.units.insert(i, units)
            t.cum = None
            at_head = i == t.head
        t.count += 1
        self.size += 1
        if at_head:
            self._restamp(t)
        if item.urgent_at != NEVER:
            heapq.heappush(self.boosts, (item.urgent_at, item.job_id))
            if len(self.boosts) > 2 * self.size + 64:
                self._compact_boosts()

    def _take(self, t: Tenant, key: Key) -> int:
        """Takes a normal job out of its tenant's order; returns its units."""
        h = t.head
        keys = t.keys
        if keys[h] == key:
            units = t.units[h]
            t.head = h + 1
            if t.head > 64 and 2 * t.head > len(keys):
                t.drop_taken()
            return units
        i = bisect_left(keys, key, h)
        units = t.units[i]
        del keys[i]
        del t.units[i]
        t.cum = None
        return units

    def remove(self, item: QueueItem, dispatched: bool) -> None:
        t = self.tenants[item.tenant_id]
        key = (-item.priority, item.seq, item.job_id)
        if item.job_id in self.urgent_ids:
            self.urgent_ids.discard(item.job_id)
            i = bisect_left(t.urgent, (item.due, key))
            units = t.urgent.pop(i)[2]
            t.urgent_units -= units
            head_changed, urgent_head_changed = False, i == 0
        else:
            head_changed, urgent_head_changed = t.keys[t.head] == key, False
            units = self._take(t, key)
        if dispatched:
            self._charge(t, units)
        t.count -= 1
        self.size -= 1
        if t.count == 0:
            self.went_idle(t)
            return
        if dispatched or head_changed:
            self._restamp(t)
        if dispatched or urgent_head_changed:
            self._restamp_urgent(t)

    def pop_head(self) -> QueueItem | None:
        """Dispatches the head: the urgent class first, else the lowest normal finish tag."""
        urgent = self.urgent_frontier
        while urgent and urgent[0][3] != urgent[0][4].ustamp:
            heapq.heappop(urgent)
        if urgent:  # rare: only jobs whose boost time has come
            item = self.items[urgent[0][2][2]]
            self.remove(item, True)
            return item
        frontier = self.frontier
        while frontier:
            _, key, stamp, t = heapq.heappop(frontier)
            if stamp == t.stamp:
                break
        else:
            return None
        h = t.head  # the popped entry is this tenant's normal head: keys[h] == key
        units = t.units[h]
        t.head = h + 1
        if h > 64 and 2 * h > len(t.keys):
            t.drop_taken()
        self._charge(t, units)
        t.count -= 1
        self.size -= 1
        if t.count == 0:
            self.went_idle(t)
        else:
            self._restamp(t)
            if t.urgent:
                self._restamp_urgent(t)
        return self.items[key[2]]

    def promote(self, now: float) -> int:
        """Moves jobs whose boost time has come into the urgent class."""
        boosts = self.boosts
        moved = 0
        while boosts and boosts[0][0] <= now:
            _, job_id = heapq.heappop(boosts)
            item = self.items.get(job_id)
            if item is None or item.queue != self.name or job_id in self.urgent_ids:
                continue
            t = self.tenants[item.tenant_id]
            key = key_of(item)
            head_changed = t.keys[t.head] == key
            units = self._take(t, key)
            entry = (item.due, key, units)
            insort(t.urgent, entry)
            self.urgent_ids.add(job_id)
            t.urgent_units += units
            if head_changed:
                self._restamp(t)
            if t.urgent[0] is entry:
                self._restamp_urgent(t)
            moved += 1
        return moved

    def _compact_boosts(self) -> None:
        live = self.items
        self.boosts = [(at, j) for at, j in self.boosts if j in live and j not in self.urgent_ids]
        heapq.heapify(self.boosts)

    def next_boost(self) -> float:
        while self.boosts and (self.boosts[0][1] not in self.items or self.boosts[0][1] in self.urgent_ids):
            heapq.heappop(self.boosts)
        return self.boosts[0][0] if self.boosts else NEVER

    # Reads -----------------------------------------------------------------------------------------

    def order(self) -> Iterator[tuple[SortKey, QueueItem]]:
        """Every queued job in the order this lane would dispatch them, with a sort key comparable across
        lanes: the class, then the finish tag relative to the lane's virtual time, then the tie-breaks."""
        items, v = self.items, self.virtual_time
        urgent = [e for e in self.urgent_frontier if e[3] == e[4].ustamp]
        heapq.heapify(urgent)
        taken: dict[Tenant, tuple[int, int]] = {}  # tenant -> (urgent jobs taken, units charged meanwhile)
        while urgent:
            tag, due, key, _, t = heapq.heappop(urgent)
            i, acc = taken.get(t) or (0, t.charged)
            yield (0, tag - v, due, key), items[key[2]]
            acc += t.urgent[i][2]
            taken[t] = (i + 1, acc)
            if i + 1 < len(t.urgent):
                due, key, units = t.urgent[i + 1]
                heapq.heappush(urgent, (t.base + (acc + units) / t.rate, due, key, -1, t))
        frontier = self.frontier[:]
        expected: dict[Tenant, int] = {}
        for t in taken:
            # Its urgent jobs left first and were charged: its normal tags start after their cost.
            if t.head < len(t.keys):
                expected[t] = -1
                tag = t.base + (t.charged + t.urgent_units + t.units[t.head]) / t.rate
                heapq.heappush(frontier, (tag, t.keys[t.head], -1, t))
        cursor: dict[Tenant, tuple[int, int]] = {}
        while frontier:
            finish, key, stamp, t = heapq.heappop(frontier)
            if stamp != expected.get(t, t.stamp):
                continue
            i, acc = cursor.get(t) or (t.head, t.charged + t.urgent_units)
            yield (1, finish - v, key), items[key[2]]
            acc += t.units[i]
            i += 1
            cursor[t] = (i, acc)
            if i < len(t.keys):
                heapq.heappush(frontier, (t.base + (acc + t.units[i]) / t.rate, t.keys[i], stamp, t))

    def placement(self, item: QueueItem) -> Placement:
        """Position in this lane's order in O(tenants x log(jobs)) (+ the urgent jobs, which are few)."""
        key = key_of(item)
        t = self.tenants[item.tenant_id]
        urgent_total = len(self.urgent_ids)
        if item.job_id in self.urgent_ids:
            i = bisect_left(t.urgent, (item.due, key))
            acc = t.charged + sum(units for _, _, units in t.urgent[: i + 1])
            target = (t.base + acc / t.rate, item.due, key)
            others = sum(ahead_in_urgent_class(u, target) for u in self.tenants.values() if u is not t and u.urgent)
            return Placement(i + others + 1, i, others, urgent=True)
        i = bisect_left(t.keys, key, t.head)
        cum = t.prefix()
        finish = t.base + (t.charged + t.urgent_units + cum[i + 1] - cum[t.head]) / t.rate
        ahead = sum(ahead_in_normal_class(u, (finish, key)) for u in self.tenants.values() if u is not t)
        own_urgent = len(t.urgent)
        return Placement(
            urgent_total + (i - t.head) + ahead + 1,
            own_urgent + (i - t.head),
            urgent_total - own_urgent + ahead,
            urgent=False,
        )
