"""The cost ledger: charges every ended attempt exactly once (a create-only etcd record) and reports on them."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from jobmesh.common.v1 import cost_pb2 as ct
from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig, Pricing
from libs.errors import JobMeshError
from libs.etcd.client import Etcd, WatchEvent, cmp_missing, op_put
from libs.jobs import decode_job
from libs.keys import Keys
from services.cost.pricing import AttemptUsage, format_micros, price_attempt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostRecord:
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


class CostMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.charged = Counter(
            "jobmesh_cost_charged_micros_total", "Charged cost in micro-units.", ["tenant", "pool"], registry=registry
        )
        self.records = Counter("jobmesh_cost_records_total", "Cost records written.", registry=registry)
        self.write_failures = Counter(
            "jobmesh_cost_record_write_failures_total", "Cost record writes that failed.", registry=registry
        )
        self.tenant_total = Gauge(
            "jobmesh_cost_tenant_total", "Cost charged per tenant (currency units).", ["tenant"], registry=registry
        )


def money(micros: int, currency: str) -> t.Money:
    return t.Money(currency=currency, micros=micros, amount=format_micros(micros))


class CostLedger:
    def __init__(self, etcd: Etcd, keys: Keys, config: MeshConfig, clock: Clock, metrics: CostMetrics):
        self.etcd = etcd
        self.keys = keys
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.records: dict[str, CostRecord] = {}  # record key -> record

    def pricing(self, pool_id: str) -> Pricing:
        pool = self.config.pool(pool_id)
        return pool.pricing if pool else Pricing()

    def on_record_event(self, event: WatchEvent) -> None:
        if event.kind == "delete":
            self.records.pop(event.kv.key, None)
            return
        record = CostRecord(**json.loads(event.kv.value))
        if event.kv.key not in self.records:
            self.metrics.tenant_total.labels(record.tenant_id).inc(record.cost_micros / 1e6)
        self.records[event.kv.key] = record

    async def on_job_event(self, event: WatchEvent) -> None:
        if event.kind == "delete":
            return
        job = decode_job(event.kv.value)
        for attempt in job.attempts:
            if attempt.HasField("end_time"):
                await self.charge(job, attempt)

    def _record(self, job: t.Job, a: t.AttemptRecord) -> CostRecord:
        start = a.start_time.ToNanoseconds() / 1e9
        end = a.end_time.ToNanoseconds() / 1e9
        usage = AttemptUsage(
            run_seconds=max(end - start, 0.0),
            requested_cpu_millis=job.spec.resources.cpu_millis,
            requested_memory_mb=job.spec.resources.memory_mb,
            used_cpu_seconds=a.cpu_seconds,
            used_max_memory_mb=a.max_memory_mb,
            burst=bool(job.burst_session_id),
        )
        return CostRecord(
            tenant_id=job.tenant_id,
            job_id=job.job_id,
            attempt=a.attempt,
            pool_id=a.pool_id,
            start=start,
            end=end,
            run_seconds=usage.run_seconds,
            cost_micros=price_attempt(usage, self.pricing(a.pool_id), self.config.burst_premium),
            burst=usage.burst,
            requested_cpu_millis=usage.requested_cpu_millis,
            requested_memory_mb=usage.requested_memory_mb,
            used_cpu_seconds=a.cpu_seconds,
            used_max_memory_mb=a.max_memory_mb,
            currency=self.config.currency,
        )

    async def charge(self, job: t.Job, a: t.AttemptRecord) -> None:
        key = self.keys.cost_record(job.tenant_id, job.job_id, a.attempt)
        if key in self.records:
            return
        record = self._record(job, a)
        try:
            # Create-only: a second charge of the same attempt (a replay, a restart) changes nothing.
            result = await self.etcd.txn([cmp_missing(key)], [op_put(key, json.dumps(asdict(record)).encode())])
        except JobMeshError:
            self.metrics.write_failures.inc()
            raise
        if result.succeeded:
            self.records[key] = record
            self.metrics.records.inc()
            self.metrics.charged.labels(record.tenant_id, record.pool_id).inc(record.cost_micros)
            self.metrics.tenant_total.labels(record.tenant_id).inc(record.cost_micros / 1e6)

    def job_cost(self, job: t.Job) -> t.JobCost:
        prefix = self.keys.cost_record(job.tenant_id, job.job_id, 0)[:-4]
        charged = sorted((r for k, r in self.records.items() if k.startswith(prefix)), key=lambda r: r.attempt)
        attempts = [
            t.AttemptCost(
                attempt=r.attempt, cost=money(r.cost_micros, r.currency), run_seconds=r.run_seconds, burst=r.burst
            )
            for r in charged
        ]
        done = {r.attempt for r in charged}
        if job.state == t.JOB_STATE_RUNNING and job.attempt not in done and job.attempts:
            # Accrued so far: the running attempt priced up to now.
            running = t.AttemptRecord()
            running.CopyFrom(job.attempts[-1])
            running.end_time.FromNanoseconds(int(self.clock.now() * 1e9))
            accrued = self._record(job, running)
            attempts.append(
                t.AttemptCost(
                    attempt=accrued.attempt,
                    cost=money(accrued.cost_micros, accrued.currency),
                    run_seconds=accrued.run_seconds,
                    burst=accrued.burst,
                )
            )
        total = sum(a.cost.micros for a in attempts)
        return t.JobCost(total=money(total, self.config.currency), attempts=attempts)

    def reports(self, tenant_id: str, start: float, end: float) -> list[ct.CostReport]:
        by_tenant: dict[str, list[CostRecord]] = {}
        for r in self.records.values():
            if (not tenant_id or r.tenant_id == tenant_id) and start <= r.end < end:
                by_tenant.setdefault(r.tenant_id, []).append(r)
        if tenant_id and tenant_id not in by_tenant:
            by_tenant[tenant_id] = []
        return [self._report(tid, recs) for tid, recs in sorted(by_tenant.items())]

    def _report(self, tenant_id: str, recs: list[CostRecord]) -> ct.CostReport:
        cur = self.config.currency
        by_pool: dict[str, int] = {}
        by_day: dict[str, int] = {}
        for r in recs:
            by_pool[r.pool_id] = by_pool.get(r.pool_id, 0) + r.cost_micros
            day = datetime.fromtimestamp(r.end, tz=UTC).strftime("%Y-%m-%d")
            by_day[day] = by_day.get(day, 0) + r.cost_micros
        report = ct.CostReport(
            tenant_id=tenant_id,
            total=money(sum(r.cost_micros for r in recs), cur),
            by_pool=[ct.CostLine(key=k, cost=money(v, cur)) for k, v in sorted(by_pool.items())],
            by_day=[ct.CostLine(key=k, cost=money(v, cur)) for k, v in sorted(by_day.items())],
            burst_spend=money(sum(r.cost_micros for r in recs if r.burst), cur),
            jobs=len({r.job_id for r in recs}),
        )
        report.recommendations.extend(self._rightsizing(recs))
        return report

    def _rightsizing(self, recs: list[CostRecord]) -> list[ct.Recommendation]:
        """Jobs that asked for far more memory than they used: what asking for 2x their peak would save."""
        oversized = [r for r in recs if r.used_max_memory_mb and r.used_max_memory_mb * 4 <= r.requested_memory_mb]
        if not oversized:
            return []
        savings = 0
        for r in oversized:
            right = AttemptUsage(
                r.run_seconds,
                r.requested_cpu_millis,
                max(r.used_max_memory_mb * 2, 1),
                r.used_cpu_seconds,
                r.used_max_memory_mb,
                r.burst,
            )
            savings += max(r.cost_micros - price_attempt(right, self.pricing(r.pool_id), self.config.burst_premium), 0)
        if savings <= 0:
            return []
        return [
            ct.Recommendation(
                kind="RIGHTSIZE_MEMORY",
                description=f"{len(oversized)} job attempts used under a quarter of the memory they requested; "
                "request about twice their peak instead",
                estimated_savings=money(savings, self.config.currency),
            )
        ]
