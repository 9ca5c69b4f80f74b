"""Leader terms against a real etcd, as jobmesh_leader_terms_total / jobmesh_leader_losses_total count them: a
term a replica resigns is not a loss; a term taken from it (its key deleted under it, another replica's key in
its place) is one, with the reason that ended it; the other replica then begins its own term."""

from __future__ import annotations

import asyncio

import pytest

from libs.errors import NotLeader
from libs.etcd.client import Etcd, op_put
from libs.etcd.election import LOSSES, TERMS, LeaderElection
from libs.keys import Keys

pytestmark = pytest.mark.asyncio

KEYS = Keys("/jobmesh-test-election")


def count(metric: object, **labels: str) -> float:
    return metric.labels(**labels)._value.get()  # type: ignore[attr-defined]


async def test_a_resigned_term_is_not_a_loss_and_a_taken_one_is_counted_by_why(etcd: Etcd) -> None:
    key = KEYS.leader("scheduler")
    terms, fenced = count(TERMS, election="scheduler"), count(LOSSES, election="scheduler", reason="fence")
    a = LeaderElection(etcd, key, "replica-a", ttl=3)
    b = LeaderElection(etcd, key, "replica-b", ttl=3)
    a.start()
    lead = await asyncio.wait_for(a.wait_leader(), 10)
    b.start()
    try:
        assert count(TERMS, election="scheduler") == terms + 1
        # Someone deletes a's key and b takes the vacancy: a's next fenced write finds b's term, a's ends.
        await etcd.delete(key)
        await asyncio.wait_for(b.wait_leader(), 10)
        with pytest.raises(NotLeader):
            await a.fenced_txn([], [op_put(KEYS.leader("scheduler") + "-probe", b"x")], token=lead)
        assert not a.is_leader
        assert count(LOSSES, election="scheduler", reason="fence") == fenced + 1
        assert count(TERMS, election="scheduler") == terms + 2
        lost = sum(count(LOSSES, election="scheduler", reason=r) for r in ("fence", "renewal", "store", "crash"))
    finally:
        await a.stop()
        await b.stop()  # b resigns a term it still held: not a loss
    assert sum(count(LOSSES, election="scheduler", reason=r) for r in ("fence", "renewal", "store", "crash")) == lost
