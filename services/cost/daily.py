"""Daily cost aggregates: old cost records folded into one total per tenant, pool and UTC day. Pure.

Per-attempt records grow with every job ever run; once a job's record is gone (finished-job retention) and its
attempts are old enough, its records are folded into aggregates and deleted (services/cost/rollup.py), so the cost
prefix grows with tenants x pools x days instead. Everything a report, a budget or idle cost reads of records is a
sum, and the aggregate keeps those sums:

    cost, burst cost, attempts       of the attempts that ended on the day (a report counts them on that day)
    jobs                             whose last attempt ended on the day (each job counted once)
    allocated                        the base-price share of every attempt that ran on the day (idle cost)
    history                          the recommendations' inputs (services/cost/recommendations.History)

A report over whole UTC days is the same before and after a roll-up, to the micro. Rolled-up days have no finer
resolution: a day counts in the period that holds its start (UTC midnight), and a window that starts or ends inside
one takes the pro-rata part of its allocation for idle cost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Protocol, TypeVar

from libs.config import MeshConfig
from services.cost.idle import Allocation, daily_shares, day_windows, overlap, prorate
from services.cost.recommendations import History, Thresholds, history_of
from services.cost.records import CostRecord, base_micros, day_of

DAY_SECONDS = 86400.0

Cell = tuple[str, str, str]  # (tenant, pool, UTC day "YYYY-MM-DD")


@dataclass(frozen=True)
class DailyCost:
    tenant_id: str
    pool_id: str
    day: str
    cost_micros: int = 0
    burst_micros: int = 0
    attempts: int = 0
    jobs: int = 0
    allocated_micros: int = 0
    history: History = field(default_factory=History)

    @property
    def cell(self) -> Cell:
        return (self.tenant_id, self.pool_id, self.day)

    @property
    def start(self) -> float:
        """The day's first instant (UTC midnight), in epoch seconds."""
        return day_start(self.day)

    def __add__(self, other: DailyCost) -> DailyCost:
        assert self.cell == other.cell, "only the same tenant, pool and day add up"
        return replace(
            self,
            cost_micros=self.cost_micros + other.cost_micros,
            burst_micros=self.burst_micros + other.burst_micros,
            attempts=self.attempts + other.attempts,
            jobs=self.jobs + other.jobs,
            allocated_micros=self.allocated_micros + other.allocated_micros,
            history=self.history + other.history,
        )

    def to_json(self) -> bytes:
        data = {
            "tenant_id": self.tenant_id,
            "pool_id": self.pool_id,
            "day": self.day,
            "cost_micros": self.cost_micros,
            "burst_micros": self.burst_micros,
            "attempts": self.attempts,
            "jobs": self.jobs,
            "allocated_micros": self.allocated_micros,
            "history": self.history.to_dict(),
        }
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DailyCost:
        data = json.loads(raw)
        return cls(
            tenant_id=str(data["tenant_id"]),
            pool_id=str(data["pool_id"]),
            day=str(data["day"]),
            cost_micros=int(data.get("cost_micros", 0)),
            burst_micros=int(data.get("burst_micros", 0)),
            attempts=int(data.get("attempts", 0)),
            jobs=int(data.get("jobs", 0)),
            allocated_micros=int(data.get("allocated_micros", 0)),
            history=History.from_dict(data.get("history", {})),
        )


@lru_cache(maxsize=8192)
def day_start(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


def daily_cell(key: str) -> Cell | None:
    """The cell of an aggregate's key (`.../cost/daily/<tenant>/<day>/<pool>`; see CostKeys.daily)."""
    parts = key.rsplit("/", 3)
    return (parts[-3], parts[-1], parts[-2]) if len(parts) == 4 else None


def job_of(record_key: str) -> str:
    """`.../cost/records/<tenant>/<job>/<attempt>` -> `<tenant>/<job>`."""
    return "/".join(record_key.rsplit("/", 3)[-3:-1])


def due_jobs(
    records: Mapping[str, CostRecord], cutoff: float, held: Iterable[str] = ()
) -> list[list[tuple[str, CostRecord]]]:
    """The records to roll up, a job's together (oldest job first): every attempt of the job ended before `cutoff`
    and the job is not `held` ("tenant/job": still stored, or with an attempt whose record is not written)."""
    groups: dict[str, list[tuple[str, CostRecord]]] = {}
    for key, record in records.items():
        groups.setdefault(job_of(key), []).append((key, record))
    skip = set(held)
    due = [g for job, g in groups.items() if job not in skip and all(r.end < cutoff for _, r in g)]
    due.sort(key=lambda g: (max(r.end for _, r in g), g[0][0]))
    return due


def fold(jobs: Sequence[Sequence[tuple[str, CostRecord]]], config: MeshConfig, th: Thresholds) -> dict[Cell, DailyCost]:
    """The aggregates of the given jobs' records alone (to add to what is stored)."""
    out: dict[Cell, DailyCost] = {}
    ended: dict[Cell, list[CostRecord]] = {}

    def add(part: DailyCost) -> None:
        out[part.cell] = out[part.cell] + part if part.cell in out else part

    for group in jobs:
        last = max((r for _, r in group), key=lambda r: (r.end, r.attempt))
        for _, r in group:
            cell = (r.tenant_id, r.pool_id, day_of(r.end))
            ended.setdefault(cell, []).append(r)
            add(
                DailyCost(
                    *cell,
                    cost_micros=r.cost_micros,
                    burst_micros=r.cost_micros if r.burst else 0,
                    attempts=1,
                    jobs=int(r is last),
                )
            )
            for day, share in daily_shares(Allocation(r.pool_id, r.start, r.end, base_micros(r, config))):
                add(DailyCost(r.tenant_id, r.pool_id, day, allocated_micros=share))
    for cell, records in ended.items():
        out[cell] = replace(out[cell], history=history_of(records, config, th))
    return out


class _Sum(Protocol):
    def __add__(self: S, other: S) -> S: ...


S = TypeVar("S", bound=_Sum)
K = TypeVar("K")


def merged(stored: Mapping[K, S], added: Mapping[K, S]) -> dict[K, S]:
    """The new value of every cell `added` touches (aggregates add up cell by cell)."""
    return {cell: stored[cell] + part if cell in stored else part for cell, part in added.items()}


@dataclass(frozen=True)
class Limits:
    """What one roll-up transaction may hold: etcd allows 128 compares and 128 operations per transaction, and it
    compares every record (still there), every job (gone) and every aggregate (unchanged)."""

    records: int = 40
    jobs: int = 40
    cells: int = 40


def batches(
    jobs: Sequence[list[tuple[str, CostRecord]]], limits: Limits = Limits()
) -> list[list[list[tuple[str, CostRecord]]]]:
    """Whole jobs per batch, within the limits (a job bigger than a batch alone goes alone)."""
    out: list[list[list[tuple[str, CostRecord]]]] = []
    current: list[list[tuple[str, CostRecord]]] = []
    records, cells = 0, set[Cell]()
    for group in jobs:
        touched = {(r.tenant_id, r.pool_id, d) for _, r in group for d in _days(r)}
        if current and (
            records + len(group) > limits.records
            or len(current) + 1 > limits.jobs
            or len(cells | touched) > limits.cells
        ):
            out.append(current)
            current, records, cells = [], 0, set()
        current.append(group)
        records += len(group)
        cells |= touched
    if current:
        out.append(current)
    return out


def _days(r: CostRecord) -> set[str]:
    return {day_of(r.end)} | {day for day, _, _ in day_windows(r.start, r.end)}


def in_period(cells: Iterable[DailyCost], start: float, end: float) -> list[DailyCost]:
    """The aggregates a report over [start, end) counts: those whose day starts in it."""
    return [c for c in cells if start <= c.start < end]


def allocated_in(cells: Iterable[DailyCost], start: float, end: float) -> dict[tuple[str, str], int]:
    """(pool, day) -> allocation of the aggregates over [start, end) (see pro_rata)."""
    return pro_rata(((c.pool_id, c.day, c.allocated_micros) for c in cells), start, end)


def pro_rata(amounts: Iterable[tuple[str, str, int]], start: float, end: float) -> dict[tuple[str, str], int]:
    """(pool, day) -> the part of each (pool, day, micros) that falls in [start, end): whole for a day the window
    covers, pro rata for a day it only partly covers (the amount taken as even over its day)."""
    out: dict[tuple[str, str], int] = {}
    for pool_id, day, micros in amounts:
        first = day_start(day)
        seconds = overlap(start, end, first, first + DAY_SECONDS)
        if seconds <= 0 or not micros:
            continue
        part = micros if seconds >= DAY_SECONDS else prorate(micros, seconds, DAY_SECONDS)
        out[(pool_id, day)] = out.get((pool_id, day), 0) + part
    return out
