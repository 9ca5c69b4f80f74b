"""Worker sessions, any replica: registration (a new incarnation's previous assignments taken back first), the
stream of what a worker must hear (its assignments, cancellations, acknowledgements), and heartbeats."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.errors import Conflict, InvalidArgument, JobMeshError
from libs.etcd.client import Compare, KeyValue, TxnResult, WatchEvent, cmp_missing, cmp_mod, op_put
from libs.jobs import ts
from libs.keys import Keys, safe_segment
from libs.lifecycle import txns
from libs.lifecycle.codec import assignment_for_worker, decode_worker
from libs.lifecycle.txns import Txn
from services.poolmanager.binding import clamp_to_pool
from services.poolmanager.results import EndedAttempts, RegistryParts, UsesRegistryParts
from services.poolmanager.usage import UsageRecorder

log = logging.getLogger(__name__)

# Reads of a re-registering worker's previous assignments before its registration is refused as a conflict.
_RECLAIM_ROUNDS = 5

Event = pm.ConnectResponse | pm.ResultAck


class WorkerSessions(UsesRegistryParts):
    def __init__(self, parts: RegistryParts, lease_ttl: int, ended: EndedAttempts, usage: UsageRecorder):
        super().__init__(parts)
        self.lease_ttl = lease_ttl
        self.ended = ended
        self.usage = usage
        self.streams: dict[str, asyncio.Queue[Event]] = {}
        self._marks: set[asyncio.Task[None]] = set()  # records of disconnected workers being marked

    def acknowledge(self, worker_id: str, ack: pm.ResultAck) -> None:
        queue = self.streams.get(worker_id)
        if queue is not None:
            queue.put_nowait(ack)

    def on_assignment(self, event: WatchEvent) -> None:
        """Routes assignment changes to the worker's stream, if it is connected to this replica."""
        worker_id = Keys.assignment_worker(event.kv.key)
        queue = self.streams.get(worker_id)
        if queue is None:
            return
        assignment = assignment_for_worker(event.kv.value)
        if event.kind == "put":
            queue.put_nowait(pm.ConnectResponse(assignment=assignment))
        elif assignment.job_id:
            if not self.ended.take(assignment.job_id, assignment.attempt):  # ended: nothing to tell the worker
                queue.put_nowait(pm.ConnectResponse(cancel_job_id=assignment.job_id))  # withdrawn: cancel it
                self.metrics.cancels.inc()

    async def session(self, worker: t.Worker) -> AsyncIterator[Event]:
        """Registers the worker and streams what it must hear: its registration, its current assignment, then
        assignments, cancellations and (on an Attach stream) acknowledgements of its results."""
        if not safe_segment(worker.worker_id):
            raise InvalidArgument("worker.worker_id", "is not a valid id")
        pool = self.config.pool(worker.pool_id)
        if pool is None:
            raise InvalidArgument("worker.pool_id", f"unknown pool {worker.pool_id!r}")
        cut = clamp_to_pool(worker, pool)
        if cut:
            log.warning("worker %s declared more than pool %s grants: %s", worker.worker_id, pool.pool_id, cut)
        key = self.keys.worker(worker.worker_id)
        existing = await self.etcd.get(key)
        # A worker that reconnects through another replica keeps its lease, and so its identity and job; only its
        # own lease, the one its record is bound to (any other would be kept alive by someone else's word).
        lease_id = worker.lease_id
        if lease_id and (existing is None or existing.lease != lease_id):
            if existing is not None:  # (no record: its lease ran out, the common case of a lost worker)
                log.warning(
                    "worker %s presented lease %x, not its own: registering it afresh", worker.worker_id, lease_id
                )
                self.metrics.refusals.labels("Connect", "LEASE_NOT_OWNED").inc()
            lease_id = 0
        if not lease_id or await self.etcd.refresh(lease_id) <= 0:
            # A new incarnation (restarted, or declared lost): whatever was assigned to the old one is not ours
            # to run again. Take it back as a lost worker's, so that attempt never runs twice.
            await self._reclaim_previous(worker.worker_id)
            lease_id = await self.etcd.grant(self.lease_ttl)
        worker.lease_id = lease_id
        worker.register_time.CopyFrom(ts(self.clock.now()))
        worker.etcd_term = self.etcd.raft_term
        if existing is not None and existing.lease == lease_id:
            known = decode_worker(existing.value)
            if worker.state != t.WORKER_STATE_DRAINING:  # a draining worker says so when it registers again
                worker.state = known.state
            worker.jobs_run = max(worker.jobs_run, known.jobs_run)
        await self.etcd.put(key, worker.SerializeToString(), lease=lease_id)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.streams[worker.worker_id] = queue
        self.metrics.connected.set(len(self.streams))
        log.info("worker %s registered (pool %s, lease %x)", worker.worker_id, worker.pool_id, lease_id)
        pool = self.config.pool(worker.pool_id)
        grace = pool.drain_grace_seconds if pool is not None else 0.0
        try:
            yield pm.ConnectResponse(registered=worker, lease_ttl_seconds=self.lease_ttl, drain_grace_seconds=grace)
            held = self.keys.worker_assignments(worker.worker_id)
            for key, current in list(self.assignments.cache.items()):
                if key.startswith(held):
                    yield pm.ConnectResponse(assignment=assignment_for_worker(current.value))
            while True:
                yield await queue.get()
        finally:
            if self.streams.get(worker.worker_id) is queue:
                del self.streams[worker.worker_id]
                # Its stream is gone: the worker may be dead. Nothing more is placed on it until it is heard again.
                task = asyncio.create_task(self._unheard(worker.worker_id, lease_id, worker.register_time))
                self._marks.add(task)
                task.add_done_callback(self._marks.discard)
            self.metrics.connected.set(len(self.streams))

    async def _unheard(self, worker_id: str, lease_id: int, registered: Timestamp) -> None:
        """Marks the worker's record as not heard in any term (`etcd_term` 0), so the scheduler places nothing on
        it until its next heartbeat or registration says it lives (a dead worker's record would otherwise be
        offered until its lease ran out, and a job placed there would end WORKER_LOST without running). Only the
        record this session wrote: same lease, same registration, unchanged since read."""
        key = self.keys.worker(worker_id)
        try:
            kv = await self.etcd.get(key)
            if kv is None or kv.lease != lease_id or worker_id in self.streams:
                return
            record = decode_worker(kv.value)
            if record.register_time != registered or record.etcd_term == 0:
                return
            record.etcd_term = 0
            put = op_put(key, record.SerializeToString(), lease_id)
            if (await self.etcd.txn([cmp_mod(key, kv.mod_revision)], [put])).succeeded:
                log.info("worker %s disconnected: no new jobs until it is heard again", worker_id)
        except JobMeshError as exc:  # etcd unreachable: its lease still bounds how long it is offered
            log.warning("could not mark worker %s disconnected: %s", worker_id, exc)

    async def _reclaim_previous(self, worker_id: str) -> None:
        """Takes back what the worker's previous incarnation held, through the one reclaim path, fenced by the
        worker's record as read (so a registration of the same worker through another replica is never
        overtaken). Rounds until nothing is held: a round that lost a race reads again."""
        key = self.keys.worker(worker_id)
        for _ in range(_RECLAIM_ROUNDS):
            existing = await self.etcd.get(key)
            fence = cmp_missing(key) if existing is None else cmp_mod(key, existing.mod_revision)
            held, _, _ = await self.etcd.get_prefix(self.keys.worker_assignments(worker_id))
            if not held:
                return
            for assign_kv in held:
                await self._reclaim_one(worker_id, assign_kv, fence)
        raise Conflict(f"worker {worker_id}'s previous assignments kept changing; register again")

    async def _reclaim_one(self, worker_id: str, assign_kv: KeyValue, fence: Compare) -> None:
        async def commit(txn: Txn) -> TxnResult:
            return await self.etcd.txn([fence, *txn.compares], txn.ops)

        job = await self.store.reclaim(worker_id, assign_kv, self.clock.now(), commit)
        if job is not None:
            log.warning(
                "worker %s came back without its lease; attempt %d %s",
                worker_id,
                job.attempt,
                "will be retried" if job.state == t.JOB_STATE_PENDING else "failed (WORKER_LOST)",
                extra={"job_id": job.job_id, "tenant_id": job.tenant_id},
            )
            if job.state == t.JOB_STATE_FAILED:
                self.outcomes.record(job.pool_id, False)

    async def heartbeat(self, request: pm.HeartbeatRequest) -> bool:
        """Refreshes the worker's own lease (and drains it when it says it is unhealthy or stopping, and keeps what
        its running jobs used so far); whether it is alive."""
        ttl = 0
        if request.lease_id:
            # Only the lease the worker's record is bound to; any other is not refreshed and the worker hears it
            # is not alive (a worker that lost its lease registers again).
            bound = await self._lease_of(request.worker_id, request.lease_id)
            if bound == request.lease_id:
                ttl = await self.etcd.refresh(request.lease_id)
            elif bound:
                log.warning(
                    "heartbeat of worker %s for lease %x, not its own: not refreshed",
                    request.worker_id,
                    request.lease_id,
                )
                self.metrics.refusals.labels("Heartbeat", "LEASE_NOT_OWNED").inc()
        if ttl > 0 and (request.unhealthy_reason or request.draining) and safe_segment(request.worker_id):
            why = f"failed its health check ({request.unhealthy_reason[:200]})" if request.unhealthy_reason else ""
            await self._mark_draining(request.worker_id, request.lease_id, why or "is stopping")
        if ttl > 0:
            self.usage.heard(request)
            await self._confirm(request.worker_id, request.lease_id)
        return ttl > 0

    async def _confirm(self, worker_id: str, lease_id: int) -> None:
        """Brings the worker's record up to etcd's current raft term once it is heard in that term (see
        Worker.etcd_term): one write per worker per etcd leader election, none otherwise. Fenced by the record as
        cached and its lease; a lost race is left to the next heartbeat."""
        key = self.keys.worker(worker_id)
        kv = self.workers.cache.get(key)
        if kv is None or kv.lease != lease_id:
            return
        worker = decode_worker(kv.value)
        term = self.etcd.raft_term
        if worker.etcd_term >= term:
            return
        worker.etcd_term = term
        put = op_put(key, worker.SerializeToString(), lease_id)
        if (await self.etcd.txn([cmp_mod(key, kv.mod_revision)], [put])).succeeded:
            log.info("worker %s heard in etcd term %d: schedulable again", worker_id, term)

    async def _lease_of(self, worker_id: str, expected: int) -> int:
        """The lease `worker_id`'s record is bound to (0: no record): the watch cache when it agrees with
        `expected`, else etcd (the cache may lag a registration)."""
        if not safe_segment(worker_id):
            return 0
        key = self.keys.worker(worker_id)
        cached = self.workers.cache.get(key)
        if cached is not None and cached.lease == expected:
            return expected
        current = await self.etcd.get(key)
        return current.lease if current is not None else 0

    async def _mark_draining(self, worker_id: str, lease_id: int, why: str) -> None:
        """DRAINING takes the worker out of scheduling; the leader stops it once it has no job, and the pool's
        policy replaces it. Written only under the worker's own lease, so a record of a later incarnation is never
        touched."""
        key = self.keys.worker(worker_id)
        kv = await self.etcd.get(key)
        if kv is None or kv.lease != lease_id:
            return
        txn = txns.drain_worker(self.keys, kv, only_if_idle=False)
        if txn is not None and (await self.etcd.txn(txn.compares, txn.ops)).succeeded:
            log.warning("worker %s %s: draining it", worker_id, why)
