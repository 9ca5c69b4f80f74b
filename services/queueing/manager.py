"""The queueing core: jobs enter durably, wait in the fair queue, and leave when etcd says they were dispatched."""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from jobmesh.common.v1 import types_pb2 as t
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import InvalidArgument, JobMeshError, NotFound
from libs.etcd.client import WatchEvent
from libs.keys import Keys
from libs.lifecycle.codec import decode_job
from libs.lifecycle.routing import assign_queue, queue_of
from libs.lifecycle.transitions import may_start, new_record
from libs.telemetry import checked_traceparent
from services.queueing.demand import QueueDemand
from services.queueing.fairqueue import LaneTags, Placement, QueueItem, WeightedFairQueue, job_cost
from services.queueing.metrics import QueueMetrics, QueueShape, ShareWindow
from services.queueing.reasons import DEADLINE_MISSED, waiting_reason
from services.queueing.retention import FinishedJobs
from services.queueing.settings import QueueingSettings
from services.queueing.sla import MET, MISSED_DEADLINE, SlaPolicy
from services.queueing.stored import StoredJobs

log = logging.getLogger(__name__)

MAX_WEIGHT = 1000.0
RECENTLY_GONE = 10_000  # removed jobs remembered, so a late echo of their creation cannot queue them again


class JobWriter(Protocol):
    async def create(self, job: t.Job, fence: int = 0) -> tuple[t.Job, bool, int]: ...


class JobReader(Protocol):
    async def get(self, tenant_id: str, job_id: str) -> t.Job: ...


class StateStore(Protocol):
    async def load_weights(self) -> dict[str, float]: ...

    async def save_weight(self, tenant_id: str, weight: float) -> None: ...

    async def load_tags(self) -> dict[str, LaneTags]: ...

    async def save_tags(self, lanes: dict[str, LaneTags]) -> None: ...

    async def mark_deadline_missed(self, job: t.Job, revision: int, now: float) -> bool: ...


def seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def next_attempt_at(job: t.Job) -> float:
    """When a retried job's backoff ends (0 when it may run at once)."""
    return seconds(job.next_attempt_time) if job.HasField("next_attempt_time") else 0.0


def deadline_of(job: t.Job) -> float | None:
    return seconds(job.spec.deadline) if job.spec.HasField("deadline") else None


class PendingJobs:
    """The pending job records by id, each kept serialized with its mod revision: a decoded record costs about ten
    times its encoding in memory (2.6 KB against 0.2 KB for a small job), and only the few handed out or looked at
    are needed decoded. `get` and `pop` decode on the way out (a fresh message: changing it changes nothing here)."""

    def __init__(self) -> None:
        self._raw: dict[str, tuple[bytes, int]] = {}

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._raw

    def __setitem__(self, job_id: str, entry: tuple[t.Job, int]) -> None:
        self._raw[job_id] = (entry[0].SerializeToString(), entry[1])

    def __getitem__(self, job_id: str) -> tuple[t.Job, int]:
        raw, revision = self._raw[job_id]
        return decode_job(raw), revision

    def revision(self, job_id: str) -> int | None:
        entry = self._raw.get(job_id)
        return None if entry is None else entry[1]

    def get(self, job_id: str) -> tuple[t.Job, int] | None:
        return self[job_id] if job_id in self._raw else None

    def take(self, job_id: str) -> tuple[bytes, int] | None:
        """Removes a record and gives it back still encoded (decoding is for the caller that needs it)."""
        return self._raw.pop(job_id, None)

    def pop(self, job_id: str) -> tuple[t.Job, int] | None:
        entry = self._raw.pop(job_id, None)
        return None if entry is None else (decode_job(entry[0]), entry[1])


class QueueManager:
    """Keeps the fair queue equal to the PENDING job records in etcd, and answers questions about it.

    Jobs enter through `enqueue` (durable first) or the job informer (`on_job_event`), and leave when the
    informer shows them RUNNING (dispatched: charged to their tenant), ended or deleted (not charged).
    """

    def __init__(
        self,
        *,
        writer: JobWriter,
        reader: JobReader,
        state: StateStore,
        config: MeshConfig,
        clock: Clock,
        metrics: QueueMetrics,
        settings: QueueingSettings | None = None,
    ):
        self.writer = writer
        self.reader = reader
        self.state = state
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.settings = settings or QueueingSettings()
        self.sla = SlaPolicy.from_config(config, self.settings.boost_fraction, self.settings.start_slack_seconds)
        # Queues whose jobs wait for a pool to grow rather than for a busy worker to free up.
        self.dynamic_queues = {p.pool_id for p in config.pools if p.kind in ("dynamic", "burst")}
        self.queue = WeightedFairQueue({tid: tc.weight for tid, tc in config.tenants.items()})
        self.pending = PendingJobs()  # job id -> (record, mod revision)
        self.shares = ShareWindow()
        self._offered: dict[str, float] = {}  # job id -> monotonic time NextJobs last handed it out
        self._gone: OrderedDict[str, int] = OrderedDict()  # job id -> revision at which it left
        self._deadlines: list[tuple[float, str]] = []  # heap of pending jobs' deadlines
        self._deadline_counted: set[str] = set()  # misses already counted while the job waited
        # Retried jobs backing off: job id -> when it may run; they wait here, not in the fair queue, so they hold
        # up no one (not even their own tenant's later jobs), and join the queue when the time comes (`tick`).
        self._backing_off: dict[str, float] = {}
        self._backoff_ends: list[tuple[float, str]] = []  # heap of (not before, job id); stale entries skipped
        self.demand = QueueDemand()  # what autoscaling reads, kept with the fair queue (not a scan per read)
        metrics.backing_off.set_function(lambda: len(self._backing_off))
        self._saved_tags = -1
        self._changed = asyncio.Condition()
        self.finished: FinishedJobs | None = None  # set to have finished jobs deleted after their retention
        self.stored = StoredJobs(config.max_jobs_per_tenant)
        self._weights_lock = asyncio.Lock()
        # Whether this replica leads (app.py sets it from its leader gate): a standby keeps its queue warm from the
        # job records but records no missed deadline and saves no tags (the leader's writes are fenced anyway).
        self.leading: Callable[[], bool] = lambda: True

    # Start-up ----------------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Before the rebuild from the job records: admins' weights and the last snapshot of the tags."""
        await self.load_weights()
        self.queue.restore(await self.state.load_tags())

    async def load_weights(self) -> None:
        """Admins' weights as stored (again when a standby takes over: the previous leader may have set some)."""
        for tenant_id, weight in (await self.state.load_weights()).items():
            if 0 < weight <= MAX_WEIGHT:
                self.queue.set_weight(tenant_id, weight)

    def finish_rebuild(self) -> None:
        """After the informer listed every job: tenants restored as backlogged with nothing queued go idle."""
        self.queue.end_restore()

    # Jobs in and out -------------------------------------------------------------------------------

    def _item(self, job: t.Job) -> QueueItem:
        submitted = seconds(job.create_time)
        window = self.sla.window(job.spec.sla_tier, submitted, deadline_of(job))
        return QueueItem(
            job.job_id,
            job.tenant_id,
            job.queue,
            job_cost(job.spec.resources.cpu_millis, job.spec.resources.memory_mb),
            job.spec.priority,
            job.create_time.seconds * 1_000_000 + job.create_time.nanos // 1000,
            window.urgent_at,
            window.due,
        )

    def _admit(self, job: t.Job, revision: int) -> bool:
        known = self.pending.revision(job.job_id)
        if known is not None:
            if revision > known:
                self.pending[job.job_id] = (job, revision)  # the same wait, a newer record (e.g. sla_miss set)
            return False
        left_at = self._gone.get(job.job_id)
        if left_at is not None and left_at >= revision:
            return False
        job.queue = queue_of(job)
        self.pending[job.job_id] = (job, revision)
        not_before = next_attempt_at(job)
        if not_before > self.clock.now():
            self._backing_off[job.job_id] = not_before
            heapq.heappush(self._backoff_ends, (not_before, job.job_id))
        else:
            self._queue_up(job)
        deadline = deadline_of(job)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, job.job_id))
        return True

    def _queue_up(self, job: t.Job) -> None:
        """Into the fair queue (and the demand autoscaling reads): a pending job that may run now."""
        self.queue.push(self._item(job))
        self.demand.add(job.job_id, job.queue, seconds(job.create_time), bool(job.burst_session_id))

    def _remove(self, job_id: str, running: t.Job | None, revision: int) -> None:
        known = self.pending.take(job_id)
        self._offered.pop(job_id, None)
        self._backing_off.pop(job_id, None)
        self.demand.discard(job_id)
        self._gone[job_id] = revision
        if len(self._gone) > RECENTLY_GONE:
            self._gone.popitem(last=False)
        item = self.queue.remove(job_id, dispatched=running is not None)
        if item is not None and running is not None and known is not None:
            self._account_dispatch(decode_job(known[0]), running)  # decoded only for a dispatch
        self._deadline_counted.discard(job_id)

    def _account_dispatch(self, waited: t.Job, running: t.Job) -> None:
        tier = self.sla.tier(running.spec.sla_tier)
        started = seconds(running.start_time) if running.HasField("start_time") else self.clock.now()
        since = seconds(waited.update_time if waited.attempt and waited.HasField("update_time") else waited.create_time)
        # A retry's wait starts when its backoff ends: the backoff is the retry policy's, not the queue's.
        since = max(since, next_attempt_at(waited))
        self.metrics.dispatched.labels(running.tenant_id).inc()
        self.metrics.wait.labels(tier).observe(max(started - since, 0.0))
        self.shares.add(running.tenant_id)
        if running.attempt == 1 and running.job_id not in self._deadline_counted:
            outcome = self.sla.outcome(tier, seconds(running.create_time), started, deadline_of(running))
            self.metrics.record_outcome(tier, outcome)
            if outcome != MET:
                log.info("started after its SLA (%s, tier %s)", outcome, tier, extra={"job_id": running.job_id})

    async def on_job_event(self, event: WatchEvent) -> None:
        before = self.queue.version
        job_id = Keys.last_segment(event.kv.key)
        if event.kind == "delete":
            self.stored.gone(Keys.job_tenant(event.kv.key), job_id)
            if job_id in self.pending:
                self._remove(job_id, None, event.revision)
        else:
            job = decode_job(event.kv.value)
            self.stored.seen(job.tenant_id, job_id)
            if job.state == t.JOB_STATE_PENDING:
                self._admit(job, event.kv.mod_revision)
            elif job_id in self.pending:
                self._remove(job_id, job if job.state == t.JOB_STATE_RUNNING else None, event.kv.mod_revision)
            if self.finished is not None:
                self.finished.observe(job, event.kv.mod_revision)
        if self.queue.version != before:
            await self._notify()

    def new_job(self, submitted: t.Job) -> t.Job:
        """The PENDING record of a submission: its id, tenant, spec and burst session are the caller's (the
        gateway admitted them); the state, times and queue are the lifecycle's."""
        return new_record(
            job_id=submitted.job_id,
            tenant_id=submitted.tenant_id,
            spec=submitted.spec,
            queue=assign_queue(submitted.spec, self.config.pools),
            burst_session_id=submitted.burst_session_id,
            now=self.clock.now(),
            trace_parent=checked_traceparent(submitted.trace_parent),
        )

    async def enqueue(self, submitted: t.Job, quota_fence: int) -> tuple[t.Job, bool]:
        """Stores the record of a submission (durable before this returns), then queues it. `quota_fence`: the
        quota leader term that admitted it; the record is written only while that term lasts."""
        if quota_fence <= 0:
            raise InvalidArgument("quota_fence", "is required: the admission_fence of the job's quota reservation")
        job = self.new_job(submitted)
        self.stored.reserve(job.tenant_id)
        created = False
        try:
            stored, created, revision = await self.writer.create(job, quota_fence)
        finally:
            self.stored.release(job.tenant_id, job.job_id if created else None)
        if created:
            self.metrics.enqueued.labels(job.tenant_id).inc()
            if self._admit(stored, revision):
                await self._notify()
        return stored, created

    # The scheduler's view --------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def next_jobs(
        self, limit: int, after_version: int, wait_seconds: float
    ) -> tuple[list[tuple[t.Job, int]], int]:
        """The heads in dispatch order; waits up to `wait_seconds` for the queue to change past `after_version`."""
        if self.queue.version <= after_version and wait_seconds > 0:
            try:
                async with self._changed:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.queue.version > after_version), wait_seconds
                    )
            except TimeoutError:
                pass
        before = self.queue.version
        self._end_backoffs(self.clock.now())
        items = self.queue.peek(max(1, min(limit, 1000)), now=self.clock.now())
        offered_at = self.clock.monotonic()
        out = []
        for item in items:
            known = self.pending.get(item.job_id)
            if known is not None:
                out.append(known)
                self._offered[item.job_id] = offered_at
        if self.queue.version != before:
            await self._notify()
        return out, self.queue.version

    # What GetJob shows ---------------------------------------------------------------------------------

    async def get_job(self, tenant_id: str, job_id: str) -> t.Job:
        job = await self.reader.get(tenant_id, job_id)
        if job.state == t.JOB_STATE_PENDING:
            before = self.queue.version
            self.annotate(job)
            if self.queue.version != before:
                await self._notify()
        return self.show_late_start(job)

    def show_late_start(self, job: t.Job) -> t.Job:
        """sla_miss on a job whose first attempt started after its target wait or deadline. The scheduler writes
        the start, not us, so the outcome is shown on read (and was counted in the metrics at dispatch)."""
        if job.attempts and job.attempts[0].HasField("start_time"):
            started = seconds(job.attempts[0].start_time)
            if self.sla.outcome(job.spec.sla_tier, seconds(job.create_time), started, deadline_of(job)) != MET:
                job.sla_miss = True
        return job

    def annotate(self, job: t.Job) -> t.Job:
        """Fills a pending job's queue position and waiting reason from the live queue."""
        now = self.clock.now()
        deadline = deadline_of(job)
        missed = job.sla_miss or (deadline is not None and deadline <= now)
        if missed:
            job.sla_miss = True
        if not may_start(job, now):  # backing off: not in the fair queue, so no position yet
            job.queue_position = 0
            job.waiting_reason = waiting_reason(
                recorded=job.waiting_reason,
                deadline_missed=missed,
                offered_recently=False,
                backing_off=True,
                dynamic_queue=False,
                ahead_other_tenants=0,
            )
            return job
        item = self.queue.get(job.job_id)
        placement: Placement | None = self.queue.position(job.job_id, now)
        if item is None or placement is None:  # not queued yet (the record is newer than our view): as stored
            if missed:
                job.waiting_reason = DEADLINE_MISSED
            return job
        job.queue = item.queue
        job.queue_position = placement.position
        offered = self._offered.get(job.job_id)
        job.waiting_reason = waiting_reason(
            recorded=job.waiting_reason,
            deadline_missed=missed,
            offered_recently=offered is not None
            and self.clock.monotonic() - offered <= self.settings.offer_window_seconds,
            dynamic_queue=job.queue in self.dynamic_queues,
            ahead_other_tenants=placement.ahead_other_tenants,
        )
        return job

    # Admin -----------------------------------------------------------------------------------------------

    async def set_weight(self, tenant_id: str, weight: float) -> float:
        if tenant_id not in self.config.tenants:
            raise NotFound(f"tenant {tenant_id!r} not found", reason="TENANT_NOT_FOUND")
        if not 0 < weight <= MAX_WEIGHT:  # NaN fails too
            raise InvalidArgument("weight", f"must be greater than 0 and at most {MAX_WEIGHT:g}")
        async with self._weights_lock:
            await self.state.save_weight(tenant_id, weight)
            self.queue.set_weight(tenant_id, weight)
        log.info("fair-share weight of %s set to %g", tenant_id, weight)
        await self._notify()
        return weight

    # Time-driven work ------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Queues retries whose backoff ended, applies SLA boosts that came due, and records deadlines that passed
        while jobs waited."""
        now = self.clock.now()
        before = self.queue.version
        self._end_backoffs(now)
        self.queue.promote(now)
        if self.leading():
            await self._record_missed_deadlines(now)
        if self.queue.version != before:
            await self._notify()

    async def _record_missed_deadlines(self, now: float) -> None:
        retry: list[tuple[float, str]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, job_id = heapq.heappop(self._deadlines)
            known = self.pending.get(job_id)
            if known is None:
                continue
            job, revision = known
            if not job.sla_miss:
                try:
                    marked = await self.state.mark_deadline_missed(job, revision, now)
                except JobMeshError as exc:
                    log.warning("could not record a missed deadline: %s", exc, extra={"job_id": job_id})
                    marked = False
                if not marked:
                    if job_id in self.pending:
                        retry.append((deadline, job_id))  # the record moved on, or etcd is away: next tick
                    continue
            if job_id not in self._deadline_counted:
                self._deadline_counted.add(job_id)
                self.metrics.record_outcome(self.sla.tier(job.spec.sla_tier), MISSED_DEADLINE)
                log.info("deadline passed while queued", extra={"job_id": job_id, "tenant_id": job.tenant_id})
        for entry in retry:
            heapq.heappush(self._deadlines, entry)

    def _end_backoffs(self, now: float) -> None:
        """Retries whose backoff has passed join the fair queue (as their first attempt did: by submission)."""
        ends = self._backoff_ends
        while ends and ends[0][0] <= now:
            at, job_id = heapq.heappop(ends)
            if self._backing_off.get(job_id) != at:
                continue  # it left (dispatched elsewhere, cancelled) or a newer record moved its time
            del self._backing_off[job_id]
            self._queue_up(self.pending[job_id][0])

    def _next_backoff_end(self) -> float:
        ends = self._backoff_ends
        while ends and self._backing_off.get(ends[0][1]) != ends[0][0]:
            heapq.heappop(ends)
        return ends[0][0] if ends else math.inf

    def next_timer(self) -> float:
        """Seconds until the next boost, deadline or end of a backoff (inf when none)."""
        deadline = self._deadlines[0][0] if self._deadlines else math.inf
        return min(self.queue.next_boost(), deadline, self._next_backoff_end()) - self.clock.now()

    async def run_timers(self, max_sleep: float = 0.5) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("queue timer failed")
            await asyncio.sleep(min(max(self.next_timer(), 0.05), max_sleep))

    async def save_tags(self) -> bool:
        """Writes the tags when they changed since the last write."""
        version = self.queue.tags_version
        if version == self._saved_tags:
            return False
        self.queue.forget_idle_tenants()
        await self.state.save_tags(self.queue.tags())
        self._saved_tags = version
        self.metrics.tags_saved.inc()
        return True

    async def run_snapshots(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self.leading():
                continue
            try:
                await self.save_tags()
            except JobMeshError as exc:
                log.warning("could not save the fair-queue tags: %s", exc)

    # Reads for metrics and stats -------------------------------------------------------------------

    def stats(self) -> tuple[dict[str, int], dict[str, int]]:
        return self.queue.depth_by()

    def demand_by_queue(self) -> tuple[dict[str, int], dict[str, float]]:
        """What autoscaling reads, per queue: waiting jobs admitted against a burst session (the demand burst
        capacity may serve), and how long the longest-waiting job has waited (seconds). Jobs backing off are not
        counted: no worker may take them yet. Kept as jobs come and go, so a read costs O(queues)."""
        now = self.clock.now()
        oldest = self.demand.oldest_by_queue()
        return self.demand.burst_by_queue(), {queue: max(0.0, now - submitted) for queue, submitted in oldest.items()}

    def shape(self) -> QueueShape | None:
        """The queue's figures for the metrics, on the leader; a standby shows none (its queue is the same, and
        dashboards add the gauges over instances)."""
        if not self.leading():
            return None
        by_queue, by_tenant = self.queue.depth_by()
        counts = dict(self.shares.counts)
        tenants = set(by_tenant) | set(counts)
        return QueueShape(
            depth_by_queue=by_queue,
            depth_by_tenant=by_tenant,
            virtual_time_by_queue=self.queue.virtual_times(),
            weights={tid: self.queue.weight(tid) for tid in sorted(tenants)},
            dispatch_counts=counts,
        )
