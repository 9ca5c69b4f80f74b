"""Daily capacity aggregates: the lifetimes of workers long gone folded into what each pool's workers cost per UTC
day, so the lifetimes can be pruned (by age and count) while idle cost over old periods stays the same. Pure.

A lifetime's capacity on a day is computed exactly as idle cost computes it (services/cost/idle.py): a whole worker
for its time on that day at the pool's prices. A rolled-up day counts whole in a window that covers it and pro rata
in one that covers part of it (services/cost/daily.py, pro_rata).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace

from libs.config import MeshConfig
from services.cost.daily import pro_rata
from services.cost.idle import WorkerInterval, capacity_micros, day_windows, overlap

CapacityCell = tuple[str, str]  # (pool, UTC day)


@dataclass(frozen=True)
class DailyCapacity:
    pool_id: str
    day: str
    capacity_micros: int = 0
    workers: int = 0  # lifetimes folded in that touch the day

    @property
    def cell(self) -> CapacityCell:
        return (self.pool_id, self.day)

    def __add__(self, other: DailyCapacity) -> DailyCapacity:
        assert self.cell == other.cell, "only the same pool and day add up"
        return replace(
            self, capacity_micros=self.capacity_micros + other.capacity_micros, workers=self.workers + other.workers
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "pool_id": self.pool_id,
                "day": self.day,
                "capacity_micros": self.capacity_micros,
                "workers": self.workers,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DailyCapacity:
        data = json.loads(raw)
        return cls(str(data["pool_id"]), str(data["day"]), int(data["capacity_micros"]), int(data.get("workers", 0)))


def fold_capacity(intervals: Iterable[WorkerInterval], config: MeshConfig) -> dict[CapacityCell, DailyCapacity]:
    """The per-day capacity of ended lifetimes (an open one, or one of a pool no longer configured, adds nothing:
    idle cost would not count it either)."""
    out: dict[CapacityCell, DailyCapacity] = {}
    for w in intervals:
        pool = config.pool(w.pool_id)
        if pool is None or w.end is None:
            continue
        for day, d_start, d_end in day_windows(w.start, w.end):
            seconds = overlap(w.start, w.end, d_start, d_end)
            if seconds <= 0:
                continue
            part = DailyCapacity(w.pool_id, day, capacity_micros(seconds, w.cpu_millis, w.memory_mb, pool.pricing), 1)
            out[part.cell] = out[part.cell] + part if part.cell in out else part
    return out


def capacity_in(cells: Iterable[DailyCapacity], start: float, end: float) -> dict[CapacityCell, int]:
    """(pool, day) -> the rolled-up capacity over [start, end) (pro rata on days the window only partly covers)."""
    return pro_rata(((c.pool_id, c.day, c.capacity_micros) for c in cells), start, end)
