"""The scheduling loop (leader only): match queued jobs to workers with room, in numbered, timed phases.

Each cycle takes the leadership token first and fences every write with it, so a cycle begun under one term
never writes in the next. The parts are modules of their own: capacity.py (the snapshot of workers with room),
queue_client.py (the fair queue's heads), placement.py (pure nomination), dispatcher.py (fenced admission)."""

from __future__ import annotations

import asyncio
import logging
import time

from libs.clock import Clock
from libs.config import MeshConfig
from libs.etcd.election import LeaderElection, run_while_leader
from libs.etcd.informer import Informer
from libs.keys import Keys
from services.scheduler.capacity import Capacity
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.placement import nominate
from services.scheduler.queue_client import NextJobsStub, QueueClient

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        keys: Keys,
        config: MeshConfig,
        clock: Clock,
        election: LeaderElection,
        workers: Informer,
        assignments: Informer,
        queueing: NextJobsStub,
        metrics: SchedulerMetrics,
        min_interval: float = 0.0,
    ):
        # After a cycle that placed jobs, the next starts no sooner than this after it (Slurm's
        # sched_min_interval): under load, freed room and new jobs gather and go out in one transaction.
        self.min_interval = min_interval
        self.clock = clock
        self.election = election
        self.informers = (workers, assignments)
        self.metrics = metrics
        self.capacity = Capacity(config, clock, workers, assignments, etcd_term=lambda: workers.etcd.raft_term)
        self.queue = QueueClient(queueing)
        self.dispatcher = Dispatcher(keys, clock, election, self.capacity, metrics)
        self.on_change = self.capacity.on_worker
        self.on_assignment = self.capacity.on_assignment

    @property
    def dispatched(self) -> int:
        return self.dispatcher.dispatched

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch_while_leading(), name="scheduler-informers")
        try:
            await run_while_leader(self.election, self.schedule_once, self.metrics.leader, "scheduling")
        finally:
            watcher.cancel()

    async def _watch_while_leading(self) -> None:
        """Only the leader keeps the worker and assignment caches: a standby would decode every change for
        nothing. Taking over lists both prefixes afresh (milliseconds), well inside the lease TTL."""
        try:
            while True:
                await self.election.wait_leader()
                for informer in self.informers:
                    if not informer.running:
                        informer.start()
                while self.election.is_leader:
                    self.election.changed.clear()
                    await self.election.changed.wait()
                for informer in self.informers:
                    await informer.stop(forget=True)
                self.capacity.forget_claims()
        finally:
            for informer in self.informers:
                await informer.stop()

    def _phase(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.metrics.phase.labels(name).observe(now - start)
        return now

    async def schedule_once(self) -> None:
        for informer in self.informers:
            await informer.wait_synced()  # just after taking over, until the first list is in
        started = time.perf_counter()
        # Phase 0: the leadership this cycle acts under; every write below is fenced by it.
        token = self.election.token()
        # Phase 1: snapshot the workers with room.
        self.capacity.changed.clear()
        epoch = self.capacity.epoch
        idle = self.capacity.snapshot()
        self.metrics.unheard.set(self.capacity.unheard)
        mark = self._phase("1_snapshot", started)
        if not idle:
            await self._wait_for_capacity(1.0)
            return
        # Phase 2: heads of the fair queue (long-poll when nothing changed since a fruitless cycle).
        heads = await self.queue.heads(sum(c.slots for c in idle), epoch, self.capacity.changed)
        mark = self._phase("2_heads", mark)
        # Phase 3: nominate a worker for each head, in queue order.
        plan = nominate(heads, idle, self.clock.now())
        self.metrics.unplaced.set(len(heads) - len(plan))
        mark = self._phase("3_nominate", mark)
        # Phase 4: admit, in fenced transactions (the whole plan in one while nothing raced it).
        placed = await self.dispatcher.admit(plan, token)
        mark = self._phase("4_admit", mark)
        # Phase 5: settle: a fruitless cycle makes the next wait for the queue or the workers to change.
        self.queue.settle(placed, epoch)
        self._phase("5_settle", mark)
        if placed and self.min_interval > 0:
            rest = self.min_interval - (time.perf_counter() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _wait_for_capacity(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.capacity.changed.wait(), timeout)
        except TimeoutError:
            pass
        self.capacity.changed.clear()
