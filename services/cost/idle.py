"""Idle cost: what the pools' workers cost minus what the jobs on them were charged at base price. Pure.

The identity, exact in integer micros for every pool p and cell (p, UTC day) of a window, capped at `now`:

    capacity(p, cell) = allocated(p, cell) + idle(p, cell)

    capacity(p, cell)  = sum over workers w of p of
                         round((worker_hour + cores(w) x core_hour + GiB(w) x gb_hour) x hours(life(w) ∩ cell))
    allocated(p, cell) = sum over attempts a that ran on p of
                         round(base(a) x |run(a) ∩ cell| / |run(a)|)

where base(a) is what the attempt is charged without the burst premium (the premium is the tenant's surcharge, not
a use of the pool). Idle is negative only when jobs used more than their worker's nominal capacity.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from libs.config import MeshConfig, Pricing
from services.cost.pricing import AttemptUsage, price_attempt


@dataclass(frozen=True)
class WorkerInterval:
    """A worker's lifetime: registered at `start`, gone at `end` (None while it lives)."""

    worker_id: str
    pool_id: str
    start: float
    end: float | None
    cpu_millis: int
    memory_mb: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerInterval:
        data = json.loads(raw)
        return cls(
            worker_id=str(data["worker_id"]),
            pool_id=str(data["pool_id"]),
            start=float(data["start"]),
            end=None if data.get("end") is None else float(data["end"]),
            cpu_millis=int(data["cpu_millis"]),
            memory_mb=int(data["memory_mb"]),
        )


class WorkerLifetimes:
    """Worker lifetimes as seen through the workers prefix; every method returns whether an interval changed."""

    def __init__(self) -> None:
        self.intervals: dict[str, WorkerInterval] = {}

    def restore(self, interval: WorkerInterval) -> None:
        self.intervals[interval.worker_id] = interval

    def registered(self, worker_id: str, pool_id: str, start: float, cpu_millis: int, memory_mb: int) -> bool:
        known = self.intervals.get(worker_id)
        if known is None:
            self.intervals[worker_id] = WorkerInterval(worker_id, pool_id, start, None, cpu_millis, memory_mb)
            return True
        if known.end is not None:
            # Back under the same id (its lease lapsed, the process lived on): it existed, and cost, in between.
            self.intervals[worker_id] = replace(known, end=None)
            return True
        return False  # a re-registration or an update of a live worker keeps its first start

    def gone(self, worker_id: str, at: float) -> bool:
        known = self.intervals.get(worker_id)
        if known is None or known.end is not None:
            return False
        self.intervals[worker_id] = replace(known, end=max(at, known.start))
        return True

    def close_missing(self, alive: set[str], at: float) -> list[str]:
        """Ends the open intervals of workers that are no longer registered (they left while we were not looking)."""
        closed = [w for w, i in self.intervals.items() if i.end is None and w not in alive]
        for worker_id in closed:
            self.gone(worker_id, at)
        return closed


@dataclass(frozen=True)
class Allocation:
    """Worker time an attempt used: [start, end) on a pool, worth `base_micros` over its whole run."""

    pool_id: str
    start: float
    end: float
    base_micros: int


@dataclass(frozen=True)
class IdleCell:
    capacity_micros: int = 0
    allocated_micros: int = 0

    @property
    def idle_micros(self) -> int:
        return self.capacity_micros - self.allocated_micros

    @property
    def idle_share(self) -> float:
        return self.idle_micros / self.capacity_micros if self.capacity_micros > 0 else 0.0

    def __add__(self, other: IdleCell) -> IdleCell:
        return IdleCell(self.capacity_micros + other.capacity_micros, self.allocated_micros + other.allocated_micros)


def overlap(start: float, end: float, w_start: float, w_end: float) -> float:
    return max(0.0, min(end, w_end) - max(start, w_start))


def prorate(micros: int, part: float, whole: float) -> int:
    """micros x part / whole, to the nearest micro (half to even)."""
    if whole <= 0:
        return 0  # a zero-length run costs nothing to share
    share = Decimal(micros) * Decimal(str(part)) / Decimal(str(whole))
    return int(share.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def capacity_micros(seconds: float, cpu_millis: int, memory_mb: int, pricing: Pricing) -> int:
    """A whole worker for `seconds`: its worker-hour plus its full CPU and memory at the pool's prices."""
    return price_attempt(AttemptUsage(seconds, cpu_millis, memory_mb), pricing, 1.0)


def day_windows(start: float, end: float) -> list[tuple[str, float, float]]:
    """[start, end) cut at UTC midnights: (day, from, to)."""
    out: list[tuple[str, float, float]] = []
    day = datetime.fromtimestamp(start, tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    while day.timestamp() < end:
        nxt = day + timedelta(days=1)
        out.append((day.strftime("%Y-%m-%d"), max(start, day.timestamp()), min(end, nxt.timestamp())))
        day = nxt
    return out


def daily_shares(a: Allocation) -> list[tuple[str, int]]:
    """(UTC day, the part of the attempt's base price that falls on that day), as idle_cells splits it."""
    if a.end <= a.start:
        return []
    shares = []
    for day, d_start, d_end in day_windows(a.start, a.end):
        share = prorate(a.base_micros, overlap(a.start, a.end, d_start, d_end), a.end - a.start)
        if share:
            shares.append((day, share))
    return shares


def idle_cells(
    config: MeshConfig,
    intervals: Iterable[WorkerInterval],
    allocations: Iterable[Allocation],
    start: float,
    end: float,
    now: float,
    allocated: Mapping[tuple[str, str], int] | None = None,
    capacity: Mapping[tuple[str, str], int] | None = None,
) -> dict[tuple[str, str], IdleCell]:
    """Capacity and allocation per (pool, UTC day) over [start, min(end, now)); see the module docstring.

    `allocated` holds allocations already split by (pool, UTC day) (see daily_shares), `capacity` the capacity of
    lifetimes rolled up by day (services/cost/capacity.py); every day of them the window touches counts whole, so a
    window that starts or ends inside a day must pass those attempts in `allocations` (or pro-rate them)."""
    end = min(end, now)
    cells: dict[tuple[str, str], IdleCell] = {}
    if start >= end:
        return cells

    def add(key: tuple[str, str], cell: IdleCell) -> None:
        cells[key] = cells.get(key, IdleCell()) + cell

    # Each worker and each attempt is cut at the UTC midnights of its own overlap with the window: the work is
    # linear in the data that exists, whatever the window's length.
    for w in intervals:
        pool = config.pool(w.pool_id)
        w_end = now if w.end is None else w.end
        if pool is None or w.start >= end or w_end <= start:
            continue
        for day, d_start, d_end in day_windows(max(start, w.start), min(end, w_end)):
            seconds = overlap(w.start, w_end, d_start, d_end)
            if seconds > 0:
                add((w.pool_id, day), IdleCell(capacity_micros(seconds, w.cpu_millis, w.memory_mb, pool.pricing), 0))
    for a in allocations:
        if a.start >= end or a.end <= start:
            continue
        for day, d_start, d_end in day_windows(max(start, a.start), min(end, a.end)):
            share = prorate(a.base_micros, overlap(a.start, a.end, d_start, d_end), a.end - a.start)
            if share:
                add((a.pool_id, day), IdleCell(0, share))
    first, last = _day(start), _day(end - 1e-6)
    for (pool_id, day), micros in (allocated or {}).items():
        if first <= day <= last and micros:
            add((pool_id, day), IdleCell(0, micros))
    for (pool_id, day), micros in (capacity or {}).items():
        if first <= day <= last and micros and config.pool(pool_id) is not None:
            add((pool_id, day), IdleCell(micros, 0))
    return cells


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).date().isoformat()


def by_pool(cells: dict[tuple[str, str], IdleCell]) -> dict[str, IdleCell]:
    out: dict[str, IdleCell] = {}
    for (pool_id, _), cell in cells.items():
        out[pool_id] = out.get(pool_id, IdleCell()) + cell
    return out


def by_day(cells: dict[tuple[str, str], IdleCell]) -> dict[str, IdleCell]:
    out: dict[str, IdleCell] = {}
    for (_, day), cell in cells.items():
        out[day] = out.get(day, IdleCell()) + cell
    return out


def total(cells: dict[tuple[str, str], IdleCell]) -> IdleCell:
    return sum(cells.values(), IdleCell())
