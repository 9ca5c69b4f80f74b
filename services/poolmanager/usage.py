"""Running attempts' measured use, any replica: each heartbeat brings what every attempt its worker runs has used so
far; the latest is kept in etcd for the cost service, which prices a running attempt at max(requested, used) from
it (docs/cost.md, "Real-time cost").

Bounded: one key per worker (`usage/{worker}`, on the worker's lease, so it goes when the worker does), holding at
most one sample per attempt the worker holds that has run for an interval (JOBMESH_USAGE_SAMPLE_SECONDS) or more,
written at most once per interval per worker however many jobs it runs or heartbeats it sends: a job shorter than
the interval costs no write, a longer one about one per interval (docs/benchmarks.md).

Any replica takes heartbeats, so any replica writes; each write is fenced by the worker's lease (its record must
still be on the lease the heartbeat refreshed), as a heartbeat's drain is, and runs in the background so that a
slow etcd never holds up the heartbeat's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.config import MAX_WORKER_SLOTS
from libs.errors import JobMeshError
from libs.etcd.client import cmp_lease, op_put
from libs.jobs import ts
from libs.keys import safe_segment
from libs.lifecycle.codec import decode_assignment
from services.poolmanager.binding import ResultBounds, ResultOutOfRange, check_sample_numbers
from services.poolmanager.results import RegistryParts, UsesRegistryParts, attempt_bounds

log = logging.getLogger(__name__)

# Default seconds between two writes of one worker's usage.
DEFAULT_INTERVAL = 15.0


class UsageThrottle:
    """When a worker's usage is due to be written: at most once per `interval` (0: never). Pure."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last: dict[str, float] = {}  # worker -> when its usage was last written
        self._pruned = 0.0

    def due(self, worker_id: str, now: float) -> bool:
        return self.interval > 0 and now - self._last.get(worker_id, float("-inf")) >= self.interval

    def __len__(self) -> int:
        """Workers remembered."""
        return len(self._last)

    def wrote(self, worker_id: str, now: float) -> None:
        self._last[worker_id] = now
        if now - self._pruned >= self.interval:
            self._pruned = now
            # Workers not heard of for a while (gone, or heartbeating through another replica): a bounded map.
            for gone in [w for w, when in self._last.items() if now - when > 4 * self.interval]:
                del self._last[gone]


def accepted_samples(
    reported: Iterable[pm.RunningUsage],
    held: Callable[[str], t.Assignment | None],
    bounds: Callable[[t.Assignment], ResultBounds | None],
    now: float,
    min_age: float = 0.0,
) -> tuple[list[pm.RunningUsage], list[ResultOutOfRange]]:
    """What to store of a heartbeat's samples: the first sample of each attempt the worker holds (`held` by job id)
    that has run at least `min_age` seconds, with the tenant of its assignment and the time it arrived, and no more
    than a worker has slots; and the refusals of those whose numbers cannot be true (not stored). Samples of
    attempts it does not hold (just cancelled, or an assignment not seen yet) are left out. Pure."""
    out: dict[str, pm.RunningUsage] = {}
    refused: list[ResultOutOfRange] = []
    for sample in reported:
        if len(out) >= MAX_WORKER_SLOTS:
            break
        if sample.job_id in out or not safe_segment(sample.job_id):
            continue
        assignment = held(sample.job_id)
        if assignment is None or assignment.attempt != sample.attempt:
            continue
        limits = bounds(assignment)
        if limits is None or limits.elapsed_seconds is None or limits.elapsed_seconds < min_age:
            continue
        try:
            check_sample_numbers(sample.cpu_seconds, sample.max_memory_mb, limits)
        except ResultOutOfRange as err:
            refused.append(err)
            continue
        out[sample.job_id] = pm.RunningUsage(
            job_id=sample.job_id,
            attempt=sample.attempt,
            cpu_seconds=sample.cpu_seconds,
            max_memory_mb=sample.max_memory_mb,
            tenant_id=assignment.tenant_id,
            sample_time=ts(now),
        )
    return list(out.values()), refused


class UsageRecorder(UsesRegistryParts):
    def __init__(self, parts: RegistryParts, interval: float = DEFAULT_INTERVAL):
        super().__init__(parts)
        self.throttle = UsageThrottle(interval)
        self._writing: dict[str, asyncio.Task[None]] = {}  # at most one write in flight per worker

    def heard(self, request: pm.HeartbeatRequest) -> None:
        """A heartbeat that refreshed the worker's own lease: its samples are written when due."""
        worker_id, now = request.worker_id, self.clock.now()
        if not request.usage or worker_id in self._writing or not self.throttle.due(worker_id, now):
            return
        # An attempt younger than an interval is left at its request: jobs shorter than that (most) cost no write,
        # and their final charge comes soon.
        samples, refused = accepted_samples(
            request.usage, lambda job_id: self._held(worker_id, job_id), self._bounds, now, self.throttle.interval
        )
        for err in refused:
            log.warning("refused a usage sample from worker %s: %s", worker_id, err.message)
            self.metrics.refusals.labels("Heartbeat", err.reason).inc()
        if not samples:
            # Nothing to store (yet: an attempt too young, or an assignment this replica has not seen). What a
            # previous write left stays until the next one or the lease: it names attempts that are over, which the
            # cost service no longer prices, and deleting it would cost a write per job.
            return
        self.throttle.wrote(worker_id, now)
        task = asyncio.create_task(self._write(worker_id, request.lease_id, samples), name="usage-write")
        self._writing[worker_id] = task
        task.add_done_callback(lambda _: self._writing.pop(worker_id, None))

    def _held(self, worker_id: str, job_id: str) -> t.Assignment | None:
        kv = self.assignments.cache.get(self.keys.assignment(worker_id, job_id))
        return decode_assignment(kv.value) if kv is not None else None

    def _bounds(self, held: t.Assignment) -> ResultBounds | None:
        return attempt_bounds(self.config, held, self.clock.now())

    async def _write(self, worker_id: str, lease_id: int, samples: list[pm.RunningUsage]) -> None:
        usage = pm.WorkerUsage(worker_id=worker_id, attempts=samples).SerializeToString()
        put = op_put(self.keys.worker_usage(worker_id), usage, lease=lease_id)
        try:
            result = await self.etcd.txn([cmp_lease(self.keys.worker(worker_id), lease_id)], [put])
        except JobMeshError as exc:
            # The next sample comes within an interval; meanwhile the cost service keeps the previous one.
            log.warning("usage of worker %s not written: %s", worker_id, exc)
            self.metrics.usage_writes.labels("failed").inc()
            return
        self.metrics.usage_writes.labels("written" if result.succeeded else "fenced").inc()

    async def close(self) -> None:
        for task in list(self._writing.values()):
            task.cancel()
        await asyncio.gather(*self._writing.values(), return_exceptions=True)
