"""Recommendations (services/cost/recommendations.py): each one's savings are repriced from the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from libs.config import MeshConfig, Pricing
from services.cost.idle import IdleCell
from services.cost.recommendations import (
    Recommendation,
    Thresholds,
    move_between_pool_kinds,
    quota_instead_of_burst,
    rightsize_cpu,
    rightsize_memory,
    shrink_idle_static_pools,
    tenant_recommendations,
)
from services.cost.records import CostRecord
from tests.unit.cost_builders import HOUR, MIDNIGHT, priced, priced_mesh, record

CONFIG = priced_mesh()
TH = Thresholds()
DAY = 24 * HOUR


def hourly(n: int, **kwargs: object) -> list[CostRecord]:
    """n one-hour attempts back to back, priced at the mesh's prices."""
    return [
        priced(record(job_id=f"job-{i}", start=MIDNIGHT + i * HOUR, **kwargs), CONFIG)  # type: ignore[arg-type]
        for i in range(n)
    ]


def with_swapped_prices(config: MeshConfig) -> MeshConfig:
    """Dynamic workers priced like static ones were, and the other way round."""
    static, dynamic = config.pools
    return replace(config, pools=(replace(static, pricing=dynamic.pricing), replace(dynamic, pricing=static.pricing)))


def kinds(recs: list[Recommendation]) -> list[str]:
    return [r.kind for r in recs]


def test_memory_used_at_a_tenth_of_the_request_is_rightsized_to_twice_the_peak() -> None:
    # 1 core, 1 GiB for an hour: 0.100000. Asking for 200 MB instead: 0.04 + 200/1024 x 0.01 + 0.05 = 0.091953.
    records = hourly(1, used_cpu_seconds=3600, used_memory_mb=100)

    (rec,) = rightsize_memory(records, CONFIG, TH)

    assert rec.kind == "RIGHTSIZE_MEMORY"
    assert rec.savings_micros == 100_000 - 91_953


def test_cpu_used_at_a_tenth_of_the_request_is_rightsized_to_twice_the_average() -> None:
    # 360 CPU-seconds in an hour is 100 millicores on average; 200 millicores cost 0.008 + 0.01 + 0.05 = 0.068.
    records = hourly(1, used_cpu_seconds=360, used_memory_mb=1024)

    (rec,) = rightsize_cpu(records, CONFIG, TH)

    assert rec.kind == "RIGHTSIZE_CPU"
    assert rec.savings_micros == 100_000 - 68_000


@pytest.mark.parametrize(
    ("used_cpu_seconds", "used_memory_mb"),
    [
        pytest.param(1080, 300, id="using-over-a-quarter"),
        pytest.param(0, 0, id="no-usage-report-from-a-cancelled-attempt"),
    ],
)
def test_requests_that_fit_or_were_never_measured_are_not_rightsized(
    used_cpu_seconds: float, used_memory_mb: int
) -> None:
    records = hourly(3, used_cpu_seconds=used_cpu_seconds, used_memory_mb=used_memory_mb)

    assert rightsize_cpu(records, CONFIG, TH) + rightsize_memory(records, CONFIG, TH) == []


def test_steady_load_on_a_dynamic_pool_is_priced_on_the_cheaper_static_pool() -> None:
    # A whole day of 1 core / 1 GiB on dynamic workers: 0.16 an hour there, 0.10 on the static pool.
    records = hourly(24, pool_id="dynamic-large")

    (rec,) = move_between_pool_kinds(records, CONFIG, DAY, TH)

    assert rec.kind == "MOVE_TO_STATIC_POOL"
    assert rec.savings_micros == 24 * (160_000 - 100_000)
    assert "static-general" in rec.description


def test_occasional_load_on_a_dynamic_pool_stays_there() -> None:
    records = hourly(2, pool_id="dynamic-large")  # 2 hours in a day: 0.08 running at once on average

    assert move_between_pool_kinds(records, CONFIG, DAY, TH) == []


def test_jobs_too_big_for_the_static_workers_are_not_counted_as_movable() -> None:
    records = hourly(24, pool_id="dynamic-large", cpu_millis=2000, memory_mb=2048)

    assert move_between_pool_kinds(records, CONFIG, DAY, TH) == []


def test_intermittent_load_on_a_static_pool_moves_to_a_dynamic_pool_when_that_is_cheaper() -> None:
    config = with_swapped_prices(CONFIG)  # now static costs 0.16 an hour for 1 core / 1 GiB, dynamic 0.10
    records = [priced(r, config) for r in hourly(2)]

    (rec,) = move_between_pool_kinds(records, config, DAY, TH)

    assert rec.kind == "MOVE_TO_DYNAMIC_POOL"
    assert rec.savings_micros == 2 * (160_000 - 100_000)


def test_steady_load_on_a_static_pool_is_not_moved_to_dynamic_even_when_cheaper_per_hour() -> None:
    config = with_swapped_prices(CONFIG)

    assert move_between_pool_kinds([priced(r, config) for r in hourly(24)], config, DAY, TH) == []


def test_repeated_burst_use_would_be_cheaper_as_a_quota_increase_by_the_premium_paid() -> None:
    # Half a core and 512 MB for an hour: 0.075 at base price, 0.1125 with the 1.5x premium.
    records = hourly(3, cpu_millis=500, memory_mb=512, burst=True)

    (rec,) = quota_instead_of_burst(records, CONFIG, TH)

    assert rec.kind == "QUOTA_INSTEAD_OF_BURST"
    assert rec.savings_micros == 3 * (112_500 - 75_000)
    assert "500 millicores and 512 MB" in rec.description  # back to back: never more than one at once


def test_the_quota_to_ask_for_is_the_peak_of_burst_attempts_running_together() -> None:
    together = [replace(r, start=MIDNIGHT, end=MIDNIGHT + HOUR) for r in hourly(3, cpu_millis=500, burst=True)]

    (rec,) = quota_instead_of_burst(together, CONFIG, TH)

    assert "1500 millicores and 3072 MB" in rec.description


def test_occasional_burst_use_is_not_a_habit_worth_a_quota_increase() -> None:
    assert quota_instead_of_burst(hourly(2, cpu_millis=500, memory_mb=512, burst=True), CONFIG, TH) == []


def test_a_mostly_idle_static_pool_is_told_how_many_workers_to_remove_and_what_that_saves() -> None:
    # Two workers for an hour cost 0.200000 and jobs used 0.020000 of it: 90% idle. One worker at 10% busy
    # load would run 20% busy, under the 80% target: remove 1 of 2, saving half of the pool's cost.
    idle = {"static-general": IdleCell(capacity_micros=200_000, allocated_micros=20_000)}

    (rec,) = shrink_idle_static_pools(idle, CONFIG, TH)

    assert rec.kind == "SHRINK_IDLE_STATIC_POOL"
    assert rec.savings_micros == 100_000
    assert "removing 1 of its 2 workers" in rec.description


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param(IdleCell(200_000, 120_000), id="busy-enough"),
        pytest.param(IdleCell(200_000, 90_000), id="55-percent-idle-but-one-worker-would-run-90-percent-busy"),
        pytest.param(IdleCell(0, 0), id="no-capacity-seen"),
    ],
)
def test_a_static_pool_is_not_shrunk_when_it_needs_its_workers(cell: IdleCell) -> None:
    assert shrink_idle_static_pools({"static-general": cell}, CONFIG, TH) == []


def test_idle_dynamic_pools_are_left_to_the_autoscaler() -> None:
    assert shrink_idle_static_pools({"dynamic-large": IdleCell(1_000_000, 0)}, CONFIG, TH) == []


Maker = Callable[[int], list[Recommendation]]

SCALES: list[tuple[str, Maker]] = [
    ("memory", lambda n: rightsize_memory(hourly(n, used_cpu_seconds=3600, used_memory_mb=100), CONFIG, TH)),
    ("cpu", lambda n: rightsize_cpu(hourly(n, used_cpu_seconds=360, used_memory_mb=1024), CONFIG, TH)),
    ("move", lambda n: move_between_pool_kinds(hourly(24 * n, pool_id="dynamic-large"), CONFIG, DAY * n, TH)),
    ("burst", lambda n: quota_instead_of_burst(hourly(3 * n, cpu_millis=500, burst=True), CONFIG, TH)),
    (
        "shrink",
        lambda n: shrink_idle_static_pools({"static-general": IdleCell(200_000 * n, 20_000 * n)}, CONFIG, TH),
    ),
]


@pytest.mark.parametrize(("name", "make"), [pytest.param(n, m, id=n) for n, m in SCALES])
def test_savings_grow_with_the_data_they_come_from(name: str, make: Maker) -> None:
    (once,) = make(1)
    (thrice,) = make(3)

    assert once.savings_micros > 0
    assert thrice.savings_micros == 3 * once.savings_micros


def test_a_tenant_running_well_gets_no_recommendations() -> None:
    records = hourly(3, used_cpu_seconds=3000, used_memory_mb=900)

    assert tenant_recommendations(records, CONFIG, DAY, TH) == []


def test_prices_of_zero_save_nothing_and_recommend_nothing() -> None:
    free = replace(CONFIG, pools=tuple(replace(p, pricing=Pricing()) for p in CONFIG.pools))
    records = [priced(r, free) for r in hourly(24, pool_id="dynamic-large", used_memory_mb=10, burst=True)]

    assert kinds(tenant_recommendations(records, free, DAY, TH)) == []
