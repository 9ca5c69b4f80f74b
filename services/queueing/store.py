"""What the queueing service keeps in etcd besides job records: weights, fair-queue tags, batched job writes."""

from __future__ import annotations

import json
import logging
from typing import Any

from prometheus_client import Histogram

from jobmesh.common.v1 import types_pb2 as t
from libs.batching import GroupCommit
from libs.etcd.client import Etcd, op_put
from libs.keys import Keys
from libs.lifecycle import txns
from libs.lifecycle.store import Commit, JobStore
from services.queueing.fairqueue import LaneTags, TenantTags

log = logging.getLogger(__name__)


class QueueStateStore:
    """Tenant weights set by admins, and snapshots of the fair queue's tags, under {prefix}/queueing/."""

    def __init__(self, etcd: Etcd, keys: Keys, commit: Commit | None = None):
        self.etcd = etcd
        self.keys = keys
        self.commit: Commit = commit or etcd.txn  # the leader's fenced commit in the service
        self.weights_prefix = f"{keys.p}/queueing/weights/"
        self.tags_prefix = f"{keys.p}/queueing/tags/"

    def weight_key(self, tenant_id: str) -> str:
        return f"{self.weights_prefix}{tenant_id}"

    async def load_weights(self) -> dict[str, float]:
        kvs, _, _ = await self.etcd.get_prefix(self.weights_prefix)
        weights: dict[str, float] = {}
        for kv in kvs:
            try:
                weights[Keys.last_segment(kv.key)] = float(kv.value.decode())
            except ValueError:
                log.warning("ignoring unreadable weight at %s", kv.key)
        return weights

    async def save_weight(self, tenant_id: str, weight: float) -> None:
        await self.commit([], [op_put(self.weight_key(tenant_id), repr(weight).encode())], ())

    async def load_tags(self) -> dict[str, LaneTags]:
        kvs, _, _ = await self.etcd.get_prefix(self.tags_prefix)
        lanes: dict[str, LaneTags] = {}
        for kv in kvs:
            try:
                lanes[Keys.last_segment(kv.key)] = decode_lane(json.loads(kv.value))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable fair-queue tags at %s", kv.key)
        return lanes

    async def save_tags(self, lanes: dict[str, LaneTags]) -> None:
        """All queues in one transaction, so a restart never mixes two snapshots."""
        ops = [op_put(self.tags_prefix + name, json.dumps(encode_lane(tags)).encode()) for name, tags in lanes.items()]
        if ops:
            await self.commit([], ops, ())

    async def mark_deadline_missed(self, job: t.Job, revision: int, now: float) -> bool:
        """Records on a still-pending job that its deadline passed; False when the record moved on meanwhile."""
        txn = txns.deadline_missed(self.keys, job, revision, now)
        return (await self.commit(txn.compares, txn.ops, ())).succeeded


def encode_lane(tags: LaneTags) -> dict[str, Any]:
    # repr-exact floats: json writes the shortest repr, which reads back as the same double.
    return {
        "virtual_time": tags.virtual_time,
        "tenants": {tid: [s.base, s.charged, s.weight, s.backlogged] for tid, s in tags.tenants.items()},
    }


def decode_lane(raw: dict[str, Any]) -> LaneTags:
    tenants = {
        str(tid): TenantTags(float(base), int(charged), float(weight), bool(backlogged))
        for tid, (base, charged, weight, backlogged) in raw["tenants"].items()
    }
    return LaneTags(float(raw["virtual_time"]), tenants)


def _record_bytes(item: tuple[t.Job, int]) -> int:
    return item[0].ByteSize()


class BatchingJobWriter:
    """Creates job records durably, each fenced by the quota term that admitted it (see JobStore.create);
    concurrent creates without an idempotency key share one etcd transaction (a group commit, see
    libs/batching.py). Every caller is answered only after the transaction holding its job succeeded."""

    def __init__(self, store: JobStore, max_batch: int = 64, batch_sizes: Histogram | None = None):
        self.store = store
        self.batch_sizes = batch_sizes
        self.batches = 0
        self.batched_jobs = 0
        self._commit: GroupCommit[tuple[t.Job, int], tuple[t.Job, bool, int]] = GroupCommit(
            self._write, max_batch, self._count, "queueing-batch-writer", size=_record_bytes
        )

    async def create(self, job: t.Job, fence: int = 0) -> tuple[t.Job, bool, int]:
        if job.spec.idempotency_key or self._commit.max_batch <= 1:
            return await self.store.create(job, fence)
        return await self._commit.submit((job, fence))

    def _count(self, size: int) -> None:
        self.batches += 1
        self.batched_jobs += size
        if self.batch_sizes is not None:
            self.batch_sizes.observe(size)

    async def _write(self, batch: list[tuple[t.Job, int]]) -> list[tuple[t.Job, bool, int] | Exception]:
        return await self.store.create_many([job for job, _ in batch], [fence for _, fence in batch])
