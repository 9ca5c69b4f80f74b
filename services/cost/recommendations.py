"""Cost-optimization recommendations; every estimated saving is repriced from the records it is about. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from libs.config import MeshConfig, PoolConfig
from services.cost.idle import IdleCell, prorate
from services.cost.pricing import format_micros, price_attempt
from services.cost.records import CostRecord, pricing_of


@dataclass(frozen=True)
class Recommendation:
    kind: str
    description: str
    savings_micros: int


@dataclass(frozen=True)
class Thresholds:
    oversize_factor: int = 4  # a request at least 4x what was used is oversized
    headroom_factor: int = 2  # rightsize to twice what was used
    min_cpu_millis: int = 10
    steady_concurrency: float = 0.5  # average attempts running at once that make a load steady
    idle_share: float = 0.5  # a static pool idle for more than this share of its cost should shrink
    target_utilization: float = 0.8  # ... to run at most this busy
    repeated_burst: int = 3  # this many burst attempts make burst use a habit


def reprice(
    record: CostRecord,
    config: MeshConfig,
    *,
    pool_id: str | None = None,
    cpu_millis: int | None = None,
    memory_mb: int | None = None,
    burst: bool | None = None,
) -> int:
    """What the record would have cost with one thing changed (same run time and use)."""
    usage = replace(
        record.usage,
        requested_cpu_millis=record.requested_cpu_millis if cpu_millis is None else cpu_millis,
        requested_memory_mb=record.requested_memory_mb if memory_mb is None else memory_mb,
        burst=record.burst if burst is None else burst,
    )
    return price_attempt(usage, pricing_of(config, pool_id or record.pool_id), config.burst_premium)


@dataclass(frozen=True)
class Saving:
    """How many attempts a recommendation is about and what changing them would have saved."""

    count: int = 0
    micros: int = 0

    def __add__(self, other: Saving) -> Saving:
        return Saving(self.count + other.count, self.micros + other.micros)


@dataclass(frozen=True)
class Move:
    """Attempts on pools of one kind: their run time, and what the cheaper ones would save on the other kind."""

    attempts: int = 0
    run_seconds: float = 0.0
    savings_micros: int = 0
    destinations: tuple[str, ...] = ()

    def __add__(self, other: Move) -> Move:
        return Move(
            self.attempts + other.attempts,
            self.run_seconds + other.run_seconds,
            self.savings_micros + other.savings_micros,
            tuple(sorted(set(self.destinations) | set(other.destinations))),
        )


# A move from pools of the first kind to the second is advised for steady load (True) or intermittent load.
MOVES = (("dynamic", "static", True), ("static", "dynamic", False))


@dataclass(frozen=True)
class History:
    """What the recommendations need of a tenant's attempts, as sums: records that were rolled up into daily
    aggregates (services/cost/rollup.py) keep counting, and adding histories is adding their records."""

    memory: Saving = Saving()
    cpu: Saving = Saving()
    moves: dict[str, Move] = field(default_factory=dict)  # source pool kind -> its attempts
    burst: Saving = Saving()
    burst_peak: tuple[int, int] = (0, 0)  # CPU millis and MB held at once by burst attempts (the largest seen)

    def __add__(self, other: History) -> History:
        moves = dict(self.moves)
        for kind, move in other.moves.items():
            moves[kind] = moves.get(kind, Move()) + move
        return History(
            self.memory + other.memory,
            self.cpu + other.cpu,
            moves,
            self.burst + other.burst,
            (max(self.burst_peak[0], other.burst_peak[0]), max(self.burst_peak[1], other.burst_peak[1])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory": [self.memory.count, self.memory.micros],
            "cpu": [self.cpu.count, self.cpu.micros],
            "moves": {
                k: [m.attempts, m.run_seconds, m.savings_micros, list(m.destinations)] for k, m in self.moves.items()
            },
            "burst": [self.burst.count, self.burst.micros],
            "burst_peak": list(self.burst_peak),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        moves = {str(k): Move(int(v[0]), float(v[1]), int(v[2]), tuple(v[3])) for k, v in data.get("moves", {}).items()}
        peak = data.get("burst_peak", [0, 0])
        return cls(
            Saving(*map(int, data.get("memory", [0, 0]))),
            Saving(*map(int, data.get("cpu", [0, 0]))),
            moves,
            Saving(*map(int, data.get("burst", [0, 0]))),
            (int(peak[0]), int(peak[1])),
        )


def _memory_saving(r: CostRecord, config: MeshConfig, th: Thresholds) -> Saving:
    if r.measured and r.used_max_memory_mb * th.oversize_factor <= r.requested_memory_mb:
        right = max(r.used_max_memory_mb * th.headroom_factor, 1)
        return Saving(1, max(r.cost_micros - reprice(r, config, memory_mb=right), 0))
    return Saving()


def _cpu_saving(r: CostRecord, config: MeshConfig, th: Thresholds) -> Saving:
    if not r.measured or r.run_seconds <= 0:
        return Saving()
    used_millis = r.used_cpu_seconds / r.run_seconds * 1000
    if used_millis * th.oversize_factor > r.requested_cpu_millis:
        return Saving()
    right = max(math.ceil(used_millis * th.headroom_factor), th.min_cpu_millis)
    if right >= r.requested_cpu_millis:
        return Saving()
    return Saving(1, max(r.cost_micros - reprice(r, config, cpu_millis=right), 0))


def _move(r: CostRecord, config: MeshConfig, target: str) -> Move:
    options = [(reprice(r, config, pool_id=p.pool_id), p.pool_id) for p in _fitting(config, target, r)]
    if options and min(options)[0] < r.cost_micros:
        return Move(1, r.run_seconds, r.cost_micros - min(options)[0], (min(options)[1],))
    return Move(1, r.run_seconds)


def history_of(records: Sequence[CostRecord], config: MeshConfig, th: Thresholds) -> History:
    kind_of = {p.pool_id: p.kind for p in config.pools}
    memory, cpu, burst = Saving(), Saving(), Saving()
    moves: dict[str, Move] = {}
    for r in records:
        memory += _memory_saving(r, config, th)
        cpu += _cpu_saving(r, config, th)
        for source, target, _ in MOVES:
            if kind_of.get(r.pool_id) == source:
                moves[source] = moves.get(source, Move()) + _move(r, config, target)
        if r.burst:
            burst += Saving(1, r.cost_micros - reprice(r, config, burst=False))
    peak = _peak_concurrent([r for r in records if r.burst])
    return History(memory, cpu, moves, burst, peak)


def rightsize_memory_advice(h: History, th: Thresholds) -> list[Recommendation]:
    if h.memory.micros <= 0:
        return []
    return [
        Recommendation(
            "RIGHTSIZE_MEMORY",
            f"{h.memory.count} attempts used at most 1/{th.oversize_factor} of the memory they requested; "
            f"requesting {th.headroom_factor}x their peak instead would save {format_micros(h.memory.micros)}",
            h.memory.micros,
        )
    ]


def rightsize_cpu_advice(h: History, th: Thresholds) -> list[Recommendation]:
    if h.cpu.micros <= 0:
        return []
    return [
        Recommendation(
            "RIGHTSIZE_CPU",
            f"{h.cpu.count} attempts used on average at most 1/{th.oversize_factor} of the CPU they requested; "
            f"requesting {th.headroom_factor}x their average use instead would save {format_micros(h.cpu.micros)}",
            h.cpu.micros,
        )
    ]


def move_advice(h: History, period_seconds: float, th: Thresholds) -> list[Recommendation]:
    """Steady load on dynamic pools is cheaper on static ones when their prices are lower; spiky load on static
    pools is cheaper on dynamic ones when theirs are. Savings: the same usage repriced on the cheapest fitting pool."""
    out: list[Recommendation] = []
    for source, target, steady_wanted in MOVES:
        moved = h.moves.get(source)
        if moved is None or moved.attempts == 0 or period_seconds <= 0:
            continue
        concurrency = moved.run_seconds / period_seconds
        if (concurrency >= th.steady_concurrency) != steady_wanted or moved.savings_micros <= 0:
            continue
        load = "steady" if steady_wanted else "intermittent"
        out.append(
            Recommendation(
                f"MOVE_TO_{target.upper()}_POOL",
                f"{moved.attempts} attempts ran {moved.run_seconds / 3600:.2f} h on {source} pools, "
                f"{concurrency:.2f} at once on average ({load} load); the same usage on "
                f"{', '.join(moved.destinations)} would cost {format_micros(moved.savings_micros)} less",
                moved.savings_micros,
            )
        )
    return out


def burst_advice(h: History, config: MeshConfig, th: Thresholds) -> list[Recommendation]:
    """Repeated burst use pays the premium every time; a quota increase would serve the same usage at base price."""
    if h.burst.count < th.repeated_burst or h.burst.micros <= 0:
        return []
    cpu, mem = h.burst_peak
    return [
        Recommendation(
            "QUOTA_INSTEAD_OF_BURST",
            f"{h.burst.count} burst attempts paid the {config.burst_premium:g}x premium; raising the quota by about "
            f"{cpu} millicores and {mem} MB (their peak at once) would save {format_micros(h.burst.micros)}",
            h.burst.micros,
        )
    ]


def rightsize_memory(records: Sequence[CostRecord], config: MeshConfig, th: Thresholds) -> list[Recommendation]:
    return rightsize_memory_advice(history_of(records, config, th), th)


def rightsize_cpu(records: Sequence[CostRecord], config: MeshConfig, th: Thresholds) -> list[Recommendation]:
    return rightsize_cpu_advice(history_of(records, config, th), th)


def _fitting(config: MeshConfig, kind: str, r: CostRecord) -> list[PoolConfig]:
    return [
        p
        for p in config.pools
        if p.kind == kind
        and p.worker_cpu_millis >= r.requested_cpu_millis
        and p.worker_memory_mb >= r.requested_memory_mb
    ]


def move_between_pool_kinds(
    records: Sequence[CostRecord], config: MeshConfig, period_seconds: float, th: Thresholds
) -> list[Recommendation]:
    return move_advice(history_of(records, config, th), period_seconds, th)


def _peak_concurrent(records: Sequence[CostRecord]) -> tuple[int, int]:
    """Largest CPU (millis) and memory (MB) requested by attempts running at the same time."""
    events = sorted([(r.start, 1, r) for r in records] + [(r.end, 0, r) for r in records], key=lambda e: (e[0], e[1]))
    cpu = mem = peak_cpu = peak_mem = 0
    for _, starting, r in events:
        sign = 1 if starting else -1
        cpu += sign * r.requested_cpu_millis
        mem += sign * r.requested_memory_mb
        peak_cpu, peak_mem = max(peak_cpu, cpu), max(peak_mem, mem)
    return peak_cpu, peak_mem


def quota_instead_of_burst(records: Sequence[CostRecord], config: MeshConfig, th: Thresholds) -> list[Recommendation]:
    return burst_advice(history_of(records, config, th), config, th)


def shrink_idle_static_pools(
    idle_by_pool: dict[str, IdleCell], config: MeshConfig, th: Thresholds
) -> list[Recommendation]:
    """A static pool idle for more than `idle_share` of its cost: remove the workers it would not miss at
    `target_utilization`; the saving is their share of what the pool cost over the period."""
    out: list[Recommendation] = []
    for pool in config.pools:
        cell = idle_by_pool.get(pool.pool_id)
        if pool.kind != "static" or cell is None or cell.capacity_micros <= 0 or cell.idle_share <= th.idle_share:
            continue
        workers = pool.max_workers
        busy = max(cell.allocated_micros, 0) / cell.capacity_micros
        needed = max(1, math.ceil(workers * busy / th.target_utilization))
        remove = workers - needed
        if remove <= 0:
            continue
        savings = prorate(cell.capacity_micros, remove, workers)
        out.append(
            Recommendation(
                "SHRINK_IDLE_STATIC_POOL",
                f"static pool {pool.pool_id} was idle for {cell.idle_share:.0%} of its cost; removing {remove} of "
                f"its {workers} workers keeps it under {th.target_utilization:.0%} busy and would save "
                f"{format_micros(savings)}",
                savings,
            )
        )
    return out


def tenant_recommendations(
    records: Sequence[CostRecord], config: MeshConfig, period_seconds: float, th: Thresholds
) -> list[Recommendation]:
    return advice(history_of(records, config, th), config, period_seconds, th)


def advice(h: History, config: MeshConfig, period_seconds: float, th: Thresholds) -> list[Recommendation]:
    return [
        *rightsize_memory_advice(h, th),
        *rightsize_cpu_advice(h, th),
        *move_advice(h, period_seconds, th),
        *burst_advice(h, config, th),
    ]
