"""Finished-job counts per pool, kept by each pool-manager replica and persisted in etcd."""

from __future__ import annotations

import asyncio
import json

from libs.errors import JobMeshError
from libs.etcd.client import Etcd
from libs.keys import Keys


class JobOutcomes:
    """Finished jobs per pool, counted where results arrive and persisted per replica, so a pool's success rate
    survives restarts and sums over replicas without watching every job."""

    def __init__(self, etcd: Etcd, keys: Keys, replica: str):
        self.etcd = etcd
        self.key = keys.outcomes(replica)
        self.prefix = keys.outcomes_prefix
        self.counts_by_pool: dict[str, dict[str, int]] = {}
        self._dirty = False

    async def load(self) -> None:
        kv = await self.etcd.get(self.key)
        if kv is not None:
            self.counts_by_pool = json.loads(kv.value)

    def record(self, pool_id: str, succeeded: bool) -> None:
        counts = self.counts_by_pool.setdefault(pool_id, {"succeeded": 0, "failed": 0})
        counts["succeeded" if succeeded else "failed"] += 1
        self._dirty = True

    async def flush(self) -> None:
        if self._dirty:
            self._dirty = False
            await self.etcd.put(self.key, json.dumps(self.counts_by_pool).encode())

    async def flush_forever(self, interval: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except JobMeshError:
                self._dirty = True

    async def counts(self, pool_id: str) -> tuple[int, int]:
        await self.flush()
        kvs, _, _ = await self.etcd.get_prefix(self.prefix)
        ok = bad = 0
        for kv in kvs:
            pool = json.loads(kv.value).get(pool_id, {})
            ok += int(pool.get("succeeded", 0))
            bad += int(pool.get("failed", 0))
        return ok, bad
