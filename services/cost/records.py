"""What one attempt of a job is charged: the durable cost record and how it is derived from the job. Pure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.config import MeshConfig, Pricing
from services.cost.pricing import AttemptUsage, UsageSoFar, measured, price_attempt, used_so_far


@dataclass(frozen=True)
class CostRecord:
    """One charged attempt. Stored as JSON under a create-only key, so it is written at most once."""

    tenant_id: str
    job_id: str
    attempt: int
    pool_id: str
    start: float
    end: float
    run_seconds: float
    cost_micros: int
    burst: bool
    requested_cpu_millis: int
    requested_memory_mb: int
    used_cpu_seconds: float
    used_max_memory_mb: int
    currency: str

    @property
    def usage(self) -> AttemptUsage:
        return AttemptUsage(
            run_seconds=self.run_seconds,
            requested_cpu_millis=self.requested_cpu_millis,
            requested_memory_mb=self.requested_memory_mb,
            used_cpu_seconds=self.used_cpu_seconds,
            used_max_memory_mb=self.used_max_memory_mb,
            burst=self.burst,
        )

    @property
    def measured(self) -> bool:
        """Whether the worker reported what the attempt used (cancelled and lost attempts have no report)."""
        return self.used_max_memory_mb > 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CostRecord:
        data = json.loads(raw)
        # Ignore fields a newer writer may have added.
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in fields(CostRecord))


def pricing_of(config: MeshConfig, pool_id: str) -> Pricing:
    """The prices one attempt on the pool pays: a worker with several slots shares its worker-hour among them,
    so jobs that fill a worker together pay for it once."""
    pool = config.pool(pool_id)
    if pool is None:
        return Pricing()
    if pool.worker_slots == 1:
        return pool.pricing
    return replace(pool.pricing, worker_hour=pool.pricing.worker_hour / pool.worker_slots)


def base_micros(record: CostRecord, config: MeshConfig) -> int:
    """The record's price without the burst premium: what its use of the worker cost the pool."""
    return price_attempt(replace(record.usage, burst=False), pricing_of(config, record.pool_id), 1.0)


def day_of(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d")


def month_of(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m")


def record_for_attempt(
    job: t.Job,
    attempt: t.AttemptRecord,
    config: MeshConfig,
    end_ns: int | None = None,
    sample: pm.RunningUsage | None = None,
) -> CostRecord:
    """The record of an attempt: charged for max(requested, used) of each resource over its run time.

    `end_ns` prices a still-running attempt up to that moment, at max(requested, used) too: used as its worker's
    latest `sample` says (the CPU rate and peak memory so far, pricing.used_so_far); without one, at what it
    requested.
    """
    start_ns = attempt.start_time.ToNanoseconds()
    stop_ns = end_ns if end_ns is not None else attempt.end_time.ToNanoseconds()
    # Subtract in integer nanoseconds: a float epoch has only ~0.2 us resolution.
    run_seconds = max(stop_ns - start_ns, 0) / 1e9
    if end_ns is None:
        used_cpu, used_memory = measured(attempt.cpu_seconds), max(attempt.max_memory_mb, 0)
    else:
        used_cpu, used_memory = used_so_far(run_seconds, sample_so_far(sample, start_ns))
    usage = AttemptUsage(
        run_seconds=run_seconds,
        requested_cpu_millis=job.spec.resources.cpu_millis,
        requested_memory_mb=job.spec.resources.memory_mb,
        used_cpu_seconds=used_cpu,
        used_max_memory_mb=used_memory,
        burst=bool(job.burst_session_id),
    )
    return CostRecord(
        tenant_id=job.tenant_id,
        job_id=job.job_id,
        attempt=attempt.attempt,
        pool_id=attempt.pool_id,
        start=start_ns / 1e9,
        end=stop_ns / 1e9,
        run_seconds=run_seconds,
        cost_micros=price_attempt(usage, pricing_of(config, attempt.pool_id), config.burst_premium),
        burst=usage.burst,
        requested_cpu_millis=usage.requested_cpu_millis,
        requested_memory_mb=usage.requested_memory_mb,
        used_cpu_seconds=usage.used_cpu_seconds,
        used_max_memory_mb=usage.used_max_memory_mb,
        currency=config.currency,
    )


def sample_so_far(sample: pm.RunningUsage | None, start_ns: int) -> UsageSoFar | None:
    """A stored sample as pricing takes it: its time into the run counted, as a final charge's run time is, from
    the attempt's recorded start to when the pool-manager heard it."""
    if sample is None:
        return None
    elapsed = (sample.sample_time.ToNanoseconds() - start_ns) / 1e9
    return UsageSoFar(elapsed, sample.cpu_seconds, sample.max_memory_mb)


def ended_attempts(job: t.Job) -> list[t.AttemptRecord]:
    return [a for a in job.attempts if a.HasField("end_time")]


def running_attempt(job: t.Job) -> t.AttemptRecord | None:
    """The attempt a RUNNING job is in, if it has not ended."""
    if job.state != t.JOB_STATE_RUNNING:
        return None
    for a in reversed(job.attempts):
        if a.attempt == job.attempt:
            return None if a.HasField("end_time") else a
    return None
