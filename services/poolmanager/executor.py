"""Applies the reconciler's actions (leader only): every write fenced by the cycle's leadership token, and the
controller's memory updated with what was done."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.etcd.client import KeyValue, TxnResult, op_put
from libs.etcd.election import LeaderElection, Leadership
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.lifecycle import txns
from libs.lifecycle.store import JobStore
from libs.lifecycle.txns import Txn
from services.poolmanager.metrics import ControllerMetrics
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.provider import WorkerProvider
from services.poolmanager.reconciler import (
    Action,
    Memory,
    NoteIdle,
    PoolStatus,
    Reclaim,
    Refuse,
    Retire,
    ScaleDown,
    ScaleUp,
    StopDrained,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingDecision:
    time: float
    pool_id: str
    direction: str  # "up" | "down"
    from_workers: int
    to_workers: int
    trigger: str
    reason: str
    executed: bool


class ActionExecutor:
    def __init__(
        self,
        keys: Keys,
        clock: Clock,
        election: LeaderElection,
        workers: Informer,
        store: JobStore,
        provider: WorkerProvider,
        metrics: ControllerMetrics,
        outcomes: JobOutcomes,
        memory: Memory,
    ):
        self.keys = keys
        self.clock = clock
        self.election = election
        self.workers = workers
        self.store = store
        self.provider = provider
        self.metrics = metrics
        self.outcomes = outcomes
        self.memory = memory

    async def apply(self, actions: list[Action], token: Leadership) -> None:
        for action in actions:
            await self._apply(action, token)

    async def _apply(self, action: Action, token: Leadership) -> None:
        match action:
            case Reclaim(worker_id, assignment):
                await self._reclaim(worker_id, assignment, token)
            case StopDrained(worker):
                self._stop(worker)
                self.metrics.retired.labels(worker.pool_id).inc()
                log.info("stopped drained worker %s", worker.worker_id)
            case Retire(worker):
                if await self._drain(worker, token):
                    self.metrics.retired.labels(worker.pool_id).inc()
                    log.info("retired worker %s after %d jobs", worker.worker_id, worker.jobs_run)
            case PoolStatus(pool_id, busy, idle, starting):
                self.metrics.workers.labels(pool_id, "busy").set(busy)
                self.metrics.workers.labels(pool_id, "idle").set(idle)
                self.metrics.workers.labels(pool_id, "provisioning").set(starting)
            case NoteIdle(worker_id, at):
                self.memory.idle_since.setdefault(worker_id, at)
            case ScaleUp(pool, count, current, trigger, reason):
                for _ in range(count):
                    self.provider.provision(pool)
                await self._record(pool.pool_id, "up", current, current + count, trigger, reason, True, token)
            case ScaleDown(pool, workers, current, reason):
                removed = sum([await self._drain(w, token) for w in workers])
                if removed:
                    await self._record(
                        pool.pool_id, "down", current, current - removed, "idle_workers", reason, True, token
                    )
            case Refuse(pool, direction, current, to, trigger, reason):
                self.memory.last_refusal[(pool.pool_id, direction)] = self.clock.monotonic()
                await self._record(pool.pool_id, direction, current, to, trigger, reason, False, token)

    async def _reclaim(self, worker_id: str, assignment: KeyValue, token: Leadership) -> None:
        async def commit(txn: Txn) -> TxnResult:
            return await self.election.fenced_txn(txn.compares, txn.ops, token=token)

        job = await self.store.reclaim(worker_id, assignment, self.clock.now(), commit)
        if job is not None:
            log.warning(
                "worker %s lost during attempt %d: %s",
                worker_id,
                job.attempt,
                job.message,
                extra={"job_id": job.job_id, "tenant_id": job.tenant_id},
            )
            self.metrics.lost.labels(job.pool_id).inc()
            if job.state == t.JOB_STATE_FAILED:
                self.outcomes.record(job.pool_id, False)

    def _stop(self, worker: t.Worker) -> None:
        self.memory.stopped.add(worker.worker_id)
        self.provider.terminate(worker)

    async def _drain(self, worker: t.Worker, token: Leadership) -> bool:
        """Marks an idle worker DRAINING (only if it is still idle) and then stops it: never a busy one."""
        kv = self.workers.cache.get(self.keys.worker(worker.worker_id))
        txn = None if kv is None else txns.drain_worker(self.keys, kv, only_if_idle=True)
        if txn is None or not (await self.election.fenced_txn(txn.compares, txn.ops, token=token)).succeeded:
            return False
        worker.state = t.WORKER_STATE_DRAINING
        self._stop(worker)
        return True

    async def _record(
        self,
        pool_id: str,
        direction: str,
        cur: int,
        to: int,
        trigger: str,
        reason: str,
        executed: bool,
        token: Leadership,
    ) -> None:
        if executed:
            self.memory.last_action[(pool_id, direction)] = self.clock.monotonic()
        now = self.clock.now()
        decision = ScalingDecision(now, pool_id, direction, cur, to, trigger, reason, executed)
        key = self.keys.scaling_event(pool_id, int(now * 1000))
        await self.election.fenced_txn([], [op_put(key, json.dumps(asdict(decision)).encode())], token=token)
        self.metrics.scaling.labels(pool_id, direction, str(executed).lower()).inc()
        log.info("scale %s %s: %d -> %d (%s; executed=%s)", pool_id, direction, cur, to, reason, executed)
