"""Retention of finished jobs: a job's record (with its id index and idempotency key) is deleted a while after
it ended, like Kubernetes' ttlSecondsAfterFinished, so that etcd and every cache of the job prefix stay
bounded. What a job cost stays: its cost records are separate and never expire here."""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.errors import JobMeshError
from libs.etcd.client import Compare, Etcd, RequestOp
from libs.keys import Keys
from libs.lifecycle import txns
from libs.lifecycle.store import Commit
from libs.lifecycle.transitions import TERMINAL
from libs.logstore import LogStore

log = logging.getLogger(__name__)

# Jobs per delete transaction: one compare and up to three deletes each, under etcd's 128 per list.
DELETE_CHUNK = 32


@dataclass(order=True, frozen=True)
class Finished:
    expires: float
    key: str = field(compare=False)
    mod_revision: int = field(compare=False)
    keys: tuple[str, ...] = field(compare=False)  # what goes with the record: its index, its idempotency key


class FinishedJobs:
    """Finished jobs in order of expiry; `due(now)` hands out the expired ones. Pure."""

    def __init__(self, keys: Keys, retention_seconds: float):
        self.keys = keys
        self.retention = retention_seconds
        self._heap: list[Finished] = []

    def observe(self, job: t.Job, mod_revision: int) -> None:
        if self.retention <= 0 or job.state not in TERMINAL or not job.HasField("end_time"):
            return
        ended = job.end_time.seconds + job.end_time.nanos / 1e9
        key = self.keys.job(job.tenant_id, job.job_id)
        extra = txns.retained_with(self.keys, job)
        heapq.heappush(self._heap, Finished(ended + self.retention, key, mod_revision, extra))

    def due(self, now: float, limit: int = 1000) -> list[Finished]:
        out: list[Finished] = []
        while self._heap and self._heap[0].expires <= now and len(out) < limit:
            out.append(heapq.heappop(self._heap))
        return out

    def requeue(self, items: list[Finished]) -> None:
        for item in items:
            heapq.heappush(self._heap, item)

    def __len__(self) -> int:
        return len(self._heap)


class RetentionSweeper:
    """Deletes expired finished jobs, each only if its record has not changed since it was seen finished."""

    def __init__(
        self,
        etcd: Etcd,
        finished: FinishedJobs,
        clock: Clock,
        interval: float = 30.0,
        logs: LogStore | None = None,
        *,
        commit: Commit | None = None,
        may_run: Callable[[], bool] = lambda: True,
    ):
        self.etcd = etcd
        self.commit: Commit = commit or etcd.txn  # the leader's fenced commit in the service
        self.may_run = may_run  # a standby deletes nothing (its heap is kept: it may lead later)
        self.finished = finished
        self.clock = clock
        self.interval = interval
        self.logs = logs  # the jobs' output goes with their records

    async def sweep(self) -> int:
        if not self.may_run():
            return 0
        due = self.finished.due(self.clock.now())
        deleted = 0
        for first in range(0, len(due), DELETE_CHUNK):
            chunk = due[first : first + DELETE_CHUNK]
            deleted += await self._delete(chunk)
        if deleted:
            log.info("deleted %d finished jobs past their retention", deleted)
        return deleted

    async def _delete(self, chunk: list[Finished]) -> int:
        """All of the chunk in one transaction; when one of them changed (or is gone), one by one."""
        try:
            if len(chunk) > 1 and (await self.commit(*self._plan(chunk), ())).succeeded:
                deleted = chunk
            else:
                deleted = [item for item in chunk if (await self.commit(*self._plan([item]), ())).succeeded]
        except JobMeshError as exc:
            log.warning("finished jobs not deleted (%s); retrying next sweep", exc.reason)
            self.finished.requeue(chunk)
            return 0
        if self.logs is not None:
            await asyncio.to_thread(self._delete_logs, self.logs, deleted)
        return len(deleted)

    @staticmethod
    def _delete_logs(logs: LogStore, items: list[Finished]) -> None:
        for item in items:
            try:
                logs.delete(Keys.job_tenant(item.key), Keys.last_segment(item.key))
            except (OSError, ValueError) as exc:
                log.warning("a finished job's log was not deleted: %s", exc)

    @staticmethod
    def _plan(items: list[Finished]) -> tuple[list[Compare], list[RequestOp]]:
        txn = txns.expire((item.key, item.mod_revision, item.keys) for item in items)
        return txn.compares, txn.ops

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sweep()
