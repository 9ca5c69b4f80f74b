"""Idle cost (services/cost/idle.py): pool cost = jobs at base price + idle, to the micro, with known numbers."""

from __future__ import annotations

import pytest

from libs.clock import FakeClock
from services.cost.idle import (
    Allocation,
    IdleCell,
    WorkerInterval,
    WorkerLifetimes,
    by_day,
    by_pool,
    day_windows,
    idle_cells,
    prorate,
    total,
)
from services.cost.records import base_micros
from tests.unit.cost_builders import HOUR, MIDNIGHT, priced, priced_mesh, record

CONFIG = priced_mesh()


def static_worker(n: int, start: float = MIDNIGHT, end: float | None = MIDNIGHT + HOUR) -> WorkerInterval:
    return WorkerInterval(f"static-general-{n}", "static-general", start, end, 1000, 1024)


def test_two_static_workers_for_an_hour_with_two_jobs_leave_exactly_the_unused_part_idle() -> None:
    clock = FakeClock(MIDNIGHT + 2 * HOUR)
    # Two static workers at 0.10 an hour each, for one hour: the pool costs 0.200000.
    workers = [static_worker(1), static_worker(2)]
    # A whole worker for half an hour: (0.04 + 0.01 + 0.05) x 0.5 = 0.050000.
    half = priced(record(hours=0.5), CONFIG)
    # Half a core and 512 MB for an hour, on burst: (0.02 + 0.005 + 0.05) x 1 = 0.075000 at base price
    # (the tenant pays 0.112500 with the 1.5x premium, which is no use of the pool).
    burst = priced(record(job_id="job-2", cpu_millis=500, memory_mb=512, burst=True), CONFIG)
    assert (half.cost_micros, burst.cost_micros) == (50_000, 112_500)
    allocations = [Allocation(r.pool_id, r.start, r.end, base_micros(r, CONFIG)) for r in (half, burst)]

    cells = idle_cells(CONFIG, workers, allocations, MIDNIGHT, MIDNIGHT + HOUR, clock.now())

    pool = by_pool(cells)["static-general"]
    assert pool == IdleCell(capacity_micros=200_000, allocated_micros=125_000)
    assert pool.idle_micros == 75_000
    assert pool.allocated_micros + pool.idle_micros == pool.capacity_micros
    assert pool.idle_share == pytest.approx(0.375)


def test_a_dynamic_worker_that_came_and_went_is_charged_for_its_lifetime_only() -> None:
    clock = FakeClock(MIDNIGHT + 2 * HOUR)
    # Alive 15 minutes at 0.24 an hour: 0.060000; a job on it for 10 minutes using all of it: 0.040000.
    worker = WorkerInterval("dynamic-large-1", "dynamic-large", MIDNIGHT + 600, MIDNIGHT + 1500, 2000, 2048)
    job = Allocation("dynamic-large", MIDNIGHT + 700, MIDNIGHT + 1300, 40_000)

    cells = idle_cells(CONFIG, [worker], [job], MIDNIGHT, MIDNIGHT + HOUR, clock.now())

    assert cells == {("dynamic-large", "2026-03-10"): IdleCell(60_000, 40_000)}


def test_every_cell_satisfies_capacity_equals_allocated_plus_idle_and_the_totals_add_up() -> None:
    clock = FakeClock(MIDNIGHT + 3 * 24 * HOUR)
    # Workers and jobs that cross midnights, so the identity is checked per (pool, day) cell and in sum.
    workers = [
        static_worker(1, MIDNIGHT - 5 * HOUR, None),
        static_worker(2, MIDNIGHT + 7 * HOUR, MIDNIGHT + 30 * HOUR),
        WorkerInterval("dynamic-large-9", "dynamic-large", MIDNIGHT + 20 * HOUR, MIDNIGHT + 27 * HOUR, 2000, 2048),
    ]
    jobs = [
        Allocation("static-general", MIDNIGHT - HOUR, MIDNIGHT + 3 * HOUR, 400_000),
        Allocation("static-general", MIDNIGHT + 23 * HOUR, MIDNIGHT + 25 * HOUR, 200_001),
        Allocation("dynamic-large", MIDNIGHT + 21 * HOUR, MIDNIGHT + 26 * HOUR, 1_200_000),
    ]

    cells = idle_cells(CONFIG, workers, jobs, MIDNIGHT, MIDNIGHT + 2 * 24 * HOUR, clock.now())

    assert {day for _, day in cells} == {"2026-03-10", "2026-03-11"}
    whole = total(cells)
    assert whole.capacity_micros == sum(c.capacity_micros for c in by_pool(cells).values())
    assert whole.idle_micros == sum(c.idle_micros for c in by_day(cells).values())
    # Static worker 1: 48 h; worker 2: 23 h in the window -> 71 h x 0.10. Dynamic: 7 h x 0.24.
    assert by_pool(cells)["static-general"].capacity_micros == 7_100_000
    assert by_pool(cells)["dynamic-large"].capacity_micros == 1_680_000
    # The first job ran 1 of its 4 hours before the window: 3/4 of it is in. The second splits 1 h / 1 h over
    # midnight: 100,000.5 each side, rounded half to even to 100,000 each (a micro lost to rounding, per attempt).
    assert by_pool(cells)["static-general"].allocated_micros == 300_000 + 200_000
    assert by_pool(cells)["dynamic-large"].allocated_micros == 1_200_000


def test_an_open_interval_is_charged_up_to_now_and_never_beyond() -> None:
    clock = FakeClock(MIDNIGHT + HOUR / 2)

    cells = idle_cells(CONFIG, [static_worker(1, MIDNIGHT, None)], [], MIDNIGHT, MIDNIGHT + 24 * HOUR, clock.now())

    assert total(cells) == IdleCell(50_000, 0)


def test_nothing_is_charged_for_an_empty_or_future_window() -> None:
    clock = FakeClock(MIDNIGHT)
    workers = [static_worker(1)]

    assert idle_cells(CONFIG, workers, [], MIDNIGHT + HOUR, MIDNIGHT + 2 * HOUR, clock.now()) == {}
    assert idle_cells(CONFIG, workers, [], MIDNIGHT, MIDNIGHT, clock.now() + HOUR) == {}


def test_jobs_that_overrun_their_workers_make_idle_negative_rather_than_break_the_identity() -> None:
    cells = idle_cells(
        CONFIG,
        [static_worker(1)],
        [Allocation("static-general", MIDNIGHT, MIDNIGHT + HOUR, 130_000)],
        MIDNIGHT,
        MIDNIGHT + HOUR,
        MIDNIGHT + HOUR,
    )

    assert total(cells).idle_micros == -30_000


@pytest.mark.parametrize(
    ("micros", "part", "whole", "share"),
    [
        pytest.param(400_000, 3.0, 4.0, 300_000, id="three-quarters"),
        pytest.param(3, 1.0, 2.0, 2, id="half-rounds-to-even-up"),
        pytest.param(5, 1.0, 2.0, 2, id="half-rounds-to-even-down"),
        pytest.param(100, 0.0, 10.0, 0, id="no-overlap"),
        pytest.param(100, 0.0, 0.0, 0, id="zero-length-run"),
    ],
)
def test_prorate(micros: int, part: float, whole: float, share: int) -> None:
    assert prorate(micros, part, whole) == share


def test_day_windows_cut_at_utc_midnight() -> None:
    windows = day_windows(MIDNIGHT - HOUR, MIDNIGHT + HOUR)

    assert windows == [
        ("2026-03-09", MIDNIGHT - HOUR, MIDNIGHT),
        ("2026-03-10", MIDNIGHT, MIDNIGHT + HOUR),
    ]


class TestWorkerLifetimes:
    def test_a_worker_keeps_its_first_start_when_it_registers_again(self) -> None:
        lifetimes = WorkerLifetimes()

        assert lifetimes.registered("w1", "static-general", 100.0, 1000, 1024)
        assert not lifetimes.registered("w1", "static-general", 250.0, 1000, 1024)

        assert lifetimes.intervals["w1"].start == 100.0

    def test_a_worker_that_goes_away_ends_once(self) -> None:
        lifetimes = WorkerLifetimes()
        lifetimes.registered("w1", "static-general", 100.0, 1000, 1024)

        assert lifetimes.gone("w1", 400.0)
        assert not lifetimes.gone("w1", 900.0)

        assert lifetimes.intervals["w1"].end == 400.0

    def test_a_worker_back_under_the_same_id_is_counted_as_alive_in_between(self) -> None:
        lifetimes = WorkerLifetimes()
        lifetimes.registered("w1", "static-general", 100.0, 1000, 1024)
        lifetimes.gone("w1", 400.0)

        assert lifetimes.registered("w1", "static-general", 500.0, 1000, 1024)

        assert (lifetimes.intervals["w1"].start, lifetimes.intervals["w1"].end) == (100.0, None)

    def test_workers_missing_after_a_restart_end_at_the_time_it_is_noticed(self) -> None:
        lifetimes = WorkerLifetimes()
        lifetimes.restore(WorkerInterval("gone", "static-general", 10.0, None, 1000, 1024))
        lifetimes.restore(WorkerInterval("alive", "static-general", 10.0, None, 1000, 1024))
        lifetimes.restore(WorkerInterval("ended", "static-general", 10.0, 20.0, 1000, 1024))

        closed = lifetimes.close_missing({"alive"}, 99.0)

        assert closed == ["gone"]
        assert lifetimes.intervals["gone"].end == 99.0
        assert lifetimes.intervals["alive"].end is None
        assert lifetimes.intervals["ended"].end == 20.0

    def test_an_interval_survives_its_json_form(self) -> None:
        interval = WorkerInterval("w1", "dynamic-large", 1.5, None, 2000, 2048)

        assert WorkerInterval.from_json(interval.to_json()) == interval


def _idle_cells_by_calendar(workers, allocations, start, end, now):  # type: ignore[no-untyped-def]
    """The reference: walk every day of the window and every worker and attempt on it (quadratic, small inputs)."""
    from services.cost.idle import capacity_micros, overlap

    end = min(end, now)
    cells: dict[tuple[str, str], IdleCell] = {}
    for day, d_start, d_end in day_windows(start, end) if start < end else []:
        for w in workers:
            pool = CONFIG.pool(w.pool_id)
            seconds = overlap(w.start, now if w.end is None else w.end, d_start, d_end)
            if pool is not None and seconds > 0:
                cell = IdleCell(capacity_micros(seconds, w.cpu_millis, w.memory_mb, pool.pricing), 0)
                cells[(w.pool_id, day)] = cells.get((w.pool_id, day), IdleCell()) + cell
        for a in allocations:
            share = prorate(a.base_micros, overlap(a.start, a.end, d_start, d_end), a.end - a.start)
            if share:
                cells[(a.pool_id, day)] = cells.get((a.pool_id, day), IdleCell()) + IdleCell(0, share)
    return cells


def test_cells_follow_the_data_not_the_calendar_and_match_a_day_by_day_walk() -> None:
    now = MIDNIGHT + 5 * 24 * HOUR + 7 * HOUR
    workers = [
        static_worker(1, MIDNIGHT - 3 * 24 * HOUR + 1234.5, None),
        static_worker(2, MIDNIGHT + 2 * HOUR, MIDNIGHT + 2 * 24 * HOUR + 17.25),
        WorkerInterval("dynamic-large-1", "dynamic-large", MIDNIGHT + 600, MIDNIGHT + 30 * HOUR, 2000, 2048),
        WorkerInterval("gone-1", "no-such-pool", MIDNIGHT, MIDNIGHT + HOUR, 1000, 1024),
    ]
    allocations = [
        Allocation("static-general", MIDNIGHT - 2 * HOUR, MIDNIGHT + 26 * HOUR + 0.5, 987_654),
        Allocation("dynamic-large", MIDNIGHT + 700, MIDNIGHT + 1300, 40_000),
        Allocation("static-general", MIDNIGHT + 4 * 24 * HOUR, MIDNIGHT + 4 * 24 * HOUR, 5),
    ]
    for start, end in [
        (MIDNIGHT - 10 * 24 * HOUR, MIDNIGHT + 10 * 24 * HOUR),
        (MIDNIGHT + 1.5 * HOUR, MIDNIGHT + 25 * HOUR),
        (MIDNIGHT + 3 * 24 * HOUR, MIDNIGHT + 3 * 24 * HOUR + 1),
    ]:
        expected = _idle_cells_by_calendar(workers, allocations, start, end, now)
        assert idle_cells(CONFIG, workers, allocations, start, end, now) == expected


def test_a_window_of_centuries_with_no_data_makes_no_cells() -> None:
    # Year 1 to now: no day-by-day walk (that was ~740k days of work on the service's loop).
    assert idle_cells(CONFIG, [static_worker(1)], [], -62135596800.0, MIDNIGHT - 24 * HOUR, MIDNIGHT) == {}
