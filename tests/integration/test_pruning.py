"""Pruning by age and count against a real etcd: worker lifetimes fold into daily capacity so reports over their
days stay the same (also across a restart and a lost reply), the burst audit and each pool's scaling history keep
their newest entries, and only the pool-manager leader prunes (every delete fenced by leadership)."""

from __future__ import annotations

import json

import pytest

from libs.clock import FakeClock
from libs.config import Pruning
from libs.errors import NotLeader
from libs.etcd.client import Etcd, KeyValue, WatchEvent
from libs.etcd.election import LeaderElection
from libs.pruning import HistoryPruner, list_keys
from services.cost.idle import WorkerInterval
from services.poolmanager.app import scaling_entries
from services.quota.app import audit_entries, audit_handler
from services.quota.manager import BurstPolicy, BurstSession, QuotaManager
from tests.integration.test_cost_rollup import CONFIG, COST_KEYS, DAY, KEYS, MIDNIGHT, LostReply, Service, charged
from tests.unit.cost_builders import HOUR

pytestmark = pytest.mark.asyncio

NOW = MIDNIGHT + 20 * DAY
# Six ended lifetimes, one a day (the last ends on day 6), and one worker still alive.
LIFETIMES = [
    WorkerInterval(
        f"w{i}",
        "static-general" if i % 2 else "dynamic-large",
        MIDNIGHT + i * DAY - 5 * HOUR,
        MIDNIGHT + i * DAY + 7 * HOUR,
        1000 * (1 + i % 2),
        1024,
    )
    for i in range(1, 7)
] + [WorkerInterval("alive", "static-general", MIDNIGHT - DAY, None, 1000, 1024)]


async def with_lifetimes(etcd: Etcd) -> Service:
    service = await charged(etcd, FakeClock(NOW))
    workers = service.accounts.workers
    for interval in LIFETIMES:
        workers.lifetimes.restore(interval)
        workers.dirty.add(interval.worker_id)
    await workers.flush()
    assert not workers.dirty
    return service


def whole_days(service: Service) -> list[object]:
    return [service.accounts.reports("", MIDNIGHT + d * DAY, MIDNIGHT + (d + 3) * DAY) for d in range(-1, 7, 3)]


async def test_pruning_worker_lifetimes_keeps_the_newest_and_leaves_reports_unchanged(etcd: Etcd) -> None:
    service = await with_lifetimes(etcd)
    before = whole_days(service)
    assert all(r.idle_micros != 0 for r in before)  # type: ignore[attr-defined]

    pruned = await service.accounts.workers.prune(Pruning(0, 2))

    assert pruned == 4
    kept = sorted(kv.key.rsplit("/", 1)[-1] for kv in await list_keys(etcd, COST_KEYS.workers))
    assert kept == ["alive", "w5", "w6"]  # the two that ended last, and the live one
    assert await list_keys(etcd, COST_KEYS.capacity)
    assert whole_days(service) == before
    assert service.metric("jobmesh_cost_worker_lifetimes_pruned_total") == 4
    restarted = Service(etcd, service.clock)
    await restarted.load(etcd)
    await restarted.accounts.workers.load()
    assert whole_days(restarted) == before
    assert await restarted.accounts.workers.prune(Pruning(0, 2)) == 0


async def test_pruning_worker_lifetimes_by_age_and_after_a_lost_reply_counts_capacity_once(etcd: Etcd) -> None:
    service = await with_lifetimes(etcd)
    before = whole_days(service)
    workers = service.accounts.workers
    workers.store = LostReply(etcd)  # applied by etcd, the reply lost

    assert await workers.prune(Pruning(NOW - (MIDNIGHT + 4 * DAY), 100)) == 0  # w1..w3 ended before day 4

    # It re-read what is stored: the pruned lifetimes are gone and their capacity is in the aggregates, once.
    assert sorted(w.worker_id for w in workers.intervals) == ["alive", "w4", "w5", "w6"]
    assert whole_days(service) == before
    workers.store = etcd
    assert await workers.prune(Pruning(NOW - (MIDNIGHT + 4 * DAY), 100)) == 0
    assert whole_days(service) == before


async def test_the_burst_audit_keeps_its_newest_entries_within_the_age(etcd: Etcd) -> None:
    clock = FakeClock(NOW)
    manager = QuotaManager(CONFIG, clock, BurstPolicy())
    handle = audit_handler(manager)
    for i in range(12):
        session = BurstSession(f"s-{i}", "acme", 100, 64, 1, NOW - (12 - i) * DAY, NOW - (12 - i) * DAY + 600)
        key = KEYS.burst_audit(int(session.start * 1000), session.session_id)
        revision = await etcd.put(key, json.dumps(session.__dict__).encode())
        handle(WatchEvent("put", KeyValue(key, json.dumps(session.__dict__).encode(), revision, revision, 1, 0), 0))
    counter = _Count()
    pruner = HistoryPruner(
        "burst-audit", lambda: audit_entries(etcd, KEYS), etcd.txn, Pruning(9.5 * DAY, 6), clock, counter
    )

    assert await pruner.run_once() == 6
    kept = [kv.key for kv in await list_keys(etcd, KEYS.burst_audits)]
    assert [k.rsplit("-", 1)[-1] for k in kept] == ["6", "7", "8", "9", "10", "11"]
    assert counter.value == 6
    # The quota service forgets what was pruned, as its informer hands it the deletes.
    for i in range(6):
        key = KEYS.burst_audit(int((NOW - (12 - i) * DAY) * 1000), f"s-{i}")
        handle(WatchEvent("delete", KeyValue(key, b"", 0, 0, 0, 0), 0))
    assert [s.session_id for s in manager.audit] == [f"s-{i}" for i in range(6, 12)]
    assert await pruner.run_once() == 0


async def test_only_the_pool_manager_leader_prunes_each_pool_s_scaling_history(etcd: Etcd) -> None:
    clock = FakeClock(NOW)
    for pool in ("static-general", "dynamic-large"):
        for i in range(15):
            await etcd.put(KEYS.scaling_event(pool, int((NOW - i * HOUR) * 1000)), b"{}")
    election = LeaderElection(etcd, KEYS.leader("pool-manager"), "replica-a", ttl=5)
    counter = _Count()
    pruner = HistoryPruner(
        "scaling-event",
        lambda: scaling_entries(etcd, KEYS, CONFIG),
        election.fenced_txn,
        Pruning(0, 10),
        clock,
        counter,
        may_run=lambda: election.is_leader,
    )

    assert await pruner.run_once() == 0  # not the leader: does not even look
    pruner.may_run = lambda: True
    with pytest.raises(NotLeader):
        await pruner.run_once()  # and were it to try, the fence refuses
    assert len(await list_keys(etcd, KEYS.scaling_events("static-general"))) == 15

    election.start()
    try:
        await election.wait_leader()
        assert await pruner.run_once() == 10
    finally:
        await election.stop()
    for pool in ("static-general", "dynamic-large"):
        kept = await list_keys(etcd, KEYS.scaling_events(pool))
        assert [kv.key for kv in kept] == [
            KEYS.scaling_event(pool, int((NOW - i * HOUR) * 1000)) for i in range(9, -1, -1)
        ]


class _Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount
