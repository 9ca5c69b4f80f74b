"""The cost ledger: charges every ended attempt exactly once (a create-only etcd record), retries what it could
not write, and answers what was charged, what is accruing and what was spent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from opentelemetry import trace

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError
from libs.etcd.client import Compare, RequestOp, TxnResult, WatchEvent, cmp_missing, op_get, op_put
from libs.keys import Keys
from libs.lifecycle.codec import decode_job
from libs.telemetry import job_span
from services.cost.daily import Cell, DailyCost, daily_cell
from services.cost.idle import Allocation, daily_shares
from services.cost.metrics import CostMetrics
from services.cost.records import (
    CostRecord,
    base_micros,
    day_of,
    ended_attempts,
    month_of,
    record_for_attempt,
    running_attempt,
)
from services.cost.usage import RunningUsage

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("jobmesh.cost")

# Records per create-only transaction (one compare and one put each; etcd allows 128 of either).
WRITE_CHUNK = 32


class RecordStore(Protocol):
    """The one etcd operation the ledger writes with."""

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult: ...


class CostLedger:
    def __init__(
        self,
        store: RecordStore,
        keys: Keys,
        config: MeshConfig,
        clock: Clock,
        metrics: CostMetrics,
        record_delay: float = 0.0,
        usage: RunningUsage | None = None,
        may_write: Callable[[], bool] = lambda: True,
    ):
        self.store = store
        self.usage = usage if usage is not None else RunningUsage()  # running attempts' latest measured use
        # False on a standby: it tracks what is charged and what is pending, and writes nothing; a new leader's
        # first cycle writes what is still pending (create-only: what the last leader wrote is read back).
        self.may_write = may_write
        # 0: each watch response's ended attempts are written before the next is handled; else they wait up to
        # this long for others, in one delayed write (a crash before it is covered by the rescan).
        self.record_delay = record_delay
        self._delayed: asyncio.Task[None] | None = None
        self.keys = keys
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.records: dict[str, CostRecord] = {}  # record key -> durable record
        self.pending: dict[str, CostRecord] = {}  # record key -> ended attempt whose record is not written yet
        self._traces: dict[str, str] = {}  # record key -> its job's trace (Job.trace_parent), while pending
        self.running: dict[str, t.Job] = {}  # job key -> job whose current attempt has not ended
        # Job keys of the stored jobs that have had an attempt: the only ones a rescan reads again (a job that never
        # started has nothing to charge, and a backlog of pending jobs must not be decoded every few cycles).
        self.attempted: set[str] = set()
        self._by_day: dict[tuple[str, str], int] = {}  # (tenant, UTC day) -> micros of durable records
        self._base: dict[str, int] = {}  # record key -> its price without burst premium, for idle cost
        # (pool, UTC day) -> base micros of durable records that fall on that day: idle cost without a rescan.
        self.allocated_by_day: dict[tuple[str, str], int] = {}
        # Rolled-up days (services/cost/daily.py): their records are gone, their sums count in all of the above.
        self.daily: dict[Cell, DailyCost] = {}
        self.daily_revision: dict[Cell, int] = {}  # the aggregate's mod revision, which a roll-up compares

    # Records read back from etcd (ours, and any written before a restart) --------------------------------

    def on_record_event(self, event: WatchEvent) -> None:
        if event.kind == "delete":
            self._forget(event.kv.key)
            return
        self._remember(event.kv.key, CostRecord.from_json(event.kv.value))

    def _forget(self, key: str) -> None:
        old = self.records.pop(key, None)
        base = self._base.pop(key, None)
        if old is not None and base is not None:
            self._count(old, base, -1)

    def on_daily_event(self, event: WatchEvent) -> None:
        """An aggregate as stored; an older revision than one already applied (our own roll-up) is ignored."""
        if event.kind == "delete":
            cell = daily_cell(event.kv.key)
            if cell is not None:
                self._set_daily(cell, None, event.kv.mod_revision)
            return
        daily = DailyCost.from_json(event.kv.value)
        if event.kv.mod_revision >= self.daily_revision.get(daily.cell, 0):
            self._set_daily(daily.cell, daily, event.kv.mod_revision)

    def rolled_up(self, record_keys: Iterable[str], daily: Iterable[DailyCost], revision: int) -> None:
        """A roll-up transaction succeeded at `revision`: its records are gone, its aggregates are these."""
        for key in record_keys:
            self._forget(key)
        for d in daily:
            self._set_daily(d.cell, d, revision)

    def _set_daily(self, cell: Cell, daily: DailyCost | None, revision: int) -> None:
        old = self.daily.pop(cell, None)
        if old is not None:
            self._count_daily(old, -1)
        if daily is None:
            self.daily_revision.pop(cell, None)
            return
        self.daily[cell] = daily
        self.daily_revision[cell] = revision
        self._count_daily(daily, 1)

    def _count_daily(self, d: DailyCost, sign: int) -> None:
        spent, allocated = (d.tenant_id, d.day), (d.pool_id, d.day)
        self._by_day[spent] = self._by_day.get(spent, 0) + sign * d.cost_micros
        self.allocated_by_day[allocated] = self.allocated_by_day.get(allocated, 0) + sign * d.allocated_micros

    def _remember(self, key: str, record: CostRecord) -> bool:
        self.pending.pop(key, None)
        if key in self.records:
            return False
        self.records[key] = record
        base = self._base[key] = base_micros(record, self.config)
        self._count(record, base, 1)
        return True

    def _count(self, record: CostRecord, base: int, sign: int) -> None:
        cell = (record.tenant_id, day_of(record.end))
        self._by_day[cell] = self._by_day.get(cell, 0) + sign * record.cost_micros
        for day, share in daily_shares(Allocation(record.pool_id, record.start, record.end, base)):
            key = (record.pool_id, day)
            self.allocated_by_day[key] = self.allocated_by_day.get(key, 0) + sign * share

    # Following the jobs ----------------------------------------------------------------------------------------

    async def on_job_event(self, event: WatchEvent) -> None:
        await self.on_job_events([event])

    async def on_job_events(self, events: list[WatchEvent]) -> None:
        """The job changes of one watch response: the attempts they ended are charged in one transaction."""
        new: list[str] = []
        for event in events:
            job = decode_job(event.kv.value)
            if event.kind == "delete":
                self.running.pop(event.kv.key, None)  # a deleted job's ended attempts are still charged below
                self.attempted.discard(event.kv.key)
            elif job.attempts:
                self.attempted.add(event.kv.key)
            new += self.observe(event.kv.key, job)
        if not new or not self.may_write():
            return
        if self.record_delay <= 0:
            await self.flush(new)
        elif self._delayed is None:
            self._delayed = asyncio.create_task(self._flush_later(), name="cost-records")

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self.record_delay)
        finally:
            self._delayed = None
        try:
            await self.flush()
        except Exception:
            log.exception("writing cost records failed; the cost cycle retries them")

    async def close(self) -> None:
        """Writes what a delayed write was waiting for (on a graceful stop)."""
        if self._delayed is not None:
            self._delayed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delayed
        await self.flush()

    def observe(self, job_key: str, job: t.Job) -> list[str]:
        """Tracks the job's running attempt and queues its ended, uncharged attempts; returns their keys."""
        if running_attempt(job) is not None:
            self.running[job_key] = job
        else:
            self.running.pop(job_key, None)
        new: list[str] = []
        for attempt in ended_attempts(job):
            key = self.keys.cost_record(job.tenant_id, job.job_id, attempt.attempt)
            if key not in self.records and key not in self.pending:
                self.pending[key] = record_for_attempt(job, attempt, self.config)
                self._traces[key] = job.trace_parent
                new.append(key)
        self.metrics.unrecorded.set(len(self.pending))
        return new

    async def rescan(self, jobs: Iterable[tuple[str, t.Job]]) -> int:
        """Re-reads every known job for ended attempts without a record, then writes what is pending."""
        for job_key, job in jobs:
            self.observe(job_key, job)
        return await self.flush()

    async def flush(self, keys: Iterable[str] | None = None) -> int:
        """Writes pending records create-only, up to WRITE_CHUNK per transaction; a failed write stays pending
        for the next cycle. Returns how many are still pending."""
        if not self.may_write():
            return len(self.pending)
        wanted = [key for key in (self.pending if keys is None else keys) if key in self.pending]
        for first in range(0, len(wanted), WRITE_CHUNK):
            chunk = wanted[first : first + WRITE_CHUNK]
            if len(chunk) == 1 or not await self._write_together(chunk):
                for key in chunk:
                    await self._write_one(key)
        # The traces of attempts another writer recorded (their records came back through the informer).
        for key in [k for k in self._traces if k not in self.pending]:
            del self._traces[key]
        self.metrics.unrecorded.set(len(self.pending))
        return len(self.pending)

    async def _write_together(self, keys: list[str]) -> bool:
        """One create-only transaction for several records; False (nothing written) when any already exists
        or the write failed, and each is then written on its own."""
        records = [(key, self.pending[key]) for key in keys]
        try:
            result = await self.store.txn(
                [cmp_missing(key) for key, _ in records], [op_put(key, r.to_json()) for key, r in records]
            )
        except JobMeshError:
            return False
        if not result.succeeded:
            return False
        for key, record in records:
            self._charged(key, record)
        return True

    def _charged(self, key: str, record: CostRecord) -> None:
        # We wrote it (the records informer may have handed it back to us already).
        trace_parent = self._traces.pop(key, "")
        with job_span(_tracer, "charge attempt", trace_parent, job_id=record.job_id, attempt=record.attempt) as span:
            span.set_attribute("cost_micros", record.cost_micros)
        self._remember(key, record)
        self.metrics.records.inc()
        self.metrics.charged.labels(record.tenant_id, record.pool_id).inc(record.cost_micros)
        labels = (record.tenant_id, record.pool_id)
        self.metrics.used_cpu.labels(*labels).inc(max(record.used_cpu_seconds, 0.0))
        self.metrics.used_memory.labels(*labels).inc(max(record.used_max_memory_mb, 0) * 2**20 * record.run_seconds)
        self.metrics.execution.labels(*labels).observe(record.run_seconds)

    async def _write_one(self, key: str) -> None:
        record = self.pending.get(key)
        if record is not None:
            try:
                # Create-only: a second charge of the same attempt (a replay, a restart, a retry) changes nothing.
                result = await self.store.txn([cmp_missing(key)], [op_put(key, record.to_json())], [op_get(key)])
            except JobMeshError as exc:
                self.metrics.write_failures.labels("attempt").inc()
                log.warning("cost record %s not written (%s); retrying next cycle", key, exc.reason)
                return
            if result.succeeded:
                self._charged(key, record)
            else:
                stored = result.range_kvs(0)
                if stored:
                    self._remember(key, CostRecord.from_json(stored[0].value))

    # Queries ----------------------------------------------------------------------------------------------------

    def job_cost(self, job: t.Job) -> list[CostRecord]:
        """Each attempt's charge: its record, what it will be charged (ended, record not written yet), or what it
        has accrued so far (running)."""
        out: list[CostRecord] = []
        now_ns = int(self.clock.now() * 1e9)
        for attempt in job.attempts:
            key = self.keys.cost_record(job.tenant_id, job.job_id, attempt.attempt)
            if key in self.records:
                out.append(self.records[key])
            elif attempt.HasField("end_time"):
                out.append(self.pending.get(key) or record_for_attempt(job, attempt, self.config))
            elif job.state == t.JOB_STATE_RUNNING and attempt.attempt == job.attempt:
                out.append(self._so_far(job, attempt, now_ns))
        return out

    def accruing(self) -> list[CostRecord]:
        """The running attempts, priced from their start to now at max(requested, used so far)."""
        now_ns = int(self.clock.now() * 1e9)
        out = []
        for job in self.running.values():
            attempt = running_attempt(job)
            if attempt is not None:
                out.append(self._so_far(job, attempt, now_ns))
        return out

    def _so_far(self, job: t.Job, attempt: t.AttemptRecord, now_ns: int) -> CostRecord:
        """A running attempt priced up to `now_ns`, at its worker's latest usage sample if one came."""
        return record_for_attempt(job, attempt, self.config, end_ns=now_ns, sample=self.usage.latest(job, attempt))

    def spent(self, tenant_id: str, month: str | None = None, day: str | None = None) -> int:
        """Charged in a UTC month ("YYYY-MM") or day, including ended attempts not yet written; excludes running."""

        def wanted(when: str) -> bool:
            return (month is None or when.startswith(month)) and (day is None or when == day)

        recorded = sum(v for (tid, d), v in self._by_day.items() if tid == tenant_id and wanted(d))
        unwritten = sum(
            r.cost_micros for r in self.pending.values() if r.tenant_id == tenant_id and wanted(day_of(r.end))
        )
        return recorded + unwritten

    def spent_with_running(self, tenant_id: str, now: float, *, today: bool = False) -> int:
        """This month's (or today's) spend so far: charged attempts plus what running ones have accrued."""
        running = sum(r.cost_micros for r in self.accruing() if r.tenant_id == tenant_id)
        if today:
            return self.spent(tenant_id, day=day_of(now)) + running
        return self.spent(tenant_id, month=month_of(now)) + running

    def allocations(self, since: float = 0.0) -> list[Allocation]:
        """Worker time used by attempts (ended or running) that ran after `since`, at base price (for idle cost)."""
        out = [
            Allocation(r.pool_id, r.start, r.end, self._base[key]) for key, r in self.records.items() if r.end > since
        ]
        return out + self.unwritten_allocations(since)

    def unwritten_allocations(self, since: float = 0.0) -> list[Allocation]:
        """`allocations` less the durable records (those are in `allocated_by_day`)."""
        unwritten = [r for r in [*self.pending.values(), *self.accruing()] if r.end > since]
        return [Allocation(r.pool_id, r.start, r.end, base_micros(r, self.config)) for r in unwritten]
