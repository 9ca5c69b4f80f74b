"""Cost-optimization recommendations; every estimated saving is repriced from the records it is about. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

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


def rightsize_memory(records: Sequence[CostRecord], config: MeshConfig, th: Thresholds) -> list[Recommendation]:
    savings, count = 0, 0
    for r in records:
        if r.measured and r.used_max_memory_mb * th.oversize_factor <= r.requested_memory_mb:
            right = max(r.used_max_memory_mb * th.headroom_factor, 1)
            savings += max(r.cost_micros - reprice(r, config, memory_mb=right), 0)
            count += 1
    if savings <= 0:
        return []
    return [
        Recommendation(
            "RIGHTSIZE_MEMORY",
            f"{count} attempts used at most 1/{th.oversize_factor} of the memory they requested; "
            f"requesting {th.headroom_factor}x their peak instead would save {format_micros(savings)}",
            savings,
        )
    ]


def rightsize_cpu(records: Sequence[CostRecord], config: MeshConfig, th: Thresholds) -> list[Recommendation]:
    savings, count = 0, 0
    for r in records:
        if not r.measured or r.run_seconds <= 0:
            continue
        used_millis = r.used_cpu_seconds / r.run_seconds * 1000
        if used_millis * th.oversize_factor > r.requested_cpu_millis:
            continue
        right = max(math.ceil(used_millis * th.headroom_factor), th.min_cpu_millis)
        if right < r.requested_cpu_millis:
            savings += max(r.cost_micros - reprice(r, config, cpu_millis=right), 0)
            count += 1
    if savings <= 0:
        return []
    return [
        Recommendation(
            "RIGHTSIZE_CPU",
            f"{count} attempts used on average at most 1/{th.oversize_factor} of the CPU they requested; "
            f"requesting {th.headroom_factor}x their average use instead would save {format_micros(savings)}",
            savings,
        )
    ]


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
    """Steady load on dynamic pools is cheaper on static ones when their prices are lower; spiky load on static
    pools is cheaper on dynamic ones when theirs are. Savings: the same usage repriced on the cheapest fitting pool."""
    out: list[Recommendation] = []
    for source, target, steady_wanted in (("dynamic", "static", True), ("static", "dynamic", False)):
        kind_of = {p.pool_id: p.kind for p in config.pools}
        moved = [r for r in records if kind_of.get(r.pool_id) == source]
        if not moved or period_seconds <= 0:
            continue
        concurrency = sum(r.run_seconds for r in moved) / period_seconds
        if (concurrency >= th.steady_concurrency) != steady_wanted:
            continue
        savings, destinations = 0, set()
        for r in moved:
            options = [(reprice(r, config, pool_id=p.pool_id), p.pool_id) for p in _fitting(config, target, r)]
            if options and min(options)[0] < r.cost_micros:
                savings += r.cost_micros - min(options)[0]
                destinations.add(min(options)[1])
        if savings > 0:
            load = "steady" if steady_wanted else "intermittent"
            out.append(
                Recommendation(
                    f"MOVE_TO_{target.upper()}_POOL",
                    f"{len(moved)} attempts ran {sum(r.run_seconds for r in moved) / 3600:.2f} h on {source} pools, "
                    f"{concurrency:.2f} at once on average ({load} load); the same usage on "
                    f"{', '.join(sorted(destinations))} would cost {format_micros(savings)} less",
                    savings,
                )
            )
    return out


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
    """Repeated burst use pays the premium every time; a quota increase would serve the same usage at base price."""
    burst = [r for r in records if r.burst]
    if len(burst) < th.repeated_burst:
        return []
    savings = sum(r.cost_micros - reprice(r, config, burst=False) for r in burst)
    if savings <= 0:
        return []
    cpu, mem = _peak_concurrent(burst)
    return [
        Recommendation(
            "QUOTA_INSTEAD_OF_BURST",
            f"{len(burst)} burst attempts paid the {config.burst_premium:g}x premium; raising the quota by about "
            f"{cpu} millicores and {mem} MB (their peak at once) would save {format_micros(savings)}",
            savings,
        )
    ]


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
    return [
        *rightsize_memory(records, config, th),
        *rightsize_cpu(records, config, th),
        *move_between_pool_kinds(records, config, period_seconds, th),
        *quota_instead_of_burst(records, config, th),
    ]
