"""Builders and fakes shared by the cost unit tests (no tests here): a priced mesh, jobs with attempts, cost
records, and an in-memory etcd that can be told to fail."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.config import MeshConfig, parse_config
from libs.errors import Unavailable
from libs.etcd.client import Compare, KeyValue, RequestOp, TxnResult, WatchEvent, pb
from libs.jobs import ts
from libs.keys import Keys
from services.cost.records import CostRecord

HOUR = 3600.0
# A UTC midnight, so that an hour from here stays in one day.
MIDNIGHT = datetime(2026, 3, 10, tzinfo=UTC).timestamp()

# Static workers (1 core, 1 GiB): 0.05 + 1 x 0.04 + 1 x 0.01 = 0.10 an hour.
STATIC_PRICES = {"cpu_core_hour": 0.04, "memory_gb_hour": 0.01, "worker_hour": 0.05}
# Dynamic workers (2 cores, 2 GiB): 0.08 + 2 x 0.06 + 2 x 0.02 = 0.24 an hour.
DYNAMIC_PRICES = {"cpu_core_hour": 0.06, "memory_gb_hour": 0.02, "worker_hour": 0.08}


def priced_mesh(**tenants: dict[str, Any]) -> MeshConfig:
    """Tenants acme and globex (plus any given, with their settings) on one static and one dynamic pool."""
    raw_tenants: dict[str, dict[str, Any]] = {"acme": {"weight": 1}, "globex": {"weight": 2}}
    raw_tenants.update(tenants)
    return parse_config(
        {
            "auth": {"issuer": "jobmesh-test", "audience": "jobmesh"},
            "quota": {"defaults": {"cpu_millis": 64000, "memory_mb": 131072, "concurrent_jobs": 2000}},
            "tenants": raw_tenants,
            "cost": {"currency": "EUR", "burst_premium": 1.5},
            "pools": [
                {
                    "id": "static-general",
                    "kind": "static",
                    "workers": 2,
                    "worker_cpu_millis": 1000,
                    "worker_memory_mb": 1024,
                    "pricing": STATIC_PRICES,
                },
                {
                    "id": "dynamic-large",
                    "kind": "dynamic",
                    "min_workers": 0,
                    "max_workers": 4,
                    "worker_cpu_millis": 2000,
                    "worker_memory_mb": 2048,
                    "pricing": DYNAMIC_PRICES,
                },
            ],
        }
    )


class JobBuilder:
    """A job of a tenant with attempts added one by one; the last attempt may be left running."""

    def __init__(self, job_id: str = "job-1", tenant_id: str = "acme", cpu_millis: int = 1000, memory_mb: int = 1024):
        self.job = t.Job(
            job_id=job_id,
            tenant_id=tenant_id,
            state=t.JOB_STATE_PENDING,
            spec=t.JobSpec(
                name=job_id, command=["true"], resources=t.Resources(cpu_millis=cpu_millis, memory_mb=memory_mb)
            ),
        )

    def burst(self) -> JobBuilder:
        self.job.burst_session_id = "burst-1"
        return self

    def ended(
        self, start: float, end: float, pool_id: str = "static-general", cpu_seconds: float = 0.0, memory_mb: int = 0
    ) -> JobBuilder:
        self.job.attempt += 1
        self.job.attempts.append(
            t.AttemptRecord(
                attempt=self.job.attempt,
                worker_id=f"{pool_id}-w",
                pool_id=pool_id,
                start_time=ts(start),
                end_time=ts(end),
                cpu_seconds=cpu_seconds,
                max_memory_mb=memory_mb,
                reason="COMPLETED",
            )
        )
        self.job.state = t.JOB_STATE_SUCCEEDED
        return self

    def running(self, start: float, pool_id: str = "static-general") -> JobBuilder:
        self.job.attempt += 1
        self.job.attempts.append(
            t.AttemptRecord(attempt=self.job.attempt, worker_id=f"{pool_id}-w", pool_id=pool_id, start_time=ts(start))
        )
        self.job.state = t.JOB_STATE_RUNNING
        return self

    def build(self) -> t.Job:
        job = t.Job()
        job.CopyFrom(self.job)
        return job


def sample(job: t.Job, at: float, cpu_seconds: float, memory_mb: int = 0) -> pm.RunningUsage:
    """A usage sample of the job's current attempt as the pool-manager stores it (heard at `at`)."""
    return pm.RunningUsage(
        job_id=job.job_id,
        attempt=job.attempt,
        cpu_seconds=cpu_seconds,
        max_memory_mb=memory_mb,
        tenant_id=job.tenant_id,
        sample_time=ts(at),
    )


def usage_event(worker_id: str, *samples: pm.RunningUsage, kind: str = "put") -> WatchEvent:
    """A change of a worker's stored usage (`{prefix}/usage/{worker}`), as the cost service's informer hands it."""
    value = pm.WorkerUsage(worker_id=worker_id, attempts=samples).SerializeToString()
    return WatchEvent(kind, KeyValue(Keys("/jobmesh").worker_usage(worker_id), value, 1, 1, 1, 0), 1)


def record(
    tenant_id: str = "acme",
    job_id: str = "job-1",
    *,
    start: float = MIDNIGHT,
    hours: float = 1.0,
    pool_id: str = "static-general",
    cost_micros: int = 100_000,
    cpu_millis: int = 1000,
    memory_mb: int = 1024,
    used_cpu_seconds: float = 0.0,
    used_memory_mb: int = 0,
    burst: bool = False,
    attempt: int = 1,
) -> CostRecord:
    return CostRecord(
        tenant_id=tenant_id,
        job_id=job_id,
        attempt=attempt,
        pool_id=pool_id,
        start=start,
        end=start + hours * HOUR,
        run_seconds=hours * HOUR,
        cost_micros=cost_micros,
        burst=burst,
        requested_cpu_millis=cpu_millis,
        requested_memory_mb=memory_mb,
        used_cpu_seconds=used_cpu_seconds,
        used_max_memory_mb=used_memory_mb,
        currency="EUR",
    )


def priced(r: CostRecord, config: MeshConfig) -> CostRecord:
    """The record with the cost the mesh's prices give it."""
    from services.cost.recommendations import reprice

    return replace(r, cost_micros=reprice(r, config))


class FakeEtcd:
    """The slice of libs.etcd.client.Etcd the cost service uses, in memory; `fail_next(n)` makes the next n calls
    raise Unavailable as the real client does when etcd is down."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.revision = 0
        self.calls = 0
        self._failures = 0

    def fail_next(self, n: int) -> None:
        self._failures = n

    def _tick(self) -> None:
        self.calls += 1
        if self._failures > 0:
            self._failures -= 1
            raise Unavailable("etcd: UNAVAILABLE", reason="STORE_UNAVAILABLE")

    def _kv(self, key: str) -> pb.kv_pb2.KeyValue:  # type: ignore[name-defined]
        return pb.kv_pb2.KeyValue(key=key.encode(), value=self.data[key])

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult:
        self._tick()
        ok = all((c.key.decode() in self.data) == (c.create_revision != 0) for c in compare)
        responses = []
        for op in success if ok else failure:
            if op.HasField("request_put"):
                self.revision += 1
                self.data[op.request_put.key.decode()] = op.request_put.value
                responses.append(pb.ResponseOp(response_put=pb.PutResponse()))
            elif op.HasField("request_range"):
                key = op.request_range.key.decode()
                kvs = [self._kv(key)] if key in self.data else []
                responses.append(pb.ResponseOp(response_range=pb.RangeResponse(kvs=kvs)))
        return TxnResult(ok, self.revision, responses)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._tick()
        self.revision += 1
        self.data[key] = value
        return self.revision

    async def get_prefix(
        self, prefix: str, *, start: str | None = None, limit: int = 0, keys_only: bool = False
    ) -> tuple[list[KeyValue], int, bool]:
        self._tick()
        keys = sorted(k for k in self.data if k.startswith(prefix) and k >= (start or prefix))
        page = keys[:limit] if limit else keys
        kvs = [KeyValue(k, self.data[k], 1, 1, 1, 0) for k in page]
        return kvs, self.revision, len(page) < len(keys)
