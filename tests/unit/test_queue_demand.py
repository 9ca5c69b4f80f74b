"""QueueDemand (services/queueing/demand.py): what autoscaling reads of each queue, kept as jobs come and go, always
equal to a scan of the jobs that wait."""

from __future__ import annotations

import random

from services.queueing.demand import QueueDemand


def scanned(waiting: dict[str, tuple[str, float, bool]]) -> tuple[dict[str, int], dict[str, float]]:
    burst: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for queue, submitted, on_burst in waiting.values():
        if on_burst:
            burst[queue] = burst.get(queue, 0) + 1
        oldest[queue] = min(oldest.get(queue, submitted), submitted)
    return burst, oldest


def test_the_demand_equals_a_scan_of_the_waiting_jobs_after_any_mix_of_arrivals_and_departures() -> None:
    rng = random.Random(17)
    demand = QueueDemand()
    waiting: dict[str, tuple[str, float, bool]] = {}
    for step in range(5000):
        if waiting and rng.random() < 0.45:
            # the first to arrive (as dispatch mostly goes) or any other (cancelled, dispatched out of order)
            job_id = next(iter(waiting)) if rng.random() < 0.5 else rng.choice(list(waiting))
            del waiting[job_id]
            demand.discard(job_id)
        else:
            job_id = f"j{rng.randrange(3000)}"  # now and then an id that waits already: it is replaced
            entry = (rng.choice(["default", "dynamic-large"]), float(rng.randrange(10_000)), rng.random() < 0.3)
            waiting[job_id] = entry
            demand.add(job_id, *entry)
        if step % 97 == 0:
            assert (demand.burst_by_queue(), demand.oldest_by_queue()) == scanned(waiting)
    assert (demand.burst_by_queue(), demand.oldest_by_queue()) == scanned(waiting)
    assert len(demand) == len(waiting)


def test_a_job_that_leaves_twice_or_never_came_changes_nothing() -> None:
    demand = QueueDemand()
    demand.add("a", "default", 5.0, True)
    demand.discard("a")
    demand.discard("a")
    demand.discard("never")

    assert (demand.burst_by_queue(), demand.oldest_by_queue(), len(demand)) == ({}, {}, 0)
