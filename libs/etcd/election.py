"""Leader election on an etcd lease, and fenced writes that only the current leader can make."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import Counter

from libs.errors import JobMeshError, NotLeader, Unavailable
from libs.etcd.client import (
    Compare,
    Etcd,
    RequestOp,
    TxnResult,
    WatchCompacted,
    cmp_create,
    cmp_missing,
    op_put,
)

log = logging.getLogger(__name__)

# Every replica's terms (a service registers these in its registry: see libs/main.py). A loss is a term that ended
# without this replica resigning: a flapping leadership, e.g. a leader that cannot renew its lease in time on a
# starved machine, shows here (alert LeaderFlapping) and in the benchmarks (issue 17).
TERMS = Counter("jobmesh_leader_terms_total", "Terms this replica began as leader.", ["election"], registry=None)
LOSSES = Counter(
    "jobmesh_leader_losses_total",
    "Terms that ended without this replica resigning, by why: renewal (the lease could not be renewed in time), "
    "store (etcd unreachable), fence (a fenced write found another leader), crash (the campaign failed).",
    ["election", "reason"],
    registry=None,
)


@dataclass(frozen=True)
class Leadership:
    """Proof of leadership: the leader key's create revision. Every leader write compares it."""

    key: str
    revision: int
    lease_id: int


class LeaderElection:
    """Campaigns for `key`; `leadership` is set while this replica leads and cleared the moment it may not."""

    def __init__(self, etcd: Etcd, key: str, identity: str, ttl: int = 3):
        self.etcd = etcd
        self.key = key
        self.identity = identity
        self.ttl = ttl
        self.leadership: Leadership | None = None
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._resign = False
        self._term_over = asyncio.Event()  # set when the current term ends
        self.name = key.rstrip("/").rsplit("/", 1)[-1]  # the metrics' `election` label

    @property
    def is_leader(self) -> bool:
        return self.leadership is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"election:{self.key}")

    async def stop(self) -> None:
        """Resign: revoke our lease so the other replica takes over at once."""
        self._resign = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        lead = self.leadership
        self._lose()
        if lead is not None:
            log.info("resigned leadership of %s", self.key)
            await self.etcd.revoke(lead.lease_id)

    def _lose(self, reason: str = "") -> None:
        """Ends the term, if any: `reason` says why when this replica did not resign (see LOSSES)."""
        if self.leadership is not None and reason:
            log.warning("lost leadership of %s (%s)", self.key, reason)
            LOSSES.labels(self.name, reason).inc()
        self.leadership = None
        self._term_over.set()
        self.changed.set()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The campaign; done only after `stop` or when it died (see libs/leadergate.py, which acts on that)."""
        return self._task

    async def _run(self) -> None:
        try:
            while not self._resign:
                try:
                    await self._campaign_once()
                except Unavailable as exc:
                    log.warning("election %s: %s", self.key, exc)
                    self._lose("store")
                    await asyncio.sleep(0.5)
        except Exception:
            # Never silently: a replica whose campaign is dead must not look like a healthy standby.
            log.exception("election %s died", self.key)
            self._lose("crash")
            raise

    async def _campaign_once(self) -> None:
        granted = time.monotonic()  # the lease lasts at least its TTL from here
        lease_id = await self.etcd.grant(self.ttl)
        result = await self.etcd.txn([cmp_missing(self.key)], [op_put(self.key, self.identity.encode(), lease_id)])
        if not result.succeeded:
            await self.etcd.revoke(lease_id)
            await self._wait_for_vacancy()
            return
        kv = await self.etcd.get(self.key)
        if kv is None or kv.lease != lease_id:
            return
        lead = self.leadership = Leadership(self.key, kv.create_revision, lease_id)
        TERMS.labels(self.name).inc()
        self._term_over = asyncio.Event()
        self.changed.set()
        log.info("became leader of %s at revision %d", self.key, kv.create_revision)
        # The lease is renewed off the event loop (a busy loop must not end the term); the term ends when the
        # keeper gives up (before the lease can have expired), a fenced write finds another leader, or we stop.
        loop = asyncio.get_running_loop()

        def lost() -> None:  # on the keeper's thread
            with contextlib.suppress(RuntimeError):  # the loop is already closed: the process is ending
                loop.call_soon_threadsafe(self._expired, lead)

        keeper = self.etcd.lease_keeper(lease_id, self.ttl, lost, since=granted)
        keeper.start()
        try:
            await self._term_over.wait()
        finally:
            keeper.stop()
        await self.etcd.revoke(lease_id)  # a term lost to a fence leaves a live lease behind

    def _expired(self, lead: Leadership) -> None:
        if self.leadership == lead:
            self._lose("renewal")

    async def _wait_for_vacancy(self) -> None:
        """Returns once the leader key is gone: at once through a watch on it (a crashed leader's key goes when
        its lease expires), re-reading it now and then in case a watch event is missed."""
        while not self._resign:
            (kv,), revision = await self.etcd.get_many([self.key])
            if kv is None:
                return
            try:
                await asyncio.wait_for(self._key_deleted(revision + 1), timeout=self.ttl)
                return
            except (TimeoutError, WatchCompacted):
                continue

    async def _key_deleted(self, start_revision: int) -> None:
        async for batch in self.etcd.watch(self.key, start_revision):
            if any(e.kind == "delete" and e.kv.key == self.key for e in batch):
                return

    async def wait_leader(self) -> Leadership:
        while self.leadership is None:
            self.changed.clear()
            await self.changed.wait()
        return self.leadership

    def token(self) -> Leadership:
        """The leadership a leader cycle holds from its start: every write of the cycle is fenced by it, so a cycle
        that began under one term never writes in the next (NotLeader when this replica does not lead)."""
        lead = self.leadership
        if lead is None:
            raise NotLeader(f"not the leader of {self.key}")
        return lead

    async def fenced_txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[RequestOp],
        failure: Sequence[RequestOp] = (),
        *,
        token: Leadership | None = None,
    ) -> TxnResult:
        """A transaction that also requires our leader key to be unchanged (the one `token` names, when given);
        fails with NotLeader otherwise."""
        lead = self.leadership
        if lead is None or (token is not None and token != lead):
            raise NotLeader(f"not the leader of {self.key}" if lead is None else f"leadership of {self.key} changed")
        fence = cmp_create(lead.key, lead.revision)
        result = await self.etcd.txn([fence, *compare], success, failure)
        if not result.succeeded:
            # Tell a lost fence from a lost race on the caller's own compares.
            kv = await self.etcd.get(lead.key)
            if kv is None or kv.create_revision != lead.revision:
                self._lose("fence")
                raise NotLeader(f"leadership of {self.key} was lost")
        return result


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


async def run_while_leader(
    election: LeaderElection, cycle: Callable[[], Awaitable[None]], leader_gauge: _Gauge, what: str
) -> None:
    """Runs `cycle` over and over while this replica leads; waits for leadership otherwise. A failed cycle is
    logged and retried shortly; a lost fence ends the turn at once."""
    while True:
        await election.wait_leader()
        leader_gauge.set(1)
        try:
            await cycle()
        except NotLeader:
            pass
        except (JobMeshError, grpc.aio.AioRpcError) as exc:
            log.warning("%s cycle failed: %s", what, exc)
            await asyncio.sleep(0.2)
        except Exception:
            log.exception("%s cycle crashed", what)
            await asyncio.sleep(0.5)
        leader_gauge.set(1 if election.is_leader else 0)
