"""Pruning of histories by age and count (libs/pruning.py), and lifetimes folded into daily capacity
(services/cost/capacity.py) leaving idle cost over whole days unchanged."""

from __future__ import annotations

import pytest

from libs.config import Pruning
from libs.pruning import Entry, time_from_key, to_prune
from services.cost.capacity import DailyCapacity, fold_capacity
from services.cost.idle import Allocation, WorkerInterval
from services.cost.recommendations import Thresholds
from services.cost.reports import Period, build_reports
from tests.unit.cost_builders import HOUR, MIDNIGHT, priced_mesh

DAY = 24 * HOUR
NOW = 1_000_000.0
# One entry a day for ten days, the newest a day old.
ENTRIES = [Entry(f"/h/{i:02d}", NOW - (10 - i) * DAY) for i in range(10)]


@pytest.mark.parametrize(
    ("case", "rule", "kept"),
    [
        ("count only keeps the newest n", Pruning(0, 3), [7, 8, 9]),
        ("age only keeps what is younger", Pruning(4.5 * DAY, 100), [6, 7, 8, 9]),
        ("the stricter of the two wins: age", Pruning(2.5 * DAY, 5), [8, 9]),
        ("the stricter of the two wins: count", Pruning(8.5 * DAY, 2), [8, 9]),
        ("nothing to prune", Pruning(0, 10), list(range(10))),
        ("at least one is always allowed", Pruning(0, 1), [9]),
    ],
)
def test_which_entries_are_pruned(case: str, rule: Pruning, kept: list[int]) -> None:
    gone = to_prune(ENTRIES, NOW, rule)

    assert [e for e in ENTRIES if e not in gone] == [ENTRIES[i] for i in kept], case
    assert gone == sorted(gone, key=lambda e: e.at)  # oldest first


def test_entries_at_the_same_time_rank_by_key() -> None:
    same = [Entry("/h/b", NOW), Entry("/h/a", NOW), Entry("/h/c", NOW)]
    assert to_prune(same, NOW, Pruning(0, 2)) == [Entry("/h/a", NOW)]


def test_the_time_of_a_history_key_is_its_millisecond_prefix() -> None:
    assert time_from_key("/jobmesh/scaling/pool-a/001700000000123") == 1_700_000_000.123
    assert time_from_key("/jobmesh/quota/burst-audit/001700000000500-3f2a-77") == 1_700_000_000.5


CONFIG = priced_mesh()
LIFETIMES = [
    WorkerInterval("s1", "static-general", MIDNIGHT - 2 * HOUR, MIDNIGHT + DAY + 5 * HOUR, 1000, 1024),
    WorkerInterval("s2", "static-general", MIDNIGHT + 3.3 * HOUR, MIDNIGHT + 3.9 * HOUR, 1000, 1024),
    WorkerInterval("d1", "dynamic-large", MIDNIGHT + 7 * HOUR, MIDNIGHT + 2 * DAY, 2000, 2048),
    WorkerInterval("d2", "dynamic-large", MIDNIGHT + 9 * HOUR, None, 2000, 2048),  # still alive: never folded
]
ALLOCATIONS = [Allocation("static-general", MIDNIGHT + HOUR, MIDNIGHT + 2 * HOUR, 100_000)]


def test_idle_cost_over_whole_days_is_the_same_once_lifetimes_are_folded_into_daily_capacity() -> None:
    pruned, kept = LIFETIMES[:3], LIFETIMES[3:]
    capacity = list(fold_capacity(pruned, CONFIG).values())
    now = MIDNIGHT + 5 * DAY
    for start, end in ((MIDNIGHT - DAY, MIDNIGHT + 3 * DAY), (MIDNIGHT, MIDNIGHT + DAY), (MIDNIGHT + DAY, now)):
        period = Period(start, end, now)
        before = build_reports([], "", period, CONFIG, LIFETIMES, ALLOCATIONS, Thresholds())
        after = build_reports([], "", period, CONFIG, kept, ALLOCATIONS, Thresholds(), capacity=capacity)
        assert after == before
        assert before.idle_micros > 0


def test_a_lifetime_s_capacity_is_split_over_the_days_it_lived() -> None:
    cells = fold_capacity(LIFETIMES, CONFIG)

    assert sorted(cells) == [
        ("dynamic-large", "2026-03-10"),
        ("dynamic-large", "2026-03-11"),
        ("static-general", "2026-03-09"),
        ("static-general", "2026-03-10"),
        ("static-general", "2026-03-11"),
    ]
    assert cells[("static-general", "2026-03-10")].workers == 2
    # A day of a 1-core 1-GiB static worker costs 24 x 0.10.
    assert cells[("static-general", "2026-03-10")].capacity_micros == 2_400_000 + 60_000
    for cell in cells.values():
        assert DailyCapacity.from_json(cell.to_json()) == cell
