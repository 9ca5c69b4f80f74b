"""Workers' results, any replica: each checked against the assignment it reports on, then recorded in batches
(one transaction for the results that arrive while one is in flight) from the job the assignment carries."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opentelemetry import trace

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.batching import GroupCommit
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import InvalidArgument
from libs.etcd.client import Etcd, KeyValue
from libs.etcd.informer import Informer
from libs.keys import Keys, safe_segment
from libs.lifecycle.codec import decode_assignment
from libs.lifecycle.store import JobStore
from libs.lifecycle.transitions import RESULT_REASONS
from libs.lifecycle.txns import Completion
from libs.telemetry import job_id_var, job_span, tenant_id_var
from services.poolmanager.binding import ResultBounds, ResultOutOfRange, check_result_numbers
from services.poolmanager.metrics import RegistryMetrics
from services.poolmanager.outcomes import JobOutcomes

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("jobmesh.poolmanager")

# Ended attempts remembered until their assignment's delete is seen (a bound, not a working set).
_ENDED_KEPT = 10_000


class EndedAttempts:
    """Attempts whose results we are recording or have recorded, until their assignment's delete comes by: that
    delete means the job ended, not that it was cancelled, so the worker needs no word of it."""

    def __init__(self, kept: int = _ENDED_KEPT):
        self.kept = kept
        self._ended: dict[tuple[str, int], None] = {}

    def add(self, job_id: str, attempt: int) -> None:
        self._ended[(job_id, attempt)] = None
        while len(self._ended) > self.kept:
            del self._ended[next(iter(self._ended))]

    def take(self, job_id: str, attempt: int) -> bool:
        """Whether the attempt ended here (forgotten once asked: its delete comes once)."""
        return self._ended.pop((job_id, attempt), False) is None


@dataclass(frozen=True)
class RegistryParts:
    """What the registry's sessions and result recorder share."""

    etcd: Etcd
    keys: Keys
    store: JobStore
    config: MeshConfig
    clock: Clock
    assignments: Informer
    workers: Informer
    metrics: RegistryMetrics
    outcomes: JobOutcomes


class UsesRegistryParts:
    """Base of the registry's parts: the shared dependencies as attributes."""

    def __init__(self, parts: RegistryParts):
        self.etcd = parts.etcd
        self.keys = parts.keys
        self.store = parts.store
        self.config = parts.config
        self.clock = parts.clock
        self.assignments = parts.assignments
        self.workers = parts.workers
        self.metrics = parts.metrics
        self.outcomes = parts.outcomes


class ResultRecorder(UsesRegistryParts):
    def __init__(self, parts: RegistryParts, ended: EndedAttempts, linger: float = 0.0):
        super().__init__(parts)
        self.ended = ended
        # Results that arrive while one transaction is in flight are recorded together in the next.
        self.results: GroupCommit[Completion, str | None] = GroupCommit(
            self._record_results, max_batch=32, name="result-writer", linger=linger
        )

    async def _record_results(self, batch: list[Completion]) -> list[str | Exception | None]:
        for done in batch:
            self.ended.add(done.job_id, done.attempt)
        pools = await self.store.complete_attempts(batch, self.clock.now(), cached=self._cached)
        # Counted here, where the transaction landed, not by the caller: a report whose RPC was cancelled
        # after its result was written still counts (its retry is refused as stale).
        for done, pool in zip(batch, pools, strict=True):
            if isinstance(pool, Exception):
                continue  # not recorded: the worker retries it
            if pool is None:
                self.metrics.results.labels("unknown", "stale").inc()
                continue
            succeeded = done.result.get("exit_code") == 0 and done.result.get("reason") == "EXITED"
            self.metrics.results.labels(pool, "succeeded" if succeeded else "failed").inc()
            self.outcomes.record(pool, succeeded)
        return pools

    def _cached(self, key: str) -> KeyValue | None:
        return self.assignments.cache.get(key) or self.workers.cache.get(key)

    async def record(self, request: pm.ReportResultRequest) -> bool:
        """Records a worker's result: True, or False when it was stale (and refused)."""
        job_id_var.set(request.job_id)
        tenant_id_var.set(request.tenant_id)
        if request.reason not in RESULT_REASONS:
            raise InvalidArgument("reason", f"must be one of {sorted(RESULT_REASONS)}")
        held = await self.held(request.worker_id, request.job_id)
        bounds = self._result_bounds(held) if held is not None else None
        if held is None or bounds is None:  # no such assignment: stale, as the transaction would find
            log.warning("rejected stale result for attempt %d from %s", request.attempt, request.worker_id)
            return False
        try:
            check_result_numbers(request.run_seconds, request.cpu_seconds, request.max_memory_mb, bounds)
        except ResultOutOfRange as err:
            log.warning("refused a result from worker %s: %s", request.worker_id, err.message)
            self.metrics.refusals.labels("ReportResult", err.reason).inc()
            raise
        with job_span(_tracer, "record result", held.trace_parent, job_id=request.job_id, attempt=request.attempt):
            pool = await self._submit(request)
        if pool is None:
            log.warning("rejected stale result for attempt %d from %s", request.attempt, request.worker_id)
            return False
        return True

    async def _submit(self, request: pm.ReportResultRequest) -> str | None:
        return await self.results.submit(
            Completion(
                request.tenant_id,
                request.job_id,
                request.attempt,
                request.worker_id,
                {
                    "exit_code": request.exit_code,
                    "reason": request.reason,
                    "message": request.message,
                    "cpu_seconds": request.cpu_seconds,
                    "max_memory_mb": request.max_memory_mb,
                },
                request.unhealthy_reason,
            )
        )

    async def held(self, worker_id: str, job_id: str) -> t.Assignment | None:
        """The assignment `worker_id` holds for `job_id`, if any."""
        if not (safe_segment(worker_id) and safe_segment(job_id)):
            return None
        kv = await self._assignment(worker_id, job_id)
        return decode_assignment(kv.value) if kv is not None else None

    async def _assignment(self, worker_id: str, job_id: str) -> KeyValue | None:
        key = self.keys.assignment(worker_id, job_id)
        return self.assignments.cache.get(key) or await self.etcd.get(key)

    def _result_bounds(self, held: t.Assignment) -> ResultBounds | None:
        return attempt_bounds(self.config, held, self.clock.now())


def attempt_bounds(config: MeshConfig, held: t.Assignment, now: float) -> ResultBounds | None:
    """What the attempt a worker holds could have used by `now`, from its assignment (None: an unknown pool)."""
    pool = config.pool(held.job.pool_id)
    if pool is None:
        return None
    assigned = held.assign_time.ToNanoseconds() / 1e9 if held.HasField("assign_time") else None
    return ResultBounds.of(pool, assigned, now)
