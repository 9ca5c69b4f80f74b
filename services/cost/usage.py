"""The latest measured use of each running attempt, as the pool-manager keeps it per worker under
`{prefix}/usage/{worker}` (services/poolmanager/usage.py): what the ledger prices running attempts at, as
max(requested, used) (docs/cost.md, "Real-time cost")."""

from __future__ import annotations

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from libs.etcd.client import WatchEvent
from libs.keys import Keys
from libs.lifecycle.codec import decode_worker_usage

AttemptKey = tuple[str, str, int]  # (tenant, job, attempt)


class RunningUsage:
    """Each worker's samples as last stored, looked up by attempt. A sample counts only for the attempt it was
    taken of, with the tenant the pool-manager took from the assignment, and on the worker the attempt runs on."""

    def __init__(self) -> None:
        self._by_worker: dict[str, list[AttemptKey]] = {}
        self._samples: dict[AttemptKey, tuple[str, pm.RunningUsage]] = {}  # -> (worker, sample)

    def on_usage_event(self, event: WatchEvent) -> None:
        worker_id = Keys.last_segment(event.kv.key)
        for key in self._by_worker.pop(worker_id, []):
            if key in self._samples and self._samples[key][0] == worker_id:
                del self._samples[key]
        if event.kind == "delete":
            return
        usage = decode_worker_usage(event.kv.value)
        keys = []
        for sample in usage.attempts:
            key = (sample.tenant_id, sample.job_id, sample.attempt)
            self._samples[key] = (worker_id, sample)
            keys.append(key)
        self._by_worker[worker_id] = keys

    def latest(self, job: t.Job, attempt: t.AttemptRecord) -> pm.RunningUsage | None:
        """The latest sample of `attempt` of `job`, if its worker sent one."""
        found = self._samples.get((job.tenant_id, job.job_id, attempt.attempt))
        if found is None or found[0] != attempt.worker_id:
            return None
        return found[1]

    def __len__(self) -> int:
        return len(self._samples)
