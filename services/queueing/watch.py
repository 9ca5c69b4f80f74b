"""What queueing learns from the job informer beyond the queue: per-job watchers (WatchJob) and recent activity
(dispatch rate per queue, tenants' run times) for a dry run's estimates. Pure apart from the asyncio queues."""

from __future__ import annotations

import asyncio
import statistics
from collections import OrderedDict, deque

from jobmesh.common.v1 import types_pb2 as t
from libs.etcd.client import WatchEvent
from libs.keys import Keys
from libs.lifecycle.codec import decode_job

# Changes a slow watcher may fall behind by before it is told to read the job again (only the newest matters).
WATCH_BUFFER = 64
# Dispatches and run times remembered, and over what window the dispatch rate is taken.
RATE_WINDOW_SECONDS = 300.0
RUNTIMES_KEPT = 50
_SEEN_KEPT = 20_000
_STARTS_KEPT = 10_000


def _seconds(stamp: object) -> float:
    return stamp.ToNanoseconds() / 1e9  # type: ignore[attr-defined]


class JobWatchers:
    """Subscribers per job id; each gets (job, mod revision) at every change of the record, or None when the record
    was deleted."""

    def __init__(self) -> None:
        self._subs: dict[str, set[asyncio.Queue[tuple[t.Job, int] | None]]] = {}

    def subscribe(self, job_id: str) -> asyncio.Queue[tuple[t.Job, int] | None]:
        queue: asyncio.Queue[tuple[t.Job, int] | None] = asyncio.Queue(WATCH_BUFFER)
        self._subs.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[tuple[t.Job, int] | None]) -> None:
        subs = self._subs.get(job_id)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subs[job_id]

    def count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def on_event(self, event: WatchEvent) -> None:
        subs = self._subs.get(Keys.last_segment(event.kv.key))
        if not subs:
            return
        item = None if event.kind == "delete" else (decode_job(event.kv.value), event.kv.mod_revision)
        for queue in subs:
            if queue.full():  # behind: the oldest change is the least useful
                queue.get_nowait()
            queue.put_nowait(item)


class RecentActivity:
    """Starts per queue over the last RATE_WINDOW_SECONDS (from attempts' start times, each attempt once) and each
    tenant's last RUNTIMES_KEPT run times (from ended attempts)."""

    def __init__(self, now: float, window: float = RATE_WINDOW_SECONDS):
        self.window = window
        self.since = now
        self._starts: dict[str, deque[float]] = {}
        self._runtimes: dict[str, deque[float]] = {}
        self._seen: OrderedDict[tuple[str, int, str], None] = OrderedDict()

    def _first(self, key: tuple[str, int, str]) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > _SEEN_KEPT:
            self._seen.popitem(last=False)
        return True

    def on_event(self, event: WatchEvent) -> None:
        if event.kind == "delete":
            return
        job = decode_job(event.kv.value)
        if not job.attempts:
            return
        last = job.attempts[-1]
        if last.HasField("start_time") and self._first((job.job_id, last.attempt, "start")):
            self._starts.setdefault(job.queue, deque(maxlen=_STARTS_KEPT)).append(_seconds(last.start_time))
        ended = job.state in (t.JOB_STATE_SUCCEEDED, t.JOB_STATE_FAILED)
        if ended and last.HasField("end_time") and last.HasField("start_time"):
            if self._first((job.job_id, last.attempt, "end")):
                runtimes = self._runtimes.setdefault(job.tenant_id, deque(maxlen=RUNTIMES_KEPT))
                runtimes.append(max(_seconds(last.end_time) - _seconds(last.start_time), 0.0))

    def dispatch_rate(self, queue: str, now: float) -> tuple[float, float]:
        """(starts per second, the window it was taken over): the window is shorter while we have not been up
        for a whole one."""
        starts = self._starts.get(queue)
        window = max(min(self.window, now - self.since), 1.0)
        if not starts:
            return 0.0, window
        recent = sum(1 for s in starts if s >= now - window)
        return recent / window, window

    def median_runtime(self, tenant_id: str) -> tuple[float, int]:
        runtimes = self._runtimes.get(tenant_id)
        if not runtimes:
            return 0.0, 0
        return statistics.median(runtimes), len(runtimes)
