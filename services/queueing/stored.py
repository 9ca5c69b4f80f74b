"""How many job records each tenant keeps in the store (pending, running and finished until their retention ends),
held under a per-tenant cap so that no tenant can fill etcd toward its quota (after which the whole mesh is
read-only). Pure: fed by the job informer and by the creates in flight."""

from __future__ import annotations

from collections import Counter

from libs.errors import ResourceExhausted


class StoredJobs:
    def __init__(self, cap: int):
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self._ids: dict[str, set[str]] = {}
        self._inflight: Counter[str] = Counter()

    def count(self, tenant_id: str) -> int:
        return len(self._ids.get(tenant_id, ()))

    def reserve(self, tenant_id: str) -> None:
        """Before a create: refuses with 429 TOO_MANY_JOBS at the cap (creates in flight count)."""
        held = self.count(tenant_id) + self._inflight[tenant_id]
        if held >= self.cap:
            raise ResourceExhausted(
                f"tenant {tenant_id} already stores {held} jobs, the most one tenant may keep; finished jobs are "
                "deleted after the retention period, or cancel pending ones",
                reason="TOO_MANY_JOBS",
                metadata={"limit": str(self.cap), "stored": str(held)},
            )
        self._inflight[tenant_id] += 1

    def release(self, tenant_id: str, job_id: str | None) -> None:
        """After the create: `job_id` when a record was written (an idempotent replay writes none)."""
        self._inflight[tenant_id] -= 1
        if self._inflight[tenant_id] <= 0:
            del self._inflight[tenant_id]
        if job_id is not None:
            self.seen(tenant_id, job_id)

    def seen(self, tenant_id: str, job_id: str) -> None:
        self._ids.setdefault(tenant_id, set()).add(job_id)

    def gone(self, tenant_id: str, job_id: str) -> None:
        ids = self._ids.get(tenant_id)
        if ids is not None:
            ids.discard(job_id)
            if not ids:
                del self._ids[tenant_id]
