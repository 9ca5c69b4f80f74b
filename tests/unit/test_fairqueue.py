"""Unit tests for the weighted fair queue (services/queueing/fairqueue.py): pure, deterministic, a fake clock.

Regression tests for three bugs of the first fair queue are marked "regression:" below: start tags re-based on the
current virtual time at every look (a weight-1 tenant beside weights 2 and 3 starved), peek returning fewer jobs
than asked after a cancel, and peek(queue=...) missing jobs behind other queues' work.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from functools import cache

import pytest

from services.queueing.fairqueue import Placement, QueueItem, WeightedFairQueue, job_cost
from services.queueing.simulation import SimJob, SimResult, Simulation, jain_index
from services.queueing.sla import SlaPolicy

# Weight-normalised lag bound for unit jobs dispatched by smallest finish tag: every dispatched job of tenant i has
# finish <= F and every queued one >= F, so n_i / w_i lies in [F - 1/w_i, F]; two tenants thus differ by at most
# 1 / min(w) = 1 job of a weight-1 tenant.
LAG_BOUND = 1.0 + 1e-9


class QueueBuilder:
    """Tenants with weights, then jobs pushed in the order they are described."""

    def __init__(self) -> None:
        self._weights: dict[str, float] = {}
        self._items: list[QueueItem] = []

    def tenant(self, tenant_id: str, weight: float = 1.0) -> QueueBuilder:
        self._weights[tenant_id] = weight
        return self

    def job(
        self, job_id: str, tenant_id: str, *, queue: str = "default", cost: float = 1.0, priority: int = 0, seq: int = 0
    ) -> QueueBuilder:
        self._items.append(QueueItem(job_id, tenant_id, queue, cost, priority, seq))
        return self

    def jobs(self, tenant_id: str, count: int, *, queue: str = "default", cost: float = 1.0) -> QueueBuilder:
        for i in range(count):
            self.job(f"{tenant_id}-{i}", tenant_id, queue=queue, cost=cost)
        return self

    def build(self) -> WeightedFairQueue:
        queue = WeightedFairQueue(self._weights)
        for item in self._items:
            assert queue.push(item)
        return queue


def dispatch_next(queue: WeightedFairQueue) -> QueueItem:
    """What the scheduler does: take the head of the fair order and remove it as dispatched."""
    head = queue.peek(1)[0]
    assert queue.remove(head.job_id, dispatched=True) == head
    return head


def ids(items: list[QueueItem]) -> list[str]:
    return [i.job_id for i in items]


class Backlog:
    """Keeps every joined tenant backlogged with `depth` unit jobs, topping up after each dispatch."""

    def __init__(self, weights: dict[str, float], depth: int = 4):
        self.queue = WeightedFairQueue(weights)
        self.depth = depth
        self._ids = itertools.count()
        self.order: list[str] = []

    def join(self, tenant_id: str) -> Backlog:
        for _ in range(self.depth):
            self._push(tenant_id)
        return self

    def _push(self, tenant_id: str) -> None:
        self.queue.push(QueueItem(f"{tenant_id}-{next(self._ids)}", tenant_id, "default", 1.0))

    def dispatch(self, count: int) -> list[str]:
        taken = []
        for _ in range(count):
            tenant_id = dispatch_next(self.queue).tenant_id
            self._push(tenant_id)
            taken.append(tenant_id)
        self.order.extend(taken)
        return taken


@cache
def backlogged_run(weights: tuple[tuple[str, float], ...], dispatches: int = 3000) -> tuple[str, ...]:
    backlog = Backlog(dict(weights))
    for tenant_id, _ in weights:
        backlog.join(tenant_id)
    return tuple(backlog.dispatch(dispatches))


WEIGHTINGS = {
    "equal-weights": (("a", 1.0), ("b", 1.0), ("c", 1.0)),
    "one-one-two": (("a", 1.0), ("b", 1.0), ("c", 2.0)),
    "one-two": (("a", 1.0), ("b", 2.0)),
    "one-two-three": (("acme", 1.0), ("globex", 2.0), ("initech", 3.0)),
    "one-three": (("a", 1.0), ("b", 3.0)),
    "two-three": (("a", 2.0), ("b", 3.0)),
}


def weightings() -> list[object]:
    """Every weighting as a named case (regression: 1:2:3, 1:3 and 2:3 starved the lighter tenant)."""
    return [pytest.param(w, id=name) for name, w in WEIGHTINGS.items()]


@pytest.mark.parametrize("weights", weightings())
def test_backlogged_tenants_get_dispatch_shares_within_two_percent_of_their_weights(
    weights: tuple[tuple[str, float], ...],
) -> None:
    order = backlogged_run(weights)
    counts = Counter(order)
    total_weight = sum(w for _, w in weights)

    shares = {tenant: counts[tenant] / len(order) for tenant, _ in weights}
    expected = {tenant: w / total_weight for tenant, w in weights}

    for tenant, _ in weights:
        assert shares[tenant] == pytest.approx(expected[tenant], abs=0.02), (shares, expected)


@pytest.mark.parametrize("weights", weightings())
def test_jains_index_of_weight_normalised_shares_is_at_least_0_99(weights: tuple[tuple[str, float], ...]) -> None:
    counts = Counter(backlogged_run(weights))
    total_weight = sum(w for _, w in weights)
    normalised = [(counts[tenant] / counts.total()) / (w / total_weight) for tenant, w in weights]

    jain = sum(normalised) ** 2 / (len(normalised) * sum(x * x for x in normalised))

    assert jain >= 0.99, (jain, counts)


@pytest.mark.parametrize("weights", weightings())
def test_in_every_prefix_weight_normalised_counts_differ_by_at_most_one_job(
    weights: tuple[tuple[str, float], ...],
) -> None:
    weight = dict(weights)
    counts = dict.fromkeys(weight, 0)
    worst = 0.0
    for tenant in backlogged_run(weights):
        counts[tenant] += 1
        normalised = [counts[t] / weight[t] for t in weight]
        worst = max(worst, max(normalised) - min(normalised))

    assert worst <= LAG_BOUND


IDLE_TENANT_CASES = [
    pytest.param({"a": 1.0, "b": 1.0, "late": 2.0}, id="heavy-newcomer"),
    pytest.param({"a": 1.0, "b": 1.0, "late": 1.0}, id="equal-newcomer"),
    pytest.param({"a": 2.0, "b": 3.0, "late": 1.0}, id="light-newcomer-beside-2-and-3"),
]


@pytest.mark.parametrize("weights", IDLE_TENANT_CASES)
def test_an_idle_tenant_banks_no_credit(weights: dict[str, float]) -> None:
    backlog = Backlog(weights).join("a").join("b")
    backlog.dispatch(600)  # virtual time moves far ahead while `late` submits nothing
    backlog.join("late")

    after = backlog.dispatch(60)

    share = weights["late"] / sum(weights.values())
    # Banked credit would hand it (nearly) all 60; a fair newcomer gets its weight's share, give or take a job.
    assert after.count("late") == pytest.approx(60 * share, abs=2), after
    assert after[:10].count("late") <= round(10 * share) + 1, after


def test_a_heavier_job_costs_its_tenant_proportionally_more_virtual_time() -> None:
    queue = QueueBuilder().tenant("big").tenant("small").jobs("big", 200, cost=2.0).jobs("small", 200).build()

    counts = Counter(dispatch_next(queue).tenant_id for _ in range(150))

    assert counts == {"small": 100, "big": 50}


PRIORITY_CASES = [
    pytest.param(
        [("j1", 0, 0), ("j2", 5, 0), ("j3", 0, 0), ("j4", 5, 0), ("j5", 1, 0)],
        ["j2", "j4", "j5", "j1", "j3"],
        id="higher-priority-first-then-push-order",
    ),
    pytest.param(
        [("late", 0, 30), ("early", 0, 10), ("middle", 0, 20)],
        ["early", "middle", "late"],
        id="explicit-seq-orders-equal-priorities",
    ),
    pytest.param(
        [("old-low", 0, 1), ("new-high", 2, 9), ("old-high", 2, 3)],
        ["old-high", "new-high", "old-low"],
        id="priority-beats-seq",
    ),
]


@pytest.mark.parametrize(("pushed", "expected"), PRIORITY_CASES)
def test_within_a_tenant_jobs_leave_by_priority_then_seq(
    pushed: list[tuple[str, int, int]], expected: list[str]
) -> None:
    builder = QueueBuilder().tenant("acme")
    for job_id, priority, seq in pushed:
        builder.job(job_id, "acme", priority=priority, seq=seq)
    queue = builder.build()

    assert ids(queue.peek(len(pushed))) == expected
    assert [dispatch_next(queue).job_id for _ in pushed] == expected


def test_peek_does_not_change_the_queue() -> None:
    queue = QueueBuilder().tenant("a", 1).tenant("b", 2).jobs("a", 5).jobs("b", 5).build()
    version, length = queue.version, len(queue)

    first = queue.peek(6)
    second = queue.peek(6)

    assert ids(first) == ids(second)
    assert len(first) == 6
    assert queue.version == version
    assert len(queue) == length
    assert queue.virtual_time() == 0.0
    assert dispatch_next(queue) == first[0]


def test_peek_of_n_names_the_jobs_that_n_dispatches_take() -> None:
    # regression: each real dispatch moved V and re-based waiting tenants, so peek(n) named other jobs
    queue = QueueBuilder().tenant("a", 1).tenant("c", 3).jobs("a", 1).jobs("c", 3).build()

    predicted = ids(queue.peek(3))
    taken = [dispatch_next(queue).job_id for _ in range(3)]

    assert predicted == taken


@pytest.mark.parametrize(
    ("dispatched", "expected_head"),
    [
        pytest.param(False, "a-3", id="cancelled-jobs-are-free"),
        pytest.param(True, "b-1", id="dispatched-jobs-are-charged"),
    ],
)
def test_removing_a_job_charges_its_tenant_only_when_it_was_dispatched(dispatched: bool, expected_head: str) -> None:
    # b-1 finishes at 1.0; a (weight 2) would finish its third job at 0.5 uncharged, 1.5 after two charged jobs.
    queue = (
        QueueBuilder().tenant("a", 2).tenant("b", 1).job("b-1", "b").job("a-1", "a").job("a-2", "a").job("a-3", "a")
    ).build()

    queue.remove("a-1", dispatched=dispatched)
    queue.remove("a-2", dispatched=dispatched)

    assert queue.peek(1)[0].job_id == expected_head
    if not dispatched:
        assert queue.virtual_time() == 0.0


def test_a_light_tenant_is_in_the_next_two_behind_a_heavy_backlog() -> None:
    queue = QueueBuilder().tenant("heavy").tenant("light").jobs("heavy", 10_000).job("light-1", "light").build()

    heads = queue.peek(2)

    assert "light-1" in ids(heads)


def test_depth_by_counts_jobs_per_queue_and_per_tenant() -> None:
    queue = (
        QueueBuilder()
        .tenant("a")
        .tenant("b")
        .jobs("a", 3)
        .job("b-gpu-1", "b", queue="gpu")
        .job("b-gpu-2", "b", queue="gpu")
        .job("b-1", "b")
        .build()
    )

    assert queue.depth_by() == ({"default": 4, "gpu": 2}, {"a": 3, "b": 3})

    queue.remove("b-gpu-1", dispatched=True)
    queue.remove("a-0", dispatched=False)

    assert queue.depth_by() == ({"default": 3, "gpu": 1}, {"a": 2, "b": 2})


def test_a_duplicate_push_is_refused_and_leaves_the_version_alone() -> None:
    queue = QueueBuilder().tenant("a").job("j1", "a").build()
    version = queue.version

    assert queue.push(QueueItem("j1", "a", "default", 1.0)) is False
    assert queue.version == version
    assert len(queue) == 1


def test_removing_an_unknown_job_returns_none_and_leaves_the_version_alone() -> None:
    queue = QueueBuilder().tenant("a").job("j1", "a").build()
    version = queue.version

    assert queue.remove("nope", dispatched=True) is None
    assert queue.version == version


def test_peek_after_a_cancel_behind_the_head_still_returns_limit_jobs() -> None:
    # regression: peek cut each tenant's heap to `limit` entries before dropping cancelled ones
    queue = QueueBuilder().tenant("a").jobs("a", 5).build()
    queue.remove("a-1", dispatched=False)

    assert ids(queue.peek(2)) == ["a-0", "a-2"]


def test_peek_filtered_by_queue_finds_a_job_behind_other_queues_work() -> None:
    # regression: peek filtered by queue after cutting each tenant's heap to `limit` entries
    builder = QueueBuilder().tenant("a")
    for i in range(3):
        builder.job(f"x-{i}", "a", queue="x", priority=5)
    queue = builder.job("y-0", "a", queue="y").build()

    assert ids(queue.peek(1, queue="y")) == ["y-0"]


@pytest.mark.parametrize(
    ("cpu_millis", "memory_mb", "expected"),
    [
        pytest.param(1000, 1024, 1.0, id="one-core-one-gib"),
        pytest.param(2000, 512, 2.0, id="cpu-dominant"),
        pytest.param(500, 4096, 4.0, id="memory-dominant"),
        pytest.param(0, 0, 1e-3, id="floor-for-empty-jobs"),
    ],
)
def test_job_cost_is_the_dominant_resource_in_cores_or_gib(cpu_millis: int, memory_mb: int, expected: float) -> None:
    assert job_cost(cpu_millis, memory_mb) == pytest.approx(expected)


# Fairness over time: windows, newcomers, floods, light tenants beside heavy backlogs ---------------------------


def normalised_spread_per_window(order: tuple[str, ...], weight: dict[str, float]) -> dict[tuple[str, str], float]:
    """For each pair of tenants, the largest |n_i/w_i - n_j/w_j| over every window (contiguous run) of dispatches.

    A window's difference is D(end) - D(start) for the prefix differences D, so the worst window is max D - min D.
    """
    counts = dict.fromkeys(weight, 0)
    pairs = [(i, j) for i in weight for j in weight if i < j]
    low = dict.fromkeys(pairs, 0.0)
    high = dict.fromkeys(pairs, 0.0)
    for tenant in order:
        counts[tenant] += 1
        for i, j in pairs:
            d = counts[i] / weight[i] - counts[j] / weight[j]
            low[(i, j)] = min(low[(i, j)], d)
            high[(i, j)] = max(high[(i, j)], d)
    return {pair: high[pair] - low[pair] for pair in pairs}


@pytest.mark.parametrize("weights", weightings())
def test_in_every_window_weight_normalised_counts_differ_by_at_most_one_job(
    weights: tuple[tuple[str, float], ...],
) -> None:
    spread = normalised_spread_per_window(backlogged_run(weights), dict(weights))

    assert max(spread.values()) <= LAG_BOUND, spread


def test_with_fractional_weights_every_window_stays_within_the_wfq_bound_of_one_job_per_tenant_weight() -> None:
    weights = (("a", 1.0), ("b", 2.5), ("c", 7.0))
    weight = dict(weights)

    spread = normalised_spread_per_window(backlogged_run(weights), weight)

    for (i, j), worst in spread.items():
        assert worst <= 1 / weight[i] + 1 / weight[j] + 1e-9, (i, j, worst)


def test_a_tenant_that_floods_after_idling_takes_its_weight_share_and_starves_no_one() -> None:
    weights = {"a": 1.0, "b": 2.0, "flood": 3.0}
    backlog = Backlog(weights).join("a").join("b")
    backlog.dispatch(900)  # `flood` idles while V moves far ahead
    for i in range(10_000):
        backlog.queue.push(QueueItem(f"flood-{i}", "flood", "default", 1.0))

    after = Counter(backlog.dispatch(600))

    # Exact shares give or take the one job a newcomer may gain by starting at V: no banked credit, no starvation.
    for tenant, expected in {"a": 100, "b": 200, "flood": 300}.items():
        assert after[tenant] == pytest.approx(expected, abs=1), after


def test_a_light_tenants_job_is_the_next_dispatch_while_a_heavy_tenant_has_10000_queued() -> None:
    backlog = Backlog({"heavy": 1.0, "light": 1.0}, depth=10_000).join("heavy")
    backlog.dispatch(500)
    backlog.queue.push(QueueItem("light-1", "light", "default", 1.0))

    assert dispatch_next(backlog.queue).job_id == "light-1"


def test_a_light_tenants_job_starts_at_the_next_worker_release_behind_10000_heavy_jobs() -> None:
    heavy = [SimJob(f"heavy-{i}", "heavy", run_seconds=1.0) for i in range(10_000)]
    light = SimJob("light-1", "light", submit_at=20.5, run_seconds=1.0)

    result = Simulation({"heavy": 1.0, "light": 1.0}, workers=4).run([*heavy, light], max_starts=200)

    # Four workers start together every second; the first release after 20.5 s is at 21 s.
    assert result.start_of("light-1") == pytest.approx(21.0)
    assert sum(1 for s in result.starts if s.at == pytest.approx(21.0) and s.job.tenant_id == "heavy") <= 3


def test_three_tenants_weighted_1_2_3_on_two_workers_share_3000_starts_within_two_percent() -> None:
    weights = {"acme": 1.0, "globex": 2.0, "initech": 3.0}
    jobs = [SimJob(f"{t}-{i}", t, run_seconds=0.05) for t in weights for i in range(3000)]

    result = Simulation(weights, workers=2).run(jobs, max_starts=3000)

    shares = result.shares()
    for tenant, w in weights.items():
        assert shares[tenant] == pytest.approx(w / 6, abs=0.02), shares
    assert jain_index(shares, weights) >= 0.99


# The SLA boost ----------------------------------------------------------------------------------------------------

TIERS = SlaPolicy({"gold": 30.0, "standard": 300.0, "batch": 3600.0}, "standard")


def gold_behind_batch(policy: SlaPolicy, batch_jobs: int = 1000) -> tuple[float, SimResult]:
    """One tenant's gold job submitted a second after its own batch backlog, two workers, 0.1 s jobs."""
    jobs = [SimJob(f"batch-{i}", "acme", run_seconds=0.1, tier="batch") for i in range(batch_jobs)]
    jobs.append(SimJob("gold-1", "acme", submit_at=1.0, run_seconds=0.1, tier="gold"))
    result = Simulation({"acme": 1.0}, workers=2, policy=policy).run(jobs)
    return result.start_of("gold-1") - 1.0, result


def test_a_gold_job_submitted_behind_1000_batch_jobs_starts_within_its_target_wait() -> None:
    waited, result = gold_behind_batch(TIERS)

    assert waited <= 30.0
    assert waited == pytest.approx(15.0, abs=0.1)  # boosted at half its target, then the next worker release
    assert result.compliance(TIERS)["gold"] == 1.0


def test_without_the_boost_the_same_gold_job_would_miss_its_target() -> None:
    no_boost = SlaPolicy(TIERS.targets, TIERS.default_tier, boost_fraction=1.0, start_slack_seconds=0.0)

    waited, result = gold_behind_batch(no_boost)

    assert waited > 30.0
    assert result.compliance(no_boost)["gold"] == 0.0


def test_when_overload_makes_every_job_urgent_tenants_still_share_by_weight() -> None:
    # Standard jobs are boosted after 150 s; this backlog takes 2,250 s to drain, so nearly all of it runs boosted.
    weights = {"acme": 1.0, "globex": 2.0, "initech": 3.0}
    jobs = [SimJob(f"{t}-{i}", t, run_seconds=1.0, tier="standard") for t in weights for i in range(3000)]

    result = Simulation(weights, workers=4, policy=TIERS).run(jobs, max_starts=4500)

    for tenant, share in result.shares().items():
        assert share == pytest.approx(weights[tenant] / 6, abs=0.01)


def test_urgent_jobs_of_different_tenants_take_turns_by_weight_each_tenants_earliest_due_first() -> None:
    queue = QueueBuilder().tenant("a").tenant("b", 2).build()
    for i, due in enumerate([50.0, 40.0, 60.0]):
        queue.push(urgent(f"a-{due:.0f}", "a", due=due, seq=i + 1))
        queue.push(urgent(f"b-{due + 100:.0f}", "b", due=due + 100, seq=i + 10))

    order = ids(queue.peek(6, now=0.0))

    # b (weight 2) finishes at 0.5, 1, 1.5 and a at 1, 2, 3; at the tie a's job is due first. Strict earliest-due
    # order would have run all of a's jobs before any of b's.
    assert order == ["b-140", "a-40", "b-150", "b-160", "a-50", "a-60"]


def urgent(job_id: str, tenant: str, due: float, *, urgent_at: float = 0.0, seq: int = 0) -> QueueItem:
    return QueueItem(job_id, tenant, "default", 1.0, 0, seq, urgent_at, due)


def test_urgent_jobs_leave_before_all_others_earliest_due_first() -> None:
    queue = QueueBuilder().tenant("a").tenant("b", 5).jobs("b", 5).build()
    queue.push(urgent("late-due", "a", due=90.0))
    queue.push(urgent("early-due", "a", due=60.0))
    queue.push(urgent("not-yet", "a", due=50.0, urgent_at=40.0))

    at_10 = ids(queue.peek(3, now=10.0))
    at_45 = ids(queue.peek(3, now=45.0))

    assert at_10 == ["early-due", "late-due", "b-0"]
    assert at_45 == ["not-yet", "early-due", "late-due"]


def test_a_boosted_dispatch_is_charged_to_its_tenant() -> None:
    queue = QueueBuilder().tenant("a").tenant("b").jobs("a", 3).jobs("b", 3).build()
    queue.push(urgent("a-urgent", "a", due=5.0, seq=99))

    taken = [queue.pop(now=1.0).job_id for _ in range(4)]  # type: ignore[union-attr]

    # a's urgent job went first and cost a a turn: b is served twice before a again.
    assert taken == ["a-urgent", "b-0", "a-0", "b-1"]


def test_a_job_becomes_urgent_only_when_its_boost_time_comes() -> None:
    queue = QueueBuilder().tenant("a").jobs("a", 3).build()
    queue.push(QueueItem("a-late", "a", "default", 1.0, 0, 100, urgent_at=15.0, due=30.0))
    version = queue.version

    assert queue.next_boost() == 15.0
    assert queue.promote(14.9) == 0
    assert queue.version == version
    assert queue.promote(15.0) == 1
    assert queue.version > version
    assert queue.next_boost() == float("inf")
    assert ids(queue.peek(1)) == ["a-late"]


# Position: what GetJob shows -----------------------------------------------------------------------------------


def random_queue(seed: int) -> tuple[WeightedFairQueue, float]:
    """Many tenants, weights, priorities, sizes, queues, cancels, dispatches and boosts, all from one seed."""
    rng = random.Random(seed)
    tenants = {f"t{i}": rng.choice([1.0, 2.0, 3.0, 0.5, 7.0]) for i in range(6)}
    queue = WeightedFairQueue(tenants)
    now = 0.0
    for n in range(600):
        now += rng.random() * 0.2
        roll = rng.random()
        if roll < 0.6 or len(queue) < 5:
            boost = now + rng.choice([5.0, 20.0, float("inf")])
            queue.push(
                QueueItem(
                    f"j{n}",
                    rng.choice(list(tenants)),
                    rng.choice(["default", "default", "big"]),
                    rng.choice([0.1, 0.25, 1.0, 2.0]),
                    rng.choice([0, 0, 0, 5, -3]),
                    n + 1,
                    boost,
                    boost + 10.0,
                )
            )
        elif roll < 0.85:
            queue.pop(rng.choice(["default", "big"]), now=now)
        else:
            victim = rng.choice(queue.peek(len(queue)))
            queue.remove(victim.job_id, dispatched=rng.random() < 0.5)
    return queue, now


@pytest.mark.parametrize("seed", range(5))
def test_every_jobs_position_is_its_place_in_its_queues_dispatch_order(seed: int) -> None:
    queue, now = random_queue(seed)

    for name in queue.queues():
        order = queue.peek(len(queue), queue=name, now=now)
        for index, item in enumerate(order):
            placement = queue.position(item.job_id, now=now)
            assert placement is not None
            ahead = order[:index]
            assert placement.position == index + 1, (item, placement)
            assert placement.ahead_same_tenant == sum(1 for a in ahead if a.tenant_id == item.tenant_id)
            assert placement.ahead_other_tenants == sum(1 for a in ahead if a.tenant_id != item.tenant_id)


@pytest.mark.parametrize("seed", range(3))
def test_the_predicted_order_is_the_order_in_which_the_jobs_actually_leave(seed: int) -> None:
    queue, now = random_queue(seed)
    predicted = {name: ids(queue.peek(len(queue), queue=name, now=now)) for name in queue.queues()}

    taken = {name: [queue.pop(name, now=now).job_id for _ in order] for name, order in predicted.items()}  # type: ignore[union-attr]

    assert taken == predicted
    assert len(queue) == 0


def test_positions_count_other_tenants_ahead_of_a_light_job_behind_a_heavy_backlog() -> None:
    queue = QueueBuilder().tenant("heavy").tenant("light").jobs("heavy", 10_000).jobs("light", 3).build()

    first, third = queue.position("light-0"), queue.position("light-2")

    assert first == Placement(2, 0, 1, urgent=False)  # tie at finish 1.0: heavy-0 was submitted first
    assert third == Placement(6, 2, 3, urgent=False)
    assert queue.position("nope") is None


def test_merged_peek_interleaves_queues_by_finish_tag_relative_to_their_virtual_time() -> None:
    queue = QueueBuilder().tenant("a").tenant("c", 3).jobs("a", 3, queue="gpu").jobs("c", 6).build()

    assert ids(queue.peek(6)) == ["c-0", "c-1", "a-0", "c-2", "c-3", "c-4"]


# Durability: same tags, same order after a restart ---------------------------------------------------------------


def rebuilt(queue: WeightedFairQueue, weights: dict[str, float], seed: int) -> WeightedFairQueue:
    """What a restart does: a new queue, the persisted tags, then the pending jobs in another order."""
    again = WeightedFairQueue(weights)
    again.restore(queue.tags())
    pending = queue.peek(len(queue))
    random.Random(seed).shuffle(pending)
    for item in pending:
        again.push(item)
    again.end_restore()
    return again


@pytest.mark.parametrize("seed", range(3))
def test_a_queue_rebuilt_from_its_tags_and_pending_jobs_has_the_same_order_and_positions(seed: int) -> None:
    queue, now = random_queue(seed)
    weights = dict(queue.weights)

    again = rebuilt(queue, weights, seed)

    for name in queue.queues():
        assert ids(again.peek(len(again), queue=name, now=now)) == ids(queue.peek(len(queue), queue=name, now=now))
        assert again.virtual_time(name) == queue.virtual_time(name)
    for item in queue.peek(50):
        assert again.position(item.job_id, now) == queue.position(item.job_id, now)


def test_a_tenant_backlogged_at_the_snapshot_keeps_its_start_tag_instead_of_catching_up_with_v() -> None:
    # b joined when V was 0 and has not been served since: after a restart it must not be re-based to V.
    queue = QueueBuilder().tenant("a", 4).tenant("b").jobs("a", 200).build()
    for _ in range(100):
        dispatch_next(queue)
    queue.push(QueueItem("b-0", "b", "default", 1.0))
    queue.push(QueueItem("b-1", "b", "default", 1.0))
    before = ids(queue.peek(20))

    again = rebuilt(queue, {"a": 4, "b": 1}, seed=1)

    assert ids(again.peek(20)) == before


def test_a_tenant_restored_as_backlogged_whose_jobs_have_gone_is_idle_at_its_finish_tag() -> None:
    queue = QueueBuilder().tenant("a").tenant("b").jobs("a", 10).jobs("b", 10).build()
    for _ in range(10):
        dispatch_next(queue)
    again = WeightedFairQueue({"a": 1, "b": 1})
    again.restore(queue.tags())
    for i in range(10):  # b's jobs were dispatched while the service was down: only a's come back
        again.push(QueueItem(f"a-late-{i}", "a", "default", 1.0))
    again.end_restore()

    again.push(QueueItem("b-new", "b", "default", 1.0))

    # b resumes at its own finish tag 5 (b-new finishes at 6, tying a-late-0 and losing the tie as the later
    # submission); a tenant re-based to V = 4 would finish at 5 and jump ahead.
    assert again.virtual_time() == 4.0
    assert ids(again.peek(3)) == ["a-late-0", "b-new", "a-late-1"]


def test_tags_leave_out_idle_tenants_that_a_restart_would_treat_as_new_anyway() -> None:
    queue = QueueBuilder().tenant("a").tenant("b").jobs("a", 5).jobs("b", 1).build()
    for _ in range(6):
        dispatch_next(queue)
    queue.push(QueueItem("a-again", "a", "default", 1.0))
    queue.forget_idle_tenants()

    tags = queue.tags()["default"]

    assert set(tags.tenants) == {"a"}
    assert tags.tenants["a"].backlogged


# Weights ------------------------------------------------------------------------------------------------------


def test_a_new_weight_changes_shares_from_then_on_without_refunding_past_service() -> None:
    backlog = Backlog({"a": 1.0, "b": 1.0}).join("a").join("b")
    backlog.dispatch(100)

    backlog.queue.set_weight("b", 3.0)
    after = Counter(backlog.dispatch(400))

    assert after["b"] == pytest.approx(300, abs=2)
    assert after["a"] == pytest.approx(100, abs=2)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_a_weight_that_is_not_positive_is_refused(weight: float) -> None:
    with pytest.raises(ValueError):
        WeightedFairQueue().set_weight("a", weight)


def test_a_removal_bumps_the_version_only_when_jobs_are_left_to_offer() -> None:
    queue = QueueBuilder().tenant("a").job("j1", "a").job("j2", "a").build()
    version = queue.version

    queue.remove("j1", dispatched=True)  # j2 is a new head: a reader waiting past `version` must wake
    assert queue.version == version + 1
    queue.remove("j2", dispatched=True)  # nothing left: nobody has anything new to read
    assert queue.version == version + 1 and len(queue) == 0
    queue.push(QueueItem("j3", "a", "default", 1.0))
    assert queue.version == version + 2
