"""Pool views for the public API: definitions with live counts, metrics, and the scaling history."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter

import grpc

from jobmesh.common.v1 import pool_pb2 as pl
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.config import MeshConfig, PoolConfig
from libs.errors import FailedPrecondition, InvalidArgument, NotFound
from libs.etcd.client import Etcd
from libs.etcd.informer import Informer
from libs.jobs import ts
from libs.keys import Keys
from libs.lifecycle.codec import decode_worker
from libs.logstore import LogStore
from services.poolmanager.controller import QueueDepthSource
from services.poolmanager.join import JoinTokens
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.reconciler import Memory, View, pool_backlogs

POOL_KINDS = {"static": t.POOL_KIND_STATIC, "dynamic": t.POOL_KIND_DYNAMIC, "burst": t.POOL_KIND_BURST}


# Most bytes one ReadJobLog answers (well under gRPC's 4 MiB message limit).
MAX_LOG_READ = 1024 * 1024


class PoolsServicer(poolmanager_pb2_grpc.PoolManagerServiceServicer):
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        config: MeshConfig,
        workers: Informer,
        assignments: Informer,
        outcomes: JobOutcomes,
        queue_depth: QueueDepthSource,
        join_tokens: JoinTokens | None = None,
        logs: LogStore | None = None,
    ):
        self.etcd = etcd
        self.keys = keys
        self.config = config
        self.workers = workers
        self.assignments = assignments
        self.outcomes = outcomes
        self.queue_depth = queue_depth
        self.join_tokens = join_tokens
        self.logs = logs

    def _pool(self, pool_id: str) -> PoolConfig:
        pool = self.config.pool(pool_id)
        if pool is None:
            raise NotFound(f"pool {pool_id} not found", reason="POOL_NOT_FOUND")
        return pool

    def _states(self, pool_id: str) -> tuple[dict[str, int], list[t.Worker], int]:
        """(workers by state, the pool's workers, the jobs they hold)."""
        held = Counter(Keys.assignment_worker(k) for k in self.assignments.cache)
        workers = [w for w in (decode_worker(kv.value) for kv in self.workers.cache.values()) if w.pool_id == pool_id]
        states = {"WORKER_STATE_IDLE": 0, "WORKER_STATE_BUSY": 0, "WORKER_STATE_DRAINING": 0}
        for w in workers:
            if held[w.worker_id]:
                states["WORKER_STATE_BUSY"] += 1
            elif w.state == t.WORKER_STATE_DRAINING:
                states["WORKER_STATE_DRAINING"] += 1
            else:
                states["WORKER_STATE_IDLE"] += 1
        return states, workers, sum(held[w.worker_id] for w in workers)

    async def ListPools(self, request: pm.ListPoolsRequest, context: grpc.aio.ServicerContext) -> pm.ListPoolsResponse:
        pools = []
        for pool in self.config.pools:
            states, workers, running = self._states(pool.pool_id)
            pools.append(
                pl.Pool(
                    pool_id=pool.pool_id,
                    kind=POOL_KINDS[pool.kind],
                    min_workers=pool.min_workers,
                    max_workers=pool.max_workers,
                    worker_size=t.Resources(cpu_millis=pool.worker_cpu_millis, memory_mb=pool.worker_memory_mb),
                    labels=pool.labels,
                    workers=len(workers),
                    idle_workers=states["WORKER_STATE_IDLE"],
                    busy_workers=states["WORKER_STATE_BUSY"],
                    worker_slots=pool.worker_slots,
                    running_jobs=running,
                )
            )
        return pm.ListPoolsResponse(pools=pools)

    async def GetPoolMetrics(
        self, request: pm.GetPoolMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pm.GetPoolMetricsResponse:
        pool = self._pool(request.pool_id)
        states, workers, running = self._states(pool.pool_id)
        provisioning = sorted(
            (w.register_time.ToNanoseconds() - w.spawn_time.ToNanoseconds()) / 1e9
            for w in workers
            if w.spawn_time.seconds
        )
        ok, bad = await self.outcomes.counts(pool.pool_id)
        depth = await self.queue_depth()
        # The jobs this pool may take, by the routing rule the leader scales by (not only its own queue's).
        workers_now = [decode_worker(kv.value) for kv in self.workers.cache.values()]
        view = View(self.config.pools, workers_now, dict(self.assignments.cache), {}, Memory(), depth)
        metrics = pl.PoolMetrics(
            pool_id=pool.pool_id,
            workers_by_state=states,
            utilization=round(states["WORKER_STATE_BUSY"] / len(workers), 4) if workers else 0.0,
            queue_depth=pool_backlogs(view)[pool.pool_id],
            oldest_wait_seconds=round(depth.oldest_wait.get(pool.pool_id, 0.0), 3),
            running_jobs=running,
            provisioning_seconds_p50=round(statistics.median(provisioning), 3) if provisioning else 0.0,
            provisioning_seconds_p95=round(provisioning[min(len(provisioning) - 1, int(len(provisioning) * 0.95))], 3)
            if provisioning
            else 0.0,
            success_rate=round(ok / (ok + bad), 4) if ok + bad else 0.0,
            jobs_succeeded=ok,
            jobs_failed=bad,
        )
        return pm.GetPoolMetricsResponse(metrics=metrics)

    async def GetScalingHistory(
        self, request: pm.GetScalingHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pm.GetScalingHistoryResponse:
        self._pool(request.pool_id)
        size = request.page_size or 100
        if not 0 < size <= 1000:
            raise InvalidArgument("page_size", "must be between 1 and 1000")
        # The newest `size` only (keys sort by time): the read is bounded however long the kept history is.
        newest, _, _ = await self.etcd.get_prefix(
            self.keys.scaling_events(request.pool_id), limit=size, descending=True
        )
        events = []
        for kv in reversed(newest):
            raw = json.loads(kv.value)
            events.append(
                pl.ScalingEvent(
                    time=ts(raw["time"]),
                    direction=raw["direction"],
                    from_workers=raw["from_workers"],
                    to_workers=raw["to_workers"],
                    trigger=raw["trigger"],
                    reason=raw["reason"],
                    executed=raw["executed"],
                )
            )
        return pm.GetScalingHistoryResponse(events=events)

    async def CreateJoinToken(
        self, request: pm.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> pm.CreateJoinTokenResponse:
        if self.join_tokens is None:
            raise FailedPrecondition("this pool-manager admits no joining workers", reason="JOIN_DISABLED")
        token, expire = await self.join_tokens.create(request.pool_id, request.ttl_seconds)
        return pm.CreateJoinTokenResponse(token=token, pool_id=request.pool_id, expire_time=ts(expire))

    async def ReadJobLog(
        self, request: pm.ReadJobLogRequest, context: grpc.aio.ServicerContext
    ) -> pm.ReadJobLogResponse:
        """Part of a stored log; the gateway has checked that the caller may read the job's."""
        if self.logs is None:
            return pm.ReadJobLogResponse(next_offset=request.offset, found=False)
        if request.offset < 0:
            raise InvalidArgument("offset", "must not be negative")
        max_bytes = min(request.max_bytes or MAX_LOG_READ, MAX_LOG_READ)
        try:
            chunk = await asyncio.to_thread(
                self.logs.read, request.tenant_id, request.job_id, request.attempt, request.offset, max_bytes
            )
        except ValueError as exc:
            raise InvalidArgument("job_id", str(exc)) from exc
        return pm.ReadJobLogResponse(data=chunk.data, next_offset=chunk.next_offset, found=chunk.found)
