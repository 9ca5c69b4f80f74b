"""The etcd key layout, in one place."""

from __future__ import annotations

import re

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_segment(value: str) -> bool:
    """Ids that go into keys must not be able to reach another key (no '/', no empty, bounded)."""
    return bool(_SAFE.match(value))


class Keys:
    def __init__(self, prefix: str):
        self.p = prefix.rstrip("/")

    # Jobs live under their tenant, so a tenant-scoped read can only ever reach that tenant's jobs.
    @property
    def jobs(self) -> str:
        return f"{self.p}/jobs/"

    def tenant_jobs(self, tenant_id: str) -> str:
        return f"{self.p}/jobs/{tenant_id}/"

    def job(self, tenant_id: str, job_id: str) -> str:
        return f"{self.p}/jobs/{tenant_id}/{job_id}"

    def job_index(self, job_id: str) -> str:
        """job id -> tenant id, for admin look-ups by id alone."""
        return f"{self.p}/jobidx/{job_id}"

    def idempotency(self, tenant_id: str, key: str) -> str:
        return f"{self.p}/idem/{tenant_id}/{key}"

    @property
    def workers(self) -> str:
        return f"{self.p}/workers/"

    def worker(self, worker_id: str) -> str:
        return f"{self.p}/workers/{worker_id}"

    @property
    def usage(self) -> str:
        return f"{self.p}/usage/"

    def worker_usage(self, worker_id: str) -> str:
        """The latest use of each attempt the worker runs (under its lease): what the cost service prices them at."""
        return f"{self.p}/usage/{worker_id}"

    @property
    def assignments(self) -> str:
        return f"{self.p}/assign/"

    def worker_assignments(self, worker_id: str) -> str:
        return f"{self.p}/assign/{worker_id}/"

    def assignment(self, worker_id: str, job_id: str) -> str:
        """One key per job a worker holds: a worker with several slots holds several."""
        return f"{self.p}/assign/{worker_id}/{job_id}"

    @staticmethod
    def assignment_worker(key: str) -> str:
        """The worker an assignment key belongs to."""
        return key.rsplit("/", 2)[-2]

    def leader(self, role: str) -> str:
        return f"{self.p}/leader/{role}"

    def quota_limits(self, tenant_id: str) -> str:
        return f"{self.p}/quota/limits/{tenant_id}"

    def cost_record(self, tenant_id: str, job_id: str, attempt: int) -> str:
        return f"{self.p}/cost/records/{tenant_id}/{job_id}/{attempt:04d}"

    @property
    def cost_records(self) -> str:
        return f"{self.p}/cost/records/"

    def scaling_event(self, pool_id: str, ts_ms: int) -> str:
        return f"{self.p}/scaling/{pool_id}/{ts_ms:015d}"

    def scaling_events(self, pool_id: str) -> str:
        return f"{self.p}/scaling/{pool_id}/"

    @staticmethod
    def last_segment(key: str) -> str:
        return key.rsplit("/", 1)[-1]

    @staticmethod
    def job_tenant(key: str) -> str:
        """The tenant of a job record's key (`.../jobs/<tenant>/<job>`)."""
        return key.rsplit("/", 2)[-2]

    def burst_session(self, session_id: str) -> str:
        return f"{self.p}/quota/burst/{session_id}"

    @property
    def burst_sessions(self) -> str:
        return f"{self.p}/quota/burst/"

    def burst_audit(self, ts_ms: int, session_id: str) -> str:
        return f"{self.p}/quota/burst-audit/{ts_ms:015d}-{session_id}"

    @property
    def burst_audits(self) -> str:
        return f"{self.p}/quota/burst-audit/"

    @property
    def quota_overrides(self) -> str:
        return f"{self.p}/quota/limits/"

    def join_token(self, digest: str) -> str:
        """A join token's grant, under the SHA-256 of the token (the token itself is never stored)."""
        return f"{self.p}/join-tokens/{digest}"

    def outcomes(self, replica: str) -> str:
        return f"{self.p}/poolmanager/outcomes/{replica}"

    @property
    def outcomes_prefix(self) -> str:
        return f"{self.p}/poolmanager/outcomes/"
